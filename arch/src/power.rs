//! Leaving the machine: ACPI power-off, reset, halt, and QEMU's isa-debug-exit device
//! as the test harness's status channel.
//!
//! **Power-off** (`power_off`): ACPI S5. The sleep type comes from the DSDT's `\_S5`
//! package (`panda_firmware::s5`), and `SLP_TYPa << 10 | SLP_EN` is written into the
//! PM1a control register (and `SLP_TYPb` into PM1b, if the FADT has one). If the
//! firmware left ACPI mode off (SCI_EN clear), it is turned on first through the
//! FADT's SMI command port, as operating systems do.
//!
//! **Reset** (`reset`), each tried for 100 ms before the next: the FADT's reset
//! register (I/O space only), the 8042 keyboard controller's reset line (command
//! 0xfe), and a triple fault (an empty IDT, then `int3`), which resets every PC.
//!
//! **The harness's status channel**: `scripts/run.sh` adds `-device
//! isa-debug-exit,iobase=0xf4,iosize=0x04` and the command-line word `qemu.exit`.
//! Writing `v` there makes QEMU exit with status `(v << 1) | 1`: 0x10 gives 33
//! (success), 0x11 gives 35 (kernel failure), 0x12 gives 37 (the first program exited
//! non-zero) and 0x13 gives 39 (the kernel ended the first program); none can be
//! confused with QEMU's own 0 or 1. `exit_with` writes it only when the command line
//! asked (`set_qemu_exit(true)`), or before the command line is known (a boot failure:
//! the port is unused on PCs); otherwise it halts, leaving the report on the screen.

use core::sync::atomic::{AtomicU8, Ordering};

use panda_firmware::s5::SleepTypes;
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

/// Whether `exit_with` uses isa-debug-exit: unknown until the command line is read.
static QEMU_EXIT: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const NO: u8 = 1;
const YES: u8 = 2;

/// Whether the run ends through QEMU's isa-debug-exit (the command-line word
/// `qemu.exit`, which `scripts/run.sh` passes) or as on a machine.
pub fn set_qemu_exit(on: bool) {
    QEMU_EXIT.store(if on { YES } else { NO }, Ordering::Release);
}

/// Whether the test harness asked for isa-debug-exit.
pub fn qemu_exit() -> bool {
    QEMU_EXIT.load(Ordering::Acquire) == YES
}

/// Ends the run with failure (see `exit_with`).
pub fn exit(success: bool) -> ! {
    exit_with(if success {
        Outcome::Success
    } else {
        Outcome::KernelFailure
    })
}

/// Ends the run: with `qemu.exit` (or before the command line is known), tells QEMU
/// `outcome` through isa-debug-exit; then halts this CPU, so a report stays on the
/// screen.
pub fn exit_with(outcome: Outcome) -> ! {
    let value = match outcome {
        Outcome::Success => EXIT_SUCCESS,
        Outcome::KernelFailure => EXIT_FAILURE,
        Outcome::ProgramFailed => EXIT_PROGRAM_FAILED,
        Outcome::ProgramKilled => EXIT_PROGRAM_KILLED,
    };
    if QEMU_EXIT.load(Ordering::Acquire) != NO {
        // SAFETY: port 0xf4 is the debug-exit device under QEMU and unused on PCs.
        unsafe { Port::new(DEBUG_EXIT_PORT).write(value as u32) };
    }
    halt_forever()
}

/// What the FADT and DSDT say about powering off and resetting (I/O ports only).
#[derive(Clone, Copy, Debug)]
pub struct AcpiPower {
    /// PM1a and PM1b control registers (I/O ports).
    pub pm1a_control: Option<u16>,
    pub pm1b_control: Option<u16>,
    /// `\_S5`'s sleep types, if the DSDT declares them as constants.
    pub s5: Option<SleepTypes>,
    /// The FADT reset register (I/O port) and the value to write.
    pub reset: Option<(u16, u8)>,
    /// The SMI command port and the value that turns ACPI mode on (0: not needed).
    pub smi_command: u16,
    pub acpi_enable: u8,
}

static ACPI: spin::Once<AcpiPower> = spin::Once::new();

/// Recorded once by `acpi::discover`, which read it from the firmware's tables.
pub(crate) fn set_acpi(power: AcpiPower) {
    ACPI.call_once(|| power);
}

/// What power-off and reset will use, for the log (`None` before ACPI was read).
pub fn acpi() -> Option<AcpiPower> {
    ACPI.get().copied()
}

fn inw(port: u16) -> u16 {
    // SAFETY: reading an ACPI fixed-hardware register the FADT names has no memory
    // effects.
    unsafe { Port::new(port).read() }
}

fn outw(port: u16, value: u16) {
    // SAFETY: the port is the FADT's PM1 control register; writing it changes the
    // machine's power state, which is what the caller asked for, not memory.
    unsafe { Port::new(port).write(value) }
}

fn outb(port: u16, value: u8) {
    // SAFETY: the ports written here are the FADT's SMI command and reset registers
    // and the 8042's command port: they act on the machine, not on memory.
    unsafe { Port::new(port).write(value) }
}

fn inb(port: u16) -> u8 {
    // SAFETY: reading the 8042's status port has no memory effects.
    unsafe { Port::new(port).read() }
}

/// Busy-waits up to `ms` milliseconds or until `done` holds, on the reference counter
/// (`time::wait_us`: it works before and without a calibrated TSC, as the fatal path
/// of a failed calibration needs).
fn wait_ms(ms: u64, done: impl FnMut() -> bool) -> bool {
    crate::time::wait_us(ms * 1000, done)
}

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_MASK: u16 = 7 << 10;

/// Powers the machine off through ACPI S5. Returns only if that is not possible or
/// did not take effect within a second, with the reason.
pub fn power_off() -> &'static str {
    let Some(acpi) = ACPI.get() else {
        return "no ACPI tables were read";
    };
    let Some(pm1a) = acpi.pm1a_control else {
        return "the FADT has no PM1a control register in I/O space";
    };
    let Some(s5) = acpi.s5 else {
        return "the DSDT declares no \\_S5 package of constants";
    };
    x86_64::instructions::interrupts::disable();
    if inw(pm1a) & SCI_EN == 0 && acpi.smi_command != 0 && acpi.acpi_enable != 0 {
        outb(acpi.smi_command, acpi.acpi_enable);
        wait_ms(3000, || inw(pm1a) & SCI_EN != 0);
    }
    let sleep = |port: u16, typ: u8| {
        let value = (inw(port) & !SLP_TYP_MASK) | (u16::from(typ) << 10);
        outw(port, value | SLP_EN);
    };
    sleep(pm1a, s5.a);
    if let Some(pm1b) = acpi.pm1b_control {
        sleep(pm1b, s5.b);
    }
    wait_ms(1000, || false);
    "the machine is still running a second after SLP_EN"
}

/// Resets the machine: the FADT reset register, then the 8042, then a triple fault.
/// Each step that does not take effect within 100 ms is reported on the console.
pub fn reset() -> ! {
    x86_64::instructions::interrupts::disable();
    if let Some((port, value)) = ACPI.get().and_then(|a| a.reset) {
        outb(port, value);
        wait_ms(100, || false);
        note("power: the FADT reset register did not reset the machine; trying the 8042");
    }
    // The 8042's reset line: wait for its input buffer to drain, then pulse it.
    wait_ms(100, || inb(0x64) & 2 == 0);
    outb(0x64, 0xfe);
    wait_ms(100, || false);
    note("power: the 8042 did not reset the machine; triple fault");
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::zero(),
    };
    // SAFETY: loading an empty IDT and raising an exception is the intended triple
    // fault: the CPU cannot deliver #BP, then #GP, then #DF, and resets. Nothing runs
    // after it.
    unsafe {
        x86_64::instructions::tables::lidt(&empty);
        core::arch::asm!("int3", options(nomem, nostack));
    }
    halt_forever()
}

fn note(line: &str) {
    crate::serial::emergency(|w| {
        let _ = writeln!(w, "{line}");
    });
}
