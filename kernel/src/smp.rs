//! Bringing every CPU up: ACPI's processor list, the local APICs, and the order and
//! policy of starting the APs.
//!
//! The mechanism is `panda_arch::smp::ApStarter`: it takes the trampoline page and each
//! AP's guarded stacks from the boot memory map, runs INIT-SIPI-SIPI, and lands the AP
//! on the kernel's page tables with its GDT/TSS, the IDT and its per-CPU block loaded.
//! The boot CPU starts the APs one at a time, in MADT order, giving each the next dense
//! index. An AP that has not checked in within `AP_TIMEOUT_US` is reported by APIC id
//! and skipped (the starter parks it with INIT; its index and stacks go to the next AP);
//! boot goes on with the others. Each AP then enables the same CPU features as the boot
//! CPU and its APIC and timer here (`ap_start`), and checks in.

use alloc::vec::Vec;

use core::sync::atomic::{AtomicBool, Ordering};

use log::{info, warn};
use panda_arch::acpi::Platform;
use panda_arch::apic::{self, Mode};
use panda_arch::percpu::{self, MAX_CPUS};
use panda_arch::smp::{ApStarter, How, StartError};

use crate::boot::{BootInfo, CommandLine};

/// How long an AP may take to check in after its start-up IPIs (TCG is slow, and with
/// more vCPUs than host cores an AP may wait for a host core).
const AP_TIMEOUT_US: u64 = 1_000_000;
/// The timer tick period: the scheduler's minimum slice (a thread spinning in user
/// mode is preempted only at a tick).
pub const TICK_US: u64 = panda_sched::MIN_GRANULARITY_NS / 1000;

static FEATURES: spin::Once<panda_arch::cpu::Features> = spin::Once::new();
static AP_MAIN: spin::Once<fn(usize) -> !> = spin::Once::new();
/// Set once bring-up has counted the CPUs online.
static BRINGUP_CLOSED: AtomicBool = AtomicBool::new(false);

/// What bring-up achieved.
pub struct SmpReport {
    pub online: usize,
    pub enabled: usize,
    pub mode: Mode,
    pub elapsed_us: u64,
    pub timed_out: usize,
}

/// Sets up the boot CPU's local APIC and timer. Returns the mode.
pub fn init_bsp_apic(platform: &Platform) -> Result<Mode, &'static str> {
    FEATURES.call_once(panda_arch::cpu::features);
    let features = FEATURES.get().copied().unwrap_or_default();
    let msr_base = apic::xapic_phys_base();
    if !features.x2apic
        && platform.local_apic_address != 0
        && platform.local_apic_address != msr_base
    {
        warn!(target: "smp", "the MADT puts the local APIC at {:#x}, the CPU at {msr_base:#x}: using the CPU's", platform.local_apic_address);
    }
    panda_arch::cpu::disable_legacy_pic();
    panda_platform::ipi::init();
    apic::init_cpu()
}

/// Starts every enabled AP the MADT lists. `ap_main(index)` is where each AP goes once
/// it is set up (the executor loop); it never returns.
pub fn start_aps(boot: &mut BootInfo, platform: &Platform, ap_main: fn(usize) -> !) -> SmpReport {
    let start = panda_arch::time::now_ns();
    let silent = boot.number_option::<u32>("smp.silent");
    let late = boot.number_option::<u32>("smp.late");
    AP_MAIN.call_once(|| ap_main);
    let bsp_apic = apic::id();
    // Enabled CPUs listed past MAX_CPUS count too: the summary says `N of M` for every
    // CPU the firmware offers, so a dropped one shows.
    let enabled = (platform.processors().iter().filter(|p| p.enabled).count()
        + platform.enabled_dropped)
        .max(1);
    let mut report = SmpReport {
        online: percpu::online_count(),
        enabled,
        mode: apic::mode(),
        elapsed_us: 0,
        timed_out: 0,
    };
    let aps = platform
        .processors()
        .iter()
        .filter(|p| p.enabled && p.apic_id != bsp_apic);
    let mut starter = match ApStarter::new(&mut boot.memory_map, ap_start) {
        Ok(starter) => starter,
        Err(why) => {
            warn!(target: "smp", "cannot start APs ({why}): running on the boot CPU only");
            return report;
        }
    };
    info!(target: "smp", "trampoline at {:#x}, {} bytes, page tables at {:#x}", starter.page(), starter.size(), starter.tables());
    // `smp.silent=ID` keeps one AP from being sent its IPIs, to exercise the time-out
    // path; `smp.late=ID` makes one arrive after its time-out, to exercise the late
    // path (scripts/test.sh checks both are reported and skipped).
    let plan: Vec<(u32, How)> = aps
        .take(MAX_CPUS - 1)
        .map(|ap| {
            let how = if silent == Some(ap.apic_id) {
                How::Silent
            } else if late == Some(ap.apic_id) {
                How::Late
            } else {
                How::Normal
            };
            (ap.apic_id, how)
        })
        .collect();
    for (apic_id, outcome) in starter.start_all(&mut boot.memory_map, &plan, AP_TIMEOUT_US) {
        match outcome {
            Ok(()) => {}
            Err(StartError::TimedOut) => {
                warn!(target: "smp", "apic id {apic_id} did not answer within {} ms: skipped", AP_TIMEOUT_US / 1000);
                report.timed_out += 1;
            }
            Err(StartError::NoStacks) => {
                warn!(target: "smp", "out of memory for the stacks of apic id {apic_id}: skipped");
            }
            Err(StartError::Running) => {
                warn!(target: "smp", "apic id {apic_id} is listed twice: skipped");
            }
            Err(StartError::Late) => {
                warn!(target: "smp", "apic id {apic_id} took its start slot but did not check in: skipped");
                report.timed_out += 1;
            }
            Err(StartError::NoSlot) => {
                warn!(target: "smp", "no start slot left for apic id {apic_id}: skipped");
            }
        }
    }
    // From here on an AP that checks in (one that took its slot but was too slow)
    // halts instead of going online: the CPU count is fixed below.
    BRINGUP_CLOSED.store(true, Ordering::SeqCst);
    let parked = starter.parked();
    if parked > 0 {
        warn!(target: "smp", "{parked} AP(s) arrived after their time-out: they found no start slot and were halted and sent INIT");
    }
    report.online = percpu::online_count();
    report.elapsed_us = (panda_arch::time::now_ns() - start) / 1000;
    report
}

/// Where each AP goes once `panda_arch::smp` has it on the kernel's page tables with
/// its GDT/TSS, the IDT and its per-CPU block loaded.
fn ap_start(index: usize) -> ! {
    if let Some(features) = FEATURES.get() {
        panda_arch::cpu::enable_features(features);
    }
    if let Err(why) = apic::init_cpu() {
        warn!(target: "smp", "cpu{index}: local APIC: {why}");
    }
    if BRINGUP_CLOSED.load(Ordering::SeqCst) {
        warn!(target: "smp", "cpu{index} checked in after bring-up ended: halted, not used");
        panda_arch::power::halt_forever();
    }
    apic::start_periodic_timer(TICK_US);
    percpu::set_online();
    match AP_MAIN.get() {
        Some(main) => main(index),
        None => panda_arch::power::halt_forever(),
    }
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
