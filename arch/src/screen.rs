//! The screen console: the bootloader's framebuffer as a text console that shows what
//! COM1 shows (the log, user output, crash reports).
//!
//! Only the Limine path has a framebuffer (PVH has none); without one every call here
//! returns after one atomic load, so the serial console costs what it did.
//!
//! Text goes into a shadow of text cells (a byte and a colour each) from the moment the
//! front-end records a framebuffer; once the kernel's page tables map the framebuffer
//! (`init`), the cells are drawn and from then on each character is drawn as it is
//! written, with glyphs of the `noto-sans-mono-bitmap` crate (Noto Sans Mono, 16 pixels
//! high, 7 wide). Scrolling never reads or copies the framebuffer (slow under
//! emulation, and on real hardware reads of uncached memory are too): the cells move
//! up by a quarter of the screen at once, and only the cells whose character or colour
//! changed are redrawn.
//!
//! Every piece of state is an atomic, and the pixels are written with atomic stores,
//! so the fatal paths may write here without the console lock (`serial::emergency`
//! does when the lock's holder is stuck): two writers at once may garble the picture,
//! but never memory.

use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use noto_sans_mono_bitmap::{get_raster, get_raster_width, FontWeight, RasterHeight};

const FONT_HEIGHT: RasterHeight = RasterHeight::Size16;
const GLYPH_H: usize = 16;
const GLYPH_W: usize = get_raster_width(FontWeight::Regular, FONT_HEIGHT);

/// The most text cells kept; a larger screen uses its top-left part.
const MAX_COLS: usize = 256;
const MAX_ROWS: usize = 128;

/// Text colours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Colour {
    /// Light grey: ordinary log lines and user output.
    Normal = 0,
    /// Yellow: `WARN` lines.
    Warn = 1,
    /// Red: `ERROR` lines, panics, fatal traps and watchdog reports.
    Error = 2,
}

impl Colour {
    fn from_index(i: u16) -> Colour {
        match i {
            1 => Colour::Warn,
            2 => Colour::Error,
            _ => Colour::Normal,
        }
    }

    /// 8-bit red, green and blue.
    fn rgb(self) -> [u32; 3] {
        match self {
            Colour::Normal => [0xd0, 0xd0, 0xd0],
            Colour::Warn => [0xff, 0xd0, 0x40],
            Colour::Error => [0xff, 0x50, 0x50],
        }
    }
}

/// The framebuffer as the boot protocol described it (32 bits per pixel only).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Framebuffer {
    pub phys: u64,
    pub width: usize,
    pub height: usize,
    /// Bytes from one pixel row to the next.
    pub pitch: usize,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

/// What `init` found, for the log.
#[derive(Clone, Copy, Debug)]
pub struct ScreenInfo {
    pub width: usize,
    pub height: usize,
    pub cols: usize,
    pub rows: usize,
}

static FRAMEBUFFER: spin::Once<Framebuffer> = spin::Once::new();
/// A framebuffer exists: text is kept in `CELLS`.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Virtual address of the mapped framebuffer; 0 until `init` mapped it.
static BASE: AtomicU64 = AtomicU64::new(0);
static COLS: AtomicUsize = AtomicUsize::new(0);
static ROWS: AtomicUsize = AtomicUsize::new(0);
static ROW: AtomicUsize = AtomicUsize::new(0);
static COL: AtomicUsize = AtomicUsize::new(0);
static COLOUR: AtomicU16 = AtomicU16::new(0);
/// A cell: the character in the low byte, the colour above (0 = blank).
static CELLS: [AtomicU16; MAX_COLS * MAX_ROWS] = [const { AtomicU16::new(0) }; MAX_COLS * MAX_ROWS];

/// Records the boot protocol's framebuffer (the Limine front-end, once). Text is kept
/// from now on and drawn once `init` has mapped it. Formats other than 32 bits per
/// pixel are ignored.
pub(crate) fn set_framebuffer(fb: Framebuffer) {
    if fb.width < GLYPH_W
        || fb.height < GLYPH_H
        || fb.pitch < fb.width * 4
        || !fb.pitch.is_multiple_of(4)
    {
        return;
    }
    let fb = *FRAMEBUFFER.call_once(|| fb);
    COLS.store((fb.width / GLYPH_W).min(MAX_COLS), Ordering::Relaxed);
    ROWS.store((fb.height / GLYPH_H).min(MAX_ROWS), Ordering::Relaxed);
    ACTIVE.store(true, Ordering::Release);
}

/// Maps the framebuffer (uncached, in the MMIO window) and draws the text kept so far.
/// Needs the kernel's page tables; `None` without a framebuffer or if it cannot be
/// mapped (then text is no longer kept either).
pub fn init() -> Option<ScreenInfo> {
    let fb = *FRAMEBUFFER.get()?;
    if BASE.load(Ordering::Acquire) != 0 {
        return None;
    }
    let bytes = (fb.pitch * fb.height) as u64;
    let Some(virt) = crate::kernel_tables::map_mmio(fb.phys, bytes) else {
        ACTIVE.store(false, Ordering::Release);
        return None;
    };
    if !virt.is_multiple_of(4) {
        ACTIVE.store(false, Ordering::Release);
        return None;
    }
    BASE.store(virt, Ordering::Release);
    // Clear what the bootloader left, then draw the cells.
    for y in 0..fb.height {
        for x in 0..fb.width {
            put(virt, &fb, x, y, 0);
        }
    }
    let (cols, rows) = (COLS.load(Ordering::Relaxed), ROWS.load(Ordering::Relaxed));
    for r in 0..rows {
        for c in 0..cols {
            let cell = CELLS[r * cols + c].load(Ordering::Relaxed);
            if cell != 0 {
                draw(r, c, cell);
            }
        }
    }
    Some(ScreenInfo {
        width: fb.width,
        height: fb.height,
        cols,
        rows,
    })
}

/// Whether a framebuffer is being drawn.
pub fn active() -> bool {
    BASE.load(Ordering::Relaxed) != 0
}

/// Sets the colour of the text written next (until `set_colour(Colour::Normal)`).
pub fn set_colour(colour: Colour) {
    if ACTIVE.load(Ordering::Relaxed) {
        COLOUR.store(colour as u16, Ordering::Relaxed);
    }
}

/// Writes `s` at the cursor (ASCII; other characters show as `?`).
pub fn write_str(s: &str) {
    if !ACTIVE.load(Ordering::Relaxed) {
        return;
    }
    for ch in s.chars() {
        match ch {
            '\n' => new_line(),
            '\r' => COL.store(0, Ordering::Relaxed),
            '\t' => {
                let spaces = 8 - COL.load(Ordering::Relaxed) % 8;
                for _ in 0..spaces {
                    put_char(b' ');
                }
            }
            ' '..='~' => put_char(ch as u8),
            _ => put_char(b'?'),
        }
    }
}

fn put_char(byte: u8) {
    let cols = COLS.load(Ordering::Relaxed);
    if COL.load(Ordering::Relaxed) >= cols {
        new_line();
    }
    let rows = ROWS.load(Ordering::Relaxed);
    let (r, c) = (
        ROW.load(Ordering::Relaxed).min(rows - 1),
        COL.load(Ordering::Relaxed).min(cols - 1),
    );
    let cell = u16::from(byte) | (COLOUR.load(Ordering::Relaxed) << 8);
    if CELLS[r * cols + c].swap(cell, Ordering::Relaxed) != cell {
        draw(r, c, cell);
    }
    COL.store(c + 1, Ordering::Relaxed);
}

fn new_line() {
    COL.store(0, Ordering::Relaxed);
    let rows = ROWS.load(Ordering::Relaxed);
    let row = ROW.load(Ordering::Relaxed) + 1;
    if row < rows {
        ROW.store(row, Ordering::Relaxed);
    } else {
        let jump = (rows / 4).max(1);
        scroll(jump);
        ROW.store(rows - jump, Ordering::Relaxed);
    }
}

/// Moves the cells up by `jump` rows and blanks the bottom ones, redrawing only the
/// cells that change.
fn scroll(jump: usize) {
    let (cols, rows) = (COLS.load(Ordering::Relaxed), ROWS.load(Ordering::Relaxed));
    for r in 0..rows {
        for c in 0..cols {
            let new = if r + jump < rows {
                CELLS[(r + jump) * cols + c].load(Ordering::Relaxed)
            } else {
                0
            };
            if CELLS[r * cols + c].swap(new, Ordering::Relaxed) != new {
                draw(r, c, new);
            }
        }
    }
}

/// Draws one cell (0 or a space: blank) if the framebuffer is mapped.
fn draw(row: usize, col: usize, cell: u16) {
    let base = BASE.load(Ordering::Acquire);
    let Some(fb) = FRAMEBUFFER.get() else { return };
    if base == 0 {
        return;
    }
    let byte = (cell & 0xff) as u8;
    let [r, g, b] = Colour::from_index(cell >> 8).rgb();
    let glyph = if byte > b' ' {
        get_raster(byte as char, FontWeight::Regular, FONT_HEIGHT)
    } else {
        None
    };
    let (x0, y0) = (col * GLYPH_W, row * GLYPH_H);
    for y in 0..GLYPH_H {
        for x in 0..GLYPH_W {
            let level = glyph.as_ref().and_then(|g| g.pixel(x, y)).unwrap_or(0) as u32;
            let pixel = ((r * level / 255) << fb.red_shift)
                | ((g * level / 255) << fb.green_shift)
                | ((b * level / 255) << fb.blue_shift);
            put(base, fb, x0 + x, y0 + y, pixel);
        }
    }
}

/// Writes one pixel (ignored outside the framebuffer).
fn put(base: u64, fb: &Framebuffer, x: usize, y: usize, pixel: u32) {
    if x >= fb.width || y >= fb.height {
        return;
    }
    let ptr = (base as usize + y * fb.pitch + x * 4) as *mut u32;
    // SAFETY: `base` is the framebuffer's mapping made by `init` (`pitch * height`
    // bytes, mapped for good, 4-byte aligned as `init` checked, pitch a multiple of 4
    // for 32-bit pixels), and `(x, y)` lies inside it. The framebuffer is device
    // memory no Rust object overlaps, and every access to it is an atomic store from
    // here, so concurrent writers (a fatal path without the console lock) race only on
    // which colour a pixel ends up.
    unsafe { AtomicU32::from_ptr(ptr) }.store(pixel, Ordering::Relaxed);
}
