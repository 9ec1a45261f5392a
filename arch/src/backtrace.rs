//! Frame-pointer backtraces.
//!
//! The kernel is built with `-C force-frame-pointers=yes`, so each frame starts with
//! the caller's RBP followed by the return address. The walk reads through
//! `probe::read_u64`, which turns a bad pointer into an error instead of a nested fault,
//! stops at a null or misaligned RBP, and is bounded in depth.

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
