//! Bringing every CPU up: ACPI's processor list, the local APICs, the trampoline and
//! INIT-SIPI-SIPI, and each AP's own set-up.
//!
//! The boot CPU starts the APs one at a time (they share one trampoline copy): for each
//! enabled processor in the MADT it maps a set of guarded stacks, patches the
//! trampoline with the stack, the AP's dense index and `ap_main`, and runs
//! INIT-SIPI-SIPI. An AP that has not checked in within `AP_TIMEOUT_US` is reported by
//! APIC id and skipped; boot goes on with the others. Each AP switches to the kernel's
//! page tables, loads its own GDT/TSS and the shared IDT, installs its per-CPU block,
//! enables the same CPU features as the boot CPU and its APIC and timer, and checks in.

use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use panda_arch::acpi::Platform;
use panda_arch::apic::{self, Mode};
use panda_arch::percpu::{self, MAX_CPUS};
use panda_arch::smp::Trampoline;
use panda_arch::stacks::CpuStacks;

use crate::boot::{BootInfo, MemoryKind};
use crate::kernel_tables;

/// How long an AP may take to check in after its start-up IPIs (TCG is slow, and with
/// more vCPUs than host cores an AP may wait for a host core).
const AP_TIMEOUT_US: u64 = 1_000_000;
/// The timer tick period.
pub const TICK_US: u64 = 10_000;

static AP_STACKS: [spin::Once<CpuStacks>; MAX_CPUS] = [const { spin::Once::new() }; MAX_CPUS];
static XAPIC_VIRT: AtomicU64 = AtomicU64::new(0);
static FEATURES: spin::Once<panda_arch::cpu::Features> = spin::Once::new();
static AP_MAIN: spin::Once<fn(usize) -> !> = spin::Once::new();

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
    let xapic_virt = if features.x2apic {
        0
    } else {
        let phys = if platform.local_apic_address != 0 {
            platform.local_apic_address
        } else {
            apic::xapic_phys_base()
        };
        kernel_tables::map_mmio(phys, 4096).ok_or("cannot map the xAPIC registers")?
    };
    XAPIC_VIRT.store(xapic_virt, Ordering::Relaxed);
    panda_arch::cpu::disable_legacy_pic();
    panda_arch::ipi::init();
    let mode = apic::init_cpu(xapic_virt)?;
    Ok(mode)
}

/// Starts every enabled AP the MADT lists. `ap_main(index)` is where each AP goes once
/// it is set up (the executor loop); it never returns.
pub fn start_aps(boot: &mut BootInfo, platform: &Platform, ap_main: fn(usize) -> !) -> SmpReport {
    let start = panda_arch::time::now_ns();
    let silent = boot
        .option("smp.silent")
        .and_then(|id| id.parse::<u32>().ok());
    AP_MAIN.call_once(|| ap_main);
    let bsp_apic = apic::id();
    let enabled = platform
        .processors()
        .iter()
        .filter(|p| p.enabled)
        .count()
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
    let trampoline = match prepare_trampoline(boot) {
        Some(t) => t,
        None => {
            warn!(target: "smp", "no trampoline page below 1 MiB or no page tables for it: running on the boot CPU only");
            return report;
        }
    };
    let mut next_index = 1;
    for ap in aps {
        if next_index >= MAX_CPUS {
            warn!(target: "smp", "more than {MAX_CPUS} CPUs: apic id {} and later ignored", ap.apic_id);
            break;
        }
        // An index whose AP timed out keeps its stacks for the next AP.
        let stacks = AP_STACKS[next_index]
            .get()
            .copied()
            .or_else(|| kernel_tables::map_cpu_stacks(next_index, &mut boot.memory_map));
        let Some(stacks) = stacks else {
            warn!(target: "smp", "out of memory for the stacks of apic id {}: skipped", ap.apic_id);
            continue;
        };
        let index = next_index;
        AP_STACKS[index].call_once(|| stacks);
        trampoline.set_ap(stacks.kernel.top, index as u64, ap_entry);
        let cpu = percpu::cpu(index);
        // `smp.silent=ID` keeps one AP from being sent its IPIs, to exercise the
        // time-out path (scripts/test.sh checks it is reported and skipped).
        let started = if silent == Some(ap.apic_id) {
            panda_arch::smp::wait_for(AP_TIMEOUT_US, || cpu.online())
        } else {
            panda_arch::smp::start_ap(ap.apic_id, &trampoline, AP_TIMEOUT_US, || cpu.online())
        };
        if started {
            next_index += 1;
        } else {
            // INIT puts the AP back into wait-for-SIPI, so it cannot wake up late on
            // the next AP's stack; its index and stacks then go to the next AP, which
            // keeps indices dense.
            apic::send_init(ap.apic_id);
            warn!(target: "smp", "apic id {} did not answer within {} ms: skipped", ap.apic_id, AP_TIMEOUT_US / 1000);
            report.timed_out += 1;
        }
    }
    report.online = percpu::online_count();
    report.elapsed_us = (panda_arch::time::now_ns() - start) / 1000;
    report
}

fn prepare_trampoline(boot: &mut BootInfo) -> Option<Trampoline> {
    let page = boot
        .memory_map
        .take(4096, 0x1000, 0x10_0000, MemoryKind::KernelEarly)?;
    let root = kernel_tables::trampoline_root()?;
    if root >= 1 << 32 {
        return None;
    }
    let (_, _, efer) = panda_arch::cpu::control_registers();
    // LME, and NXE (bit 11) and SCE (bit 0) as the boot CPU has them.
    let efer = (efer as u32 & ((1 << 11) | 1)) | (1 << 8);
    #[allow(unsafe_code)]
    // SAFETY: the page was just taken from usable memory below 1 MiB for the
    // trampoline alone; usable RAM is mapped writable in the HHDM.
    let trampoline = unsafe { Trampoline::prepare(page, boot.hhdm_offset, root as u32, efer) };
    info!(target: "smp", "trampoline at {page:#x}, {} bytes, page tables at {root:#x}", Trampoline::size());
    Some(trampoline)
}

/// Where the trampoline lands, on the AP's own stack, still on the trampoline's tables.
extern "C" fn ap_entry(index: u64) -> ! {
    let index = index as usize;
    #[allow(unsafe_code)]
    // SAFETY: the kernel's tables map everything the kernel uses, and the kernel half is
    // identical in the trampoline's tables, so the stack and this code stay mapped.
    unsafe {
        panda_arch::paging::switch_to(kernel_tables::kernel_root())
    };
    let Some(stacks) = AP_STACKS[index].get().copied() else {
        panda_arch::power::halt_forever()
    };
    panda_arch::gdt::init_cpu(index, &stacks);
    panda_arch::idt::load();
    panda_arch::percpu::install(index, panda_arch::cpu::apic_id(), &stacks);
    panda_arch::user::init_cpu();
    if let Some(features) = FEATURES.get() {
        panda_arch::cpu::enable_features(features);
    }
    if let Err(why) = apic::init_cpu(XAPIC_VIRT.load(Ordering::Relaxed)) {
        warn!(target: "smp", "cpu{index}: local APIC: {why}");
    }
    apic::start_periodic_timer(TICK_US);
    percpu::set_online();
    match AP_MAIN.get() {
        Some(main) => main(index),
        None => panda_arch::power::halt_forever(),
    }
}
