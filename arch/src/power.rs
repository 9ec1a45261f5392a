//! Leaving the machine: QEMU's isa-debug-exit device, else halt.
//!
//! `scripts/run.sh` adds `-device isa-debug-exit,iobase=0xf4,iosize=0x04`. Writing `v`
//! there makes QEMU exit with status `(v << 1) | 1`: 0x10 gives 33 (success) and 0x11
//! gives 35 (failure); neither can be confused with QEMU's own 0 or 1. On hardware the
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

/// Ends the run with a status QEMU turns into its exit code.
pub fn exit(success: bool) -> ! {
    let value = if success { EXIT_SUCCESS } else { EXIT_FAILURE };
    // SAFETY: port 0xf4 is the debug-exit device under QEMU and unused on PCs.
    unsafe { Port::new(DEBUG_EXIT_PORT).write(value as u32) };
    halt_forever()
}
