//! Leaving the machine: QEMU's isa-debug-exit device, else halt.
//!
//! `scripts/run.sh` adds `-device isa-debug-exit,iobase=0xf4,iosize=0x04`. Writing `v`
//! there makes QEMU exit with status `(v << 1) | 1`: 0x10 gives 33 (success), 0x11 gives
//! 35 (kernel failure), 0x12 gives 37 (the first program exited non-zero) and 0x13
//! gives 39 (the kernel ended the first program); none can be confused with QEMU's own
//! 0 or 1. On hardware the
//! port does nothing and the CPU halts with interrupts off.

use x86_64::instructions::port::Port;

const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Value written for success (QEMU exits with 33).
pub const EXIT_SUCCESS: u8 = 0x10;
/// Value written for failure (QEMU exits with 35).
pub const EXIT_FAILURE: u8 = 0x11;

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Value written when the kernel is healthy but the first program exited with a
/// non-zero status (QEMU exits with 37).
pub const EXIT_PROGRAM_FAILED: u8 = 0x12;
/// Value written when the kernel is healthy but ended the first program (QEMU: 39).
pub const EXIT_PROGRAM_KILLED: u8 = 0x13;

/// How a run ended, as the harness needs to tell it apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything passed (tests, or the first program's exit 0 and the closing checks).
    Success,
    /// The kernel failed: a panic, a fatal trap, a failed test or check, the watchdog.
    KernelFailure,
    /// The kernel is fine; the first program exited with a non-zero status.
    ProgramFailed,
    /// The kernel is fine; it ended the first program (a fault, a protection error).
    ProgramKilled,
}

/// Ends the run with a status QEMU turns into its exit code.
pub fn exit(success: bool) -> ! {
    exit_with(if success {
        Outcome::Success
    } else {
        Outcome::KernelFailure
    })
}

/// Ends the run with `outcome` (see the module doc for the values).
pub fn exit_with(outcome: Outcome) -> ! {
    let value = match outcome {
        Outcome::Success => EXIT_SUCCESS,
        Outcome::KernelFailure => EXIT_FAILURE,
        Outcome::ProgramFailed => EXIT_PROGRAM_FAILED,
        Outcome::ProgramKilled => EXIT_PROGRAM_KILLED,
    };
    // SAFETY: port 0xf4 is the debug-exit device under QEMU and unused on PCs.
    unsafe { Port::new(DEBUG_EXIT_PORT).write(value as u32) };
    halt_forever()
}
