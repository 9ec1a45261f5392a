//! COM1, a 16550 UART at I/O port 0x3f8: the kernel's console.
//!
//! Output is polled (no interrupts), 115200 8N1. `Console` serialises whole lines
//! between CPUs with a spin lock taken with interrupts off; the fatal paths (panic,
//! unexpected exception) use `emergency()`, which waits only a bounded time for the lock
//! so that a CPU that died holding it cannot silence the report.
//!
//! Everything written here goes to the screen console too (screen.rs), when the
//! bootloader gave a framebuffer; without one that costs one atomic load per write.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;
use x86_64::instructions::interrupts;
use x86_64::instructions::port::Port;

pub use crate::screen::Colour;

const COM1: u16 = 0x3f8;

/// The UART registers, reached through port I/O.
pub struct Uart {
    base: u16,
    /// Whether the last byte written ended a line (user output may stop mid-line).
    at_line_start: bool,
}

impl Uart {
    const fn new(base: u16) -> Self {
        Self {
            base,
            at_line_start: true,
        }
    }

    fn out(&self, reg: u16, value: u8) {
        // SAFETY: COM1's registers are standard PC I/O ports; writing them has no effect
        // on memory safety.
        unsafe { Port::new(self.base + reg).write(value) }
    }

    fn inb(&self, reg: u16) -> u8 {
        // SAFETY: as in `out`: reading a UART register has no memory effects.
        unsafe { Port::new(self.base + reg).read() }
    }

    fn init(&self) {
        self.out(1, 0x00); // no interrupts
        self.out(3, 0x80); // DLAB on
        self.out(0, 0x01); // divisor 1: 115200 baud
        self.out(1, 0x00);
        self.out(3, 0x03); // 8N1, DLAB off
        self.out(2, 0xc7); // FIFO on, cleared, 14-byte threshold
        self.out(4, 0x03); // DTR, RTS
    }

    fn write_byte(&mut self, byte: u8) {
        // Bounded wait for the transmit holding register: a missing UART (some
        // hardware has none) must not hang the kernel.
        for _ in 0..100_000 {
            if self.inb(5) & 0x20 != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        self.out(0, byte);
        self.at_line_start = byte == b'\n';
    }
}

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        crate::screen::write_str(s);
        for b in s.bytes() {
            if b == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(b);
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Uart> = Mutex::new(Uart::new(COM1));

/// Programs COM1. Called once, first thing on the boot CPU.
pub fn init() {
    CONSOLE.lock().init();
}

/// Runs `f` with the console locked and interrupts off, so lines never interleave.
pub fn with_console<R>(f: impl FnOnce(&mut dyn fmt::Write) -> R) -> R {
    interrupts::without_interrupts(|| f(&mut *CONSOLE.lock()))
}

/// `with_console` for output that must start on a line of its own (kernel log lines,
/// test results): if the console stopped mid-line (user output without a newline),
/// a line break comes first.
pub fn with_console_line<R>(f: impl FnOnce(&mut dyn fmt::Write) -> R) -> R {
    with_console_line_in(Colour::Normal, f)
}

/// `with_console_line` whose text is shown in `colour` on the screen (COM1 gets the
/// same bytes either way).
pub fn with_console_line_in<R>(colour: Colour, f: impl FnOnce(&mut dyn fmt::Write) -> R) -> R {
    interrupts::without_interrupts(|| {
        let mut uart = CONSOLE.lock();
        if !uart.at_line_start {
            let _ = fmt::Write::write_str(&mut *uart, "\n");
        }
        crate::screen::set_colour(colour);
        let result = f(&mut *uart);
        crate::screen::set_colour(Colour::Normal);
        result
    })
}

/// Set once a fatal path gave up waiting for the console lock: its holder is not
/// coming back (stopped by NMI, or stuck), so later fatal paths do not wait again.
static LOCK_ABANDONED: AtomicBool = AtomicBool::new(false);

/// A writer for fatal paths: takes the console lock if it frees up soon, and writes
/// without it otherwise (a CPU may have died holding it). After one such time-out the
/// lock is no longer waited for. On the screen the report is red; the screen console
/// takes no lock of its own (its state is atomics), so it is reached either way.
pub fn emergency(f: impl FnOnce(&mut dyn fmt::Write)) {
    interrupts::disable();
    if !LOCK_ABANDONED.load(Ordering::Acquire) {
        for _ in 0..10_000_000 {
            if let Some(mut guard) = CONSOLE.try_lock() {
                crate::screen::set_colour(Colour::Error);
                f(&mut *guard);
                crate::screen::set_colour(Colour::Normal);
                return;
            }
            core::hint::spin_loop();
        }
        LOCK_ABANDONED.store(true, Ordering::Release);
    }
    crate::screen::set_colour(Colour::Error);
    f(&mut Uart::new(COM1));
    crate::screen::set_colour(Colour::Normal);
}
