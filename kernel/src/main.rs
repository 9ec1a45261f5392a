//! The Panda kernel: wiring, address spaces, processes and system calls, in-kernel tests.
//!
//! Boot order, the same on both paths once `BootInfo` exists:
//! 1. the platform's entry (`panda_arch::boot::entry`, registered by `ENTRY` below) sets
//!    up COM1, the GDT/TSS, the IDT and the clock, which need nothing from the
//!    bootloader;
//! 2. its front-end translates the boot protocol into a `BootInfo`;
//! 3. `Panda::main` installs the fatal-trap hook, and `kmain` builds the kernel's own
//!    page tables and switches to them, enables the CPU's protection features, prints
//!    the banner and then runs the tests or the requested crash, and powers off.
//!
//! Without `test` or `crash=`, boot ends by running init (`init=NAME`, default `init`)
//! from the initrd; when init exits and the kernel has checked that every frame and
//! heap byte came back, it powers off with init's outcome.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

// Built for the host (a plain `cargo build -p panda-kernel`), the kernel would only
// fail to link with a hundred lines of errors: say what to do instead, once.
#[cfg(not(target_os = "none"))]
compile_error!(
    "panda-kernel runs on bare metal: build it with `--target x86_64-unknown-none` (`cargo run --release -p panda-kernel --target x86_64-unknown-none` boots it), or use scripts/run.sh"
);

extern crate alloc;

mod aspace;
mod boot;
mod crash;
mod executor;
mod heap;
mod initrd;
mod kernel_tables;
mod ktest;
mod locks;
mod logger;
mod memory;
mod process;
mod smp;

use log::{error, info, warn};
use panda_arch::{cpu, power};

use boot::{BootInfo, CommandLine, MemoryKind};

// Every CPU index `panda-arch` hands out (below its `percpu::MAX_CPUS`) must fit the
// per-CPU tables of the executor and the memory layers (`panda_mm::MAX_CPUS`).
const _: () = assert!(panda_arch::percpu::MAX_CPUS <= panda_mm::MAX_CPUS);

/// The kernel, as the platform layer knows it.
struct Panda;

impl panda_arch::boot::Kernel for Panda {
    fn main(boot: BootInfo) -> ! {
        panda_arch::trap::set_fatal_hook(fatal_stop);
        power::set_qemu_exit(boot.has_flag("qemu.exit"));
        kmain(boot)
    }
}

/// Calibrates the TSC against the reference timers ACPI names (HPET, PM timer) and the
/// PIT, logging each round. A kernel that cannot trust its clock stops here: every
/// time-out, the scheduler's tick and the log's timestamps depend on it.
fn calibrate_clock(platform: &panda_arch::acpi::Platform) {
    use panda_arch::time::{self, Counter, References};
    let hpet = Counter::hpet();
    if platform.hpet.is_some() && hpet.is_none() {
        warn!(target: "time", "the HPET at {:#x} cannot be used (unmappable, or a tick period over 100 ns)", platform.hpet.unwrap_or(0));
    }
    let pm_timer = match platform.pm_timer {
        Some(pm) if pm.io_port => Counter::pm_timer(),
        Some(_) => {
            info!(target: "time", "the ACPI PM timer is in memory space: not used");
            None
        }
        None => None,
    };
    let refs = References {
        hpet,
        pm_timer,
        pit: Some(Counter::pit()),
    };
    let outcome = time::calibrate(refs, |round| {
        let mut line = alloc::string::String::new();
        for e in round.estimates.iter().flatten() {
            let _ = core::fmt::Write::write_fmt(&mut line, format_args!("; {e}"));
        }
        match round.outcome {
            Ok(_) => {
                info!(target: "time", "calibration round {} ({} windows of {} ms){line}", round.number, time::WINDOWS, round.window_ms)
            }
            Err(why) => {
                warn!(target: "time", "calibration round {} ({} windows of {} ms){line}: no rate accepted ({why})", round.number, time::WINDOWS, round.window_ms)
            }
        }
    });
    match outcome {
        Ok(c) => {
            let confirmed = match c.confirmed_by {
                Some(by) if by.source.nominal() => alloc::format!("confirmed by {by}"),
                Some(by) => alloc::format!(
                    "confirmed by the {} ({} MHz)",
                    by.source.name(),
                    by.hz / 1_000_000
                ),
                None => alloc::format!(
                    "no other reference confirmed it: trusted on {} agreeing windows",
                    c.winner.agreeing
                ),
            };
            info!(target: "time", "TSC {}.{:03} MHz from the {} (spread {} ppm), {confirmed}; waits use the {}", c.winner.hz / 1_000_000, c.winner.hz / 1000 % 1000, c.winner.source.name(), c.winner.spread_ppm, time::wait_counter().source().name());
        }
        Err(why) => {
            error!(target: "time", "cannot calibrate the TSC ({why}) after {} rounds up to {} ms windows: stopping, as every time-out would be wrong", time::ROUND_MS.len(), time::ROUND_MS[time::ROUND_MS.len() - 1]);
            power::exit(false)
        }
    }
}

/// The boot entry: naming `entry::<Panda>` here makes the compiler emit it, into the
/// section where the linker script finds it for the assembly entries (PVH and Limine,
/// in `panda_arch::boot`), which call it on the boot stack. It sets up the boot CPU
/// (COM1, GDT/TSS, IDT, per-CPU block, clock), turns the boot protocol into a
/// `BootInfo` and calls `Panda::main`. No symbol is defined here, so no unsafe
/// attribute is needed (docs/ARCHITECTURE.md).
#[used]
static ENTRY: panda_arch::boot::Entry = panda_arch::boot::entry::<Panda>;

fn kmain(mut boot: BootInfo) -> ! {
    logger::init(boot.option("log"));
    info!(target: "boot", "booted via {} ({}), command line {:?}", boot.protocol.name(), boot.loader.as_str(), boot.cmdline.as_str());

    let features = cpu::features();
    let tables = match kernel_tables::build_and_switch(&mut boot) {
        Ok(t) => t,
        Err(e) => {
            error!(target: "boot", "cannot build the kernel page tables: {e:?}");
            power::exit(false)
        }
    };
    cpu::enable_features(&features);
    if let Some(screen) = panda_arch::screen::init() {
        info!(target: "boot", "screen: {}x{} framebuffer, {}x{} text cells (the same log as COM1)", screen.width, screen.height, screen.cols, screen.rows);
    }

    if let Err(e) = boot.memory_map.check() {
        error!(target: "boot", "memory map is inconsistent: {e}");
        power::exit(false)
    }
    for r in boot.memory_map.regions() {
        log::debug!(target: "boot", "  [{:#014x}, {:#014x}) {}", r.start, r.end, r.kind.name());
    }

    let mut vendor = [0u8; 12];
    let mut brand = [0u8; 48];
    let (family, model, stepping) = cpu::signature();
    let usable = boot.memory_map.total(MemoryKind::Usable);
    let ram = boot.memory_map.total_ram();
    info!(
        target: "boot",
        "Panda {} booted via {} on {} {} (family {:#x} model {:#x} stepping {})",
        env!("CARGO_PKG_VERSION"),
        boot.protocol.name(),
        cpu::vendor(&mut vendor),
        cpu::brand(&mut brand),
        family,
        model,
        stepping
    );
    info!(
        target: "boot",
        "memory: {} MiB RAM, {} MiB usable in {} map entries; kernel page tables active (CR3={:#x}, HHDM {} MiB, {} KiB of tables)",
        ram >> 20,
        usable >> 20,
        boot.memory_map.regions().len(),
        tables.root,
        tables.hhdm_bytes >> 20,
        tables.table_bytes >> 10
    );
    info!(
        target: "boot",
        "cpu: nx={} smep={} smap={} umip={} pcid={} x2apic={} invariant-tsc={} (TSC not calibrated yet: times read 0 until the ACPI tables name the reference timers)",
        features.nx,
        features.smep,
        features.smap,
        features.umip,
        features.pcid,
        features.x2apic,
        features.invariant_tsc,
    );

    let ram_mib = boot.memory_map.total(MemoryKind::Usable) >> 20;
    let heap_bytes = heap::init(&mut boot, (ram_mib / 8).clamp(4, 64) << 20);
    info!(target: "mm", "early heap: {} MiB", heap_bytes >> 20);

    let platform = match panda_arch::acpi::discover() {
        Ok(p) => p,
        Err(panda_arch::acpi::Error::NoRsdp) => {
            error!(target: "acpi", "the bootloader gave no RSDP: cannot find the processors");
            power::exit(false)
        }
        Err(e) => {
            error!(target: "acpi", "cannot read the ACPI tables: {e:?}");
            power::exit(false)
        }
    };
    let enabled = platform.processors().iter().filter(|p| p.enabled).count();
    info!(
        target: "acpi",
        "{} processors ({} enabled, {} online-capable, {} unusable entries skipped), {} I/O APIC(s), {} overrides, HPET {}, PM timer {}",
        platform.processors().len() + platform.processors_dropped,
        enabled + platform.enabled_dropped,
        platform.processors().iter().filter(|p| !p.enabled && p.online_capable).count(),
        platform.processors_unusable,
        platform.ioapics().len(),
        platform.overrides().len(),
        if platform.hpet.is_some() { "yes" } else { "no" },
        if platform.pm_timer.is_some() { "yes" } else { "no" },
    );
    match power::acpi() {
        Some(p) => info!(
            target: "power",
            "power-off: {}; reset: {}the 8042, then a triple fault",
            match (p.pm1a_control, p.s5) {
                (Some(port), Some(s5)) => alloc::format!("ACPI S5 (SLP_TYP {}/{} into PM1 control at port {port:#x})", s5.a, s5.b),
                (None, _) => alloc::string::String::from("none (no PM1a control port)"),
                (_, None) => alloc::string::String::from("none (no \\_S5 package in the DSDT)"),
            },
            match p.reset {
                Some((port, value)) => alloc::format!("FADT reset register (port {port:#x} <- {value:#x}), "),
                None => alloc::string::String::new(),
            }
        ),
        None => {
            warn!(target: "power", "no FADT: power-off will not work; reset through the 8042 or a triple fault")
        }
    }
    calibrate_clock(&platform);
    let numa = &platform.numa;
    if numa.nodes().is_empty() {
        info!(target: "numa", "no SRAT: one memory node");
    }
    for node in numa.nodes() {
        info!(target: "numa", "node {}: {} CPUs, {} MiB", node.domain, node.cpus, node.memory >> 20);
    }
    if numa.dropped > 0 {
        warn!(target: "numa", "{} SRAT affinities past the first {} nodes or {} memory ranges ignored", numa.dropped, panda_arch::acpi::MAX_NODES, panda_arch::acpi::MAX_NUMA_RANGES);
    }
    if platform.processors_dropped > 0 {
        warn!(
            target: "acpi",
            "{} processors ({} enabled) listed past the first {}: Panda runs at most {} CPUs, so they stay off",
            platform.processors_dropped,
            platform.enabled_dropped,
            panda_arch::percpu::MAX_CPUS,
            panda_arch::percpu::MAX_CPUS
        );
    }
    if !features.invariant_tsc {
        warn!(target: "time", "CPUID does not report an invariant TSC (usual under TCG): the clock assumes a constant rate");
    }
    let mode = match smp::init_bsp_apic(&platform) {
        Ok(mode) => mode,
        Err(why) => {
            error!(target: "smp", "cannot enable the boot CPU's local APIC: {why}");
            power::exit(false)
        }
    };
    panda_arch::percpu::set_online();
    let Some(per_ms) = panda_arch::apic::calibrate_timer(5) else {
        error!(target: "smp", "cannot measure the local APIC timer against the TSC (no 3 of 5 windows usable, up to 80 ms long): stopping, as the scheduler's tick would be wrong");
        power::exit(false)
    };
    info!(target: "smp", "local APIC in {} mode; timer {} ticks/ms at divide 16 (median of 5 windows against the TSC)", mode.name(), per_ms);
    panda_arch::apic::start_periodic_timer(smp::TICK_US);
    x86_64::instructions::interrupts::enable();
    let report = smp::start_aps(&mut boot, &platform, ap_main);
    if report.online < report.enabled {
        warn!(
            target: "smp",
            "only {} of the {} CPUs ACPI lists came online: {} missing (see the lines above); running on {}",
            report.online,
            report.enabled,
            report.enabled - report.online,
            report.online
        );
    }
    info!(
        target: "smp",
        "{} of {} CPUs online ({}) in {} ms{}",
        report.online,
        report.enabled,
        report.mode.name(),
        report.elapsed_us / 1000,
        if report.timed_out > 0 { " (some did not answer, see above)" } else { "" }
    );

    for m in boot.modules() {
        info!(target: "boot", "module {:?}: {} KiB at {:#x}", m.name, m.len >> 10, m.phys);
    }

    let frames = memory::init(&mut boot, report.online);
    info!(target: "mm", "frame allocator: {} MiB in 4 KiB frames, per-CPU caches on {} CPUs; kernel reserve {} KiB (user memory and system calls stop there)", frames >> 8, report.online, memory::reserve_frames() * 4);
    if let Some((method, times)) = panda_platform::frame::choose_zero_method() {
        let mut all = alloc::string::String::new();
        for (m, ns) in times {
            let _ = core::fmt::Write::write_fmt(&mut all, format_args!("{} {} ns, ", m.name(), ns));
        }
        let forced = boot.option("mm.zero").and_then(|id| {
            panda_arch::paging::ZeroMethod::ALL
                .into_iter()
                .find(|m| m.id() == id)
        });
        match forced {
            Some(m) => {
                panda_arch::paging::set_zero_method(m);
                info!(target: "mm", "zeroing frames with {} (mm.zero; per 4 KiB: {})", m.name(), all.as_str().trim_end_matches(", "));
            }
            None => {
                info!(target: "mm", "zeroing frames with {} (fastest here; per 4 KiB: {})", method.name(), all.as_str().trim_end_matches(", "))
            }
        }
    }
    match boot.option("mm.poison") {
        Some("on") => {
            panda_platform::frame::poison::enable();
            info!(target: "mm", "frame poisoning on (mm.poison=on): freed frames are filled and checked when reused, pooled frames checked for zeros (a debugging mode: slower)");
        }
        None | Some("off") => {}
        Some(other) => {
            warn!(target: "mm", "mm.poison={other} is not on or off: poisoning stays off")
        }
    }
    match boot.option("mm.prezero") {
        Some("off") => {
            memory::set_prezero(false);
            info!(target: "mm", "zeroed pools off (mm.prezero=off): no zeroing ahead of need, every demand-zero fault zeroes its frame inline");
        }
        None | Some("on") => {}
        Some(other) => {
            warn!(target: "mm", "mm.prezero={other} is not on or off: the zeroed pools stay on")
        }
    }
    heap::enable_slabs();
    process::init();
    let executor = executor::init(report.online);
    memory::start_zeroing(executor, executor.cpu_count());
    info!(target: "sched", "executor running on {} CPUs", executor.cpu_count());
    start_watchdog(boot.option("watchdog"));
    for word in boot.unknown_words() {
        warn!(
            target: "boot",
            "unknown command-line word {word:?} ignored (keys: {}; flags: {})",
            boot::KNOWN_OPTIONS.join("=, ") + "=",
            boot::KNOWN_FLAGS.join(", ")
        );
    }
    let boot: &'static BootInfo = BOOT.call_once(|| boot);
    let tables: &'static kernel_tables::KernelTables = TABLES.call_once(|| tables);
    let expected = report.enabled;
    executor.spawn_pinned(0, async move {
        if let Some(what) = boot.option("crash") {
            crash::trigger(what).await;
        }
        if boot.has_flag("test") {
            let ok = ktest::run_all(boot, tables, expected).await;
            finish(
                boot,
                if ok {
                    power::Outcome::Success
                } else {
                    power::Outcome::KernelFailure
                },
            );
        }
        finish(boot, run_init(boot).await)
    });
    executor::run_this_cpu()
}

/// Ends a run that finished (init exited, or the tests ran): with `qemu.exit` (the test
/// harness) through QEMU's isa-debug-exit; otherwise says how it went and powers off
/// (ACPI S5), or halts (`halt`) or resets (`reboot`) as the command line asks.
fn finish(boot: &BootInfo, outcome: power::Outcome) -> ! {
    if power::qemu_exit() {
        power::exit_with(outcome)
    }
    let what = match outcome {
        power::Outcome::Success => "success",
        power::Outcome::KernelFailure => "kernel failure",
        power::Outcome::ProgramFailed => "the first program failed",
        power::Outcome::ProgramKilled => "the kernel ended the first program",
    };
    if boot.has_flag("halt") {
        info!(target: "power", "run finished ({what}): halted (command line: halt)");
        panda_arch::smp::stop_others();
        power::halt_forever()
    }
    if boot.has_flag("reboot") {
        info!(target: "power", "run finished ({what}): resetting the machine (command line: reboot)");
        panda_arch::smp::stop_others();
        power::reset()
    }
    info!(target: "power", "run finished ({what}): powering off (ACPI S5)");
    panda_arch::smp::stop_others();
    let why = power::power_off();
    error!(target: "power", "cannot power off: {why}; halted");
    power::halt_forever()
}

/// How long a CPU may go without a timer tick before the watchdog stops the machine,
/// unless `watchdog=SECONDS` says otherwise. Generous: under TCG with many more vCPUs
/// than host cores, a vCPU may wait a while for a host core.
const WATCHDOG_DEFAULT_MS: u64 = 5_000;

/// Starts the watchdog with `watchdog=SECONDS` (decimals allowed, at least 0.5) or
/// the default; `watchdog=off` leaves it off. A value that is not a number, too small
/// or too large (`boot::watchdog_limit_ns`) gets one warning and the default.
fn start_watchdog(option: Option<&str>) {
    let limit_ns = match option {
        None => Some(WATCHDOG_DEFAULT_MS * 1_000_000),
        Some("off") => None,
        Some(text) => match boot::watchdog_limit_ns(text) {
            Ok(ns) => Some(ns),
            Err(e) => {
                log::warn!(target: "watchdog", "watchdog={text} is {} (want SECONDS from 0.5 to {}, or off): using {} s", e.describe(), u64::MAX / 1_000_000_000, WATCHDOG_DEFAULT_MS / 1000);
                Some(WATCHDOG_DEFAULT_MS * 1_000_000)
            }
        },
    };
    match limit_ns {
        Some(ns) => {
            panda_platform::watchdog::start(ns);
            let ms = ns / 1_000_000;
            info!(target: "watchdog", "a CPU without a timer tick for {}.{} s stops the machine with a report from every CPU (watchdog=SECONDS|off)", ms / 1000, ms / 100 % 10);
        }
        None => info!(target: "watchdog", "off (watchdog=off)"),
    }
}

/// Runs the initrd's `init` (or the program `init=PATH` names) as the first process,
/// waits for it, checks that every frame came back, and says whether all went well
/// (status 0, nothing leaked).
async fn run_init(boot: &BootInfo) -> power::Outcome {
    match initrd::init(boot) {
        Ok(files) => {
            info!(target: "boot", "initrd: {files} files");
            initrd::for_each_file(
                |name, len| log::debug!(target: "boot", "initrd: {name} ({len} bytes)"),
            );
        }
        Err(why) => {
            info!(target: "boot", "no initrd ({why}): nothing to run, powering off");
            return power::Outcome::Success;
        }
    }
    let path = boot.option("init").unwrap_or("init");
    let arg = boot.number_option("init.arg").unwrap_or(0);
    // The words after a lone `--` are init's arguments (argv[1..]), as a block.
    let mut block = alloc::string::String::new();
    for word in boot.init_args() {
        block.push_str(word);
        block.push('\0');
    }
    let args = match process::Args::new(block.as_bytes()) {
        Ok(args) => args,
        Err(e) => {
            log::error!(target: "user", "init's arguments after \"--\" are refused: {e:?}");
            return power::Outcome::KernelFailure;
        }
    };
    // The baseline: every frame not in use now must be back once init and all it
    // started are gone (zeroing paused so pooled frames are not in flight).
    let (baseline, large_before, heap_before) = {
        let _paused = memory::pause_zeroing();
        (
            memory::frames_not_in_use(),
            heap::large_frames(),
            heap::live_bytes(),
        )
    };
    let buddy_before = panda_platform::frame::bookkeeping_entries();
    let status = process::run_init(path, arg, &args).await;
    let resends = panda_platform::ipi::resends();
    if resends > 0 {
        info!(target: "smp", "{resends} cross-CPU calls were not taken within 50 ms and got their IPI again");
    }
    let halted = panda_platform::ipi::halted_waits();
    if halted > 0 {
        info!(target: "smp", "{halted} waits for cross-CPU calls' answers went on halted (not answered within 20 us)");
    }
    let Some(status) = status else {
        return power::Outcome::KernelFailure;
    };
    let exec = executor::get().expect("the executor runs this task");
    // Children init did not wait for may still be running: give them a moment.
    let _paused = memory::pause_zeroing();
    let mut now = memory::frames_not_in_use();
    for _ in 0..200 {
        if now == baseline {
            break;
        }
        exec.sleep(5_000_000).await;
        now = memory::frames_not_in_use();
    }
    // Kernel heap: what init's processes, threads, timers and tables allocated must be
    // freed too. Two things may stay legitimately: capacity some tables keep (a small,
    // fixed slack), and the frame allocator's own bookkeeping, which lives on the heap
    // and grows with fragmentation (frames parked in per-CPU caches, zeroed pools and
    // slab pages keep their runs split; after the 110,000-thread user test, 130 ->
    // 11,600 entries, about 300 KiB). Both are allowed for; a leak per process, thread
    // or timer grows with the workload and exceeds them.
    let allowed = |buddy_now: usize| {
        HEAP_SLACK + BOOKKEEPING_ENTRY_BYTES * buddy_now.saturating_sub(buddy_before) as u64
    };
    let buddy_now = || panda_platform::frame::bookkeeping_entries();
    let mut heap_after = heap::live_bytes();
    for _ in 0..200 {
        if heap_after.saturating_sub(heap_before) <= allowed(buddy_now()) {
            break;
        }
        exec.sleep(5_000_000).await;
        heap_after = heap::live_bytes();
    }
    let buddy_after = buddy_now();
    let heap_grew = heap_after.saturating_sub(heap_before);
    let heap_ok = heap_grew <= allowed(buddy_after);
    if heap_ok {
        console!(
            "ok heap_back_to_baseline ({heap_before} -> {heap_after} bytes in use; frame-allocator bookkeeping {buddy_before} -> {buddy_after} entries)"
        );
    } else {
        console!(
            "FAIL heap_back_to_baseline: {heap_after} bytes of kernel heap in use after init, {heap_before} before ({heap_grew} more, {} allowed for {buddy_before} -> {buddy_after} frame-allocator entries; {} tasks alive, {} task structures, {} timers armed)",
            allowed(buddy_after),
            exec.live_tasks(),
            exec.task_structs(),
            (0..exec.cpu_count()).map(|c| exec.armed_timers(c)).sum::<usize>()
        );
    }
    if now == baseline {
        console!("ok frames_back_to_baseline ({baseline} frames free)");
    } else {
        console!(
            "FAIL frames_back_to_baseline: {now} frames free after init, {baseline} before ({} leaked; large heap blocks {} -> {} frames, early heap {:?} used/free)",
            baseline as i64 - now as i64,
            large_before,
            heap::large_frames(),
            heap::usage()
        );
    }
    // The frame allocator's ownership bits: a frame freed twice (refused) or found in
    // the free lists while still out (skipped) is a kernel bug even when nothing leaked.
    let misuse = panda_platform::frame::misuse();
    let poisoned = panda_platform::frame::poison::hits();
    let owned_once = misuse == Default::default() && poisoned == 0;
    if poisoned > 0 {
        console!("FAIL frames_untouched_while_free: {poisoned} frames were written while free or pooled (mm.poison=on; the first are logged)");
    }
    if misuse != Default::default() {
        console!(
            "FAIL frames_owned_once: {} frees of frames that were not out (refused), {} frames found free while still out (skipped); the first are logged with a backtrace",
            misuse.double_frees,
            misuse.double_allocs
        );
    }
    // Every process's memory charge matched the frames it held and came back to zero.
    let account_errors = aspace::account_errors();
    if account_errors != 0 {
        console!("FAIL memory_accounts_balanced: {account_errors} memory-accounting errors (logged as they happened)");
    }
    match status {
        _ if now != baseline || !heap_ok || !owned_once || account_errors != 0 => {
            power::Outcome::KernelFailure
        }
        0 => power::Outcome::Success,
        process::KILLED => power::Outcome::ProgramKilled,
        _ => power::Outcome::ProgramFailed,
    }
}

/// Kernel heap bytes a finished workload may leave in use besides the frame
/// allocator's bookkeeping: capacity kept by tables that grew (the shootdown page list,
/// the timer and process tables' root nodes).
const HEAP_SLACK: u64 = 64 * 1024;

/// Heap bytes one frame-allocator bookkeeping entry may cost (a B-tree entry of 16-24
/// bytes with its share of node overhead, rounded up).
pub(crate) const BOOKKEEPING_ENTRY_BYTES: u64 = 48;

static BOOT: spin::Once<BootInfo> = spin::Once::new();
static TABLES: spin::Once<kernel_tables::KernelTables> = spin::Once::new();

/// Where APs go once they are up: their executor loop.
fn ap_main(_index: usize) -> ! {
    executor::run_this_cpu()
}

/// Stops the machine after an unexpected trap has been reported.
fn fatal_stop() -> ! {
    panda_arch::smp::stop_others();
    power::exit(false)
}

static PANICKING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, core::sync::atomic::Ordering::SeqCst) {
        // A panic while reporting a panic: stop without more output.
        power::exit(false)
    }
    panda_arch::smp::stop_others();
    let cpu = panda_arch::percpu::checked_index().unwrap_or(usize::MAX);
    let rbp = panda_arch::backtrace::current_rbp();
    panda_arch::serial::emergency(|w| {
        match info.location() {
            Some(l) => {
                let _ = writeln!(
                    w,
                    "PANIC on cpu{cpu} at {}:{}:{}: {}",
                    l.file(),
                    l.line(),
                    l.column(),
                    info.message()
                );
            }
            None => {
                let _ = writeln!(w, "PANIC on cpu{cpu}: {}", info.message());
            }
        }
        let _ = panda_arch::backtrace::write(w, 0, rbp);
    });
    power::exit(false)
}
