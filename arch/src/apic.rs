//! The local APIC, through the `x2apic` crate: x2APIC mode when CPUID.01H:ECX[21] says
//! so, xAPIC (MMIO) otherwise.
//!
//! Each CPU owns its `LocalApic` (the crate makes it `!Send`: its registers reach the
//! APIC of whichever CPU runs the code). It lives in a per-CPU slot that is only touched
//! by its own CPU with interrupts off, which is what makes the slot's `Sync` sound.
//!
//! Quirk: in xAPIC mode the crate writes the IPI destination into ICR bits 32..63,
//! but xAPIC expects the 8-bit destination in bits 56..63; `destination` shifts it.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x2apic::lapic::{LocalApic, LocalApicBuilder, TimerDivide, TimerMode};
use x86_64::instructions::interrupts;

use crate::percpu::{self, MAX_CPUS};

/// Vectors owned by the APIC and the kernel's IPIs. Highest priority class (0xf_).
pub const TIMER_VECTOR: u8 = 0xf0;
pub const WAKE_VECTOR: u8 = 0xf1;
pub const CALL_VECTOR: u8 = 0xf2;
pub const ERROR_VECTOR: u8 = 0xfe;
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Which register interface the APICs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    X2Apic,
    XApic,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::X2Apic => "x2apic",
            Mode::XApic => "xapic",
        }
    }
}

struct Slot(UnsafeCell<Option<LocalApic>>);

// SAFETY: slot i is only accessed by CPU i (through `with_local`, which indexes by the
// current CPU) with interrupts disabled, so no two accesses overlap.
unsafe impl Sync for Slot {}

static SLOTS: [Slot; MAX_CPUS] = [const { Slot(UnsafeCell::new(None)) }; MAX_CPUS];
static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_VIRT: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer ticks per millisecond at divide-by-16, measured on the boot CPU.
static TIMER_TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

fn with_local<R>(f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
    interrupts::without_interrupts(|| {
        let slot = &SLOTS[percpu::current_index()];
        // SAFETY: see `Slot`: this CPU's slot, interrupts off, no reentry (NMI handlers
        // never touch the APIC slots).
        let apic = unsafe { &mut *slot.0.get() };
        apic.as_mut().map(f)
    })
}

/// The mode the boot CPU chose (all CPUs use the same).
pub fn mode() -> Mode {
    if X2APIC.load(Ordering::Relaxed) {
        Mode::X2Apic
    } else {
        Mode::XApic
    }
}

/// Physical base of the xAPIC registers, from IA32_APIC_BASE.
pub fn xapic_phys_base() -> u64 {
    // SAFETY: reading IA32_APIC_BASE has no side effects.
    unsafe { x2apic::lapic::xapic_base() }
}

/// The xAPIC registers' mapping (0 in x2APIC mode): the base the CPU itself reports in
/// IA32_APIC_BASE, mapped uncached once, by the first CPU that needs it.
fn xapic_registers() -> Result<u64, &'static str> {
    if crate::cpu::features().x2apic {
        return Ok(0);
    }
    match XAPIC_VIRT.load(Ordering::Acquire) {
        0 => {
            // The xAPIC register block is 4 KiB (SDM vol. 3, 11.4.1), whatever the page size.
            let virt = crate::kernel_tables::map_mmio(xapic_phys_base(), 4096)
                .ok_or("cannot map the xAPIC registers")?;
            XAPIC_VIRT.store(virt, Ordering::Release);
            Ok(virt)
        }
        virt => Ok(virt),
    }
}

/// Enables this CPU's local APIC: x2APIC mode where the CPU has it, else xAPIC mode
/// through the registers at the base the CPU reports (IA32_APIC_BASE), which this maps.
/// The timer starts masked.
pub fn init_cpu() -> Result<Mode, &'static str> {
    let xapic_virt = xapic_registers()?;
    let apic = LocalApicBuilder::new()
        .timer_vector(TIMER_VECTOR as usize)
        .error_vector(ERROR_VECTOR as usize)
        .spurious_vector(SPURIOUS_VECTOR as usize)
        .timer_mode(TimerMode::OneShot)
        .timer_divide(TimerDivide::Div16)
        .timer_initial(0)
        .set_xapic_base(xapic_virt)
        .build()?;
    let x2 = crate::cpu::features().x2apic;
    X2APIC.store(x2, Ordering::Relaxed);
    interrupts::without_interrupts(|| {
        let slot = &SLOTS[percpu::current_index()];
        // SAFETY: this CPU's slot, interrupts off (see `Slot`).
        let stored = unsafe { &mut *slot.0.get() };
        *stored = Some(apic);
        if let Some(apic) = stored.as_mut() {
            // SAFETY: enabling the local APIC and masking its timer affect only this
            // CPU's interrupt delivery; every vector it can raise has an IDT gate.
            unsafe {
                apic.enable();
                apic.disable_timer();
            }
        }
    });
    Ok(if x2 { Mode::X2Apic } else { Mode::XApic })
}

/// This CPU's APIC id, read from the APIC. In xAPIC mode the ID register holds the
/// 8-bit id in bits 24..31, which the crate returns unshifted.
pub fn id() -> u32 {
    let raw = with_local(|a| {
        // SAFETY: reading the ID register has no side effects.
        unsafe { a.id() }
    });
    match raw {
        Some(raw) if X2APIC.load(Ordering::Relaxed) => raw,
        Some(raw) => raw >> 24,
        None => crate::cpu::apic_id(),
    }
}

/// Signals end of interrupt. Called by interrupt handlers (interrupts are off there).
pub fn eoi() {
    with_local(|a| {
        // SAFETY: EOI only acknowledges the interrupt being serviced.
        unsafe { a.end_of_interrupt() }
    });
}

fn destination(apic_id: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        apic_id
    } else {
        apic_id << 24
    }
}

/// Makes every earlier store visible before the next IPI leaves. In x2APIC mode the
/// ICR is an MSR, and a WRMSR to it is not serialising (Intel SDM vol. 3, 11.12.3): the
/// IPI could reach the target before the data it announces (a posted call) is visible
/// there. `mfence; lfence` is what Linux's `weak_wrmsr_fence` does for the same reason.
fn fence_before_ipi() {
    // SAFETY: two fences: they only order memory accesses.
    unsafe { core::arch::asm!("mfence", "lfence", options(nostack, preserves_flags)) };
}

/// Sends a fixed interrupt to the CPU with `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) {
    fence_before_ipi();
    with_local(|a| {
        // SAFETY: an IPI to a vector with a registered gate.
        unsafe { a.send_ipi(vector, destination(apic_id)) }
    });
}

/// Sends a fixed interrupt to every CPU but the caller (ICR shorthand).
pub fn send_ipi_all_but_self(vector: u8) {
    fence_before_ipi();
    with_local(|a| {
        // SAFETY: an IPI to a vector with a registered gate; the shorthand needs no
        // destination field, so the xAPIC/x2APIC difference does not arise.
        unsafe { a.send_ipi_all(vector, x2apic::lapic::IpiAllShorthand::AllExcludingSelf) }
    });
}

/// Sends an NMI to the CPU with `apic_id`.
pub fn send_nmi(apic_id: u32) {
    with_local(|a| {
        // SAFETY: NMIs land on the NMI gate, which runs on its IST stack.
        unsafe { a.send_nmi(destination(apic_id)) }
    });
}

/// Sends INIT to the CPU with `apic_id` (the first step of starting it). Crate-private:
/// only the AP start (`smp`) may reset a CPU or point it at code.
pub(crate) fn send_init(apic_id: u32) {
    with_local(|a| {
        // SAFETY: INIT resets only the target CPU, which is not yet running.
        unsafe { a.send_init_ipi(destination(apic_id)) }
    });
}

/// Sends a start-up IPI: the target starts in real mode at `page * 4096`.
pub(crate) fn send_startup(apic_id: u32, page: u8) {
    with_local(|a| {
        // SAFETY: the target is in wait-for-SIPI and the page holds the trampoline.
        unsafe { a.send_sipi(page, destination(apic_id)) }
    });
}

/// Measures the timer's rate (ticks per ms at divide 16) against the TSC, calibrated
/// already, on the calling CPU; all CPUs share the result. Five windows of `ms`
/// milliseconds, each end a timer read bracketed by TSC reads: a CPU held up between
/// the ends does not skew a window (both clocks keep counting), one held up in a read
/// does, and the window is dropped if its reads took over 1/200 of it. The median of
/// the rest is kept once 3 windows are usable; otherwise it measures again with windows
/// 4 and 16 times longer, then gives up (`None`). (Before, one window whose end the CPU
/// was held up at gave 1367329 ticks/ms for 62500 under TCG on an overloaded host.)
pub fn calibrate_timer(ms: u64) -> Option<u64> {
    const WINDOWS: usize = 5;
    let hz = crate::time::tsc_hz();
    if hz == 0 {
        return None;
    }
    let rdtsc = crate::cpu::rdtsc;
    for scale in [1, 4, 16] {
        let span = hz / 1000 * ms * scale;
        let mut rates = [0u64; WINDOWS];
        let mut used = 0;
        with_local(|a| {
            // SAFETY: programs this CPU's timer, masked, for counting only.
            unsafe {
                a.set_timer_divide(TimerDivide::Div16);
                a.set_timer_mode(TimerMode::OneShot);
                a.disable_timer();
            }
            let stamp = |a: &mut LocalApic| {
                let before = rdtsc();
                // SAFETY: reads this CPU's timer count.
                let count = unsafe { a.timer_current() };
                (count, before, rdtsc())
            };
            for _ in 0..WINDOWS {
                // SAFETY: reloads this CPU's own timer count, which is masked (no
                // interrupt can come of it) and used only for this measurement.
                unsafe { a.set_timer_initial(u32::MAX) };
                let (c0, b0, a0) = stamp(a);
                while rdtsc() - b0 < span {
                    core::hint::spin_loop();
                }
                let (c1, b1, a1) = stamp(a);
                let tsc = (b1 + (a1 - b1) / 2) - (b0 + (a0 - b0) / 2);
                let cost = (a0 - b0) + (a1 - b1);
                // A count that reached 0 ran out while the CPU was held up.
                if c1 == 0 || c1 > c0 || tsc == 0 || cost.saturating_mul(200) > tsc {
                    continue;
                }
                let per_ms = u128::from(c0 - c1) * u128::from(hz) / u128::from(tsc) / 1000;
                rates[used] = per_ms as u64;
                used += 1;
            }
            // SAFETY: stops the timer (this CPU's APIC).
            unsafe { a.set_timer_initial(0) };
        });
        if used >= 3 {
            let rates = &mut rates[..used];
            rates.sort_unstable();
            let per_ms = rates[used / 2].max(1);
            TIMER_TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
            return Some(per_ms);
        }
    }
    None
}

/// Starts this CPU's periodic timer tick every `period_us` microseconds.
pub fn start_periodic_timer(period_us: u64) {
    let per_ms = TIMER_TICKS_PER_MS.load(Ordering::Relaxed).max(1);
    let initial = (per_ms * period_us / 1000).clamp(1, u32::MAX as u64) as u32;
    with_local(|a| {
        // SAFETY: the timer vector has a handler that acknowledges it.
        unsafe {
            a.set_timer_divide(TimerDivide::Div16);
            a.set_timer_mode(TimerMode::Periodic);
            a.set_timer_initial(initial);
            a.enable_timer();
        }
    });
}
