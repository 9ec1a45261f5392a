//! Frame-pointer backtraces.
//!
//! The kernel is built with `-C force-frame-pointers=yes`, so each frame starts with
//! the caller's RBP followed by the return address. The walk reads through
//! `probe::read_u64`, which turns a bad pointer into an error instead of a nested fault,
//! stops at a null or misaligned RBP, and is bounded in depth.
//!
//! `write` is safe for any `rbp` its caller passes (a trap frame's, possibly corrupt):
//! it only reads frames in memory where kernel stacks live and a read has no side
//! effect (`frame_readable`: the HHDM, the per-CPU stack window, the kernel image),
//! never the MMIO window, where reading a device register can change the device.

use core::fmt::{self, Write};

const MAX_FRAMES: usize = 32;

/// Writes `backtrace:` and one line per frame, starting at `rip` with chain `rbp`
/// (`rip` 0: start at the caller of the function that owns `rbp`, numbered #0).
pub fn write(w: &mut dyn Write, rip: u64, rbp: u64) -> fmt::Result {
    // Frames are numbered from #0 whether or not the faulting `rip` is known.
    let skip = usize::from(rip == 0);
    writeln!(w, "backtrace:")?;
    if rip != 0 {
        writeln!(w, "  #0  0x{rip:016x}")?;
    }
    let mut rbp = rbp;
    let mut last = rip;
    let mut repeats = 0;
    for depth in 1..MAX_FRAMES {
        if rbp == 0 || !rbp.is_multiple_of(8) || rbp < crate::HHDM_BASE {
            break;
        }
        if !frame_readable(rbp) {
            writeln!(w, "  (frame pointer 0x{rbp:x} outside kernel memory)")?;
            break;
        }
        let (Ok(next), Ok(ret)) = (crate::probe::read_u64(rbp), crate::probe::read_u64(rbp + 8))
        else {
            writeln!(w, "  (frame pointer 0x{rbp:x} unreadable)")?;
            break;
        };
        if ret == 0 {
            break;
        }
        if ret == last {
            // Deep recursion: one line for the run instead of a screenful.
            repeats += 1;
        } else {
            if repeats > 0 {
                writeln!(w, "  ... the same frame {repeats} more times")?;
                repeats = 0;
            }
            writeln!(w, "  #{:<2} 0x{ret:016x}", depth - skip)?;
            last = ret;
        }
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    if repeats > 0 {
        writeln!(w, "  ... the same frame {repeats} more times")?;
    }
    Ok(())
}

/// Whether the 16-byte frame record at `rbp` lies wholly in memory that kernel stacks
/// can occupy and that reads without side effects: the HHDM (RAM and the legacy BIOS
/// area), the per-CPU stack window, or the kernel image (the boot stacks are in its
/// .bss). Unmapped pages there (guard pages) fault, and the probe reports it.
fn frame_readable(rbp: u64) -> bool {
    let Some(end) = rbp.checked_add(16) else {
        return false;
    };
    let image = crate::image::kernel_image();
    let stacks = crate::kernel_tables::STACKS_BASE;
    let stacks_end = stacks + crate::kernel_tables::STACK_WINDOW;
    [
        (crate::HHDM_BASE, crate::HHDM_BASE + crate::HHDM_LIMIT),
        (stacks, stacks_end),
        (image.start, image.end),
    ]
    .iter()
    .any(|&(start, limit)| start <= rbp && end <= limit)
}

/// The current RBP, for a backtrace from the caller.
#[inline(always)]
pub fn current_rbp() -> u64 {
    let rbp: u64;
    // SAFETY: reads a register.
    unsafe {
        core::arch::asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack, preserves_flags))
    };
    rbp
}
