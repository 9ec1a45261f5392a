//! In-kernel tests, run when the command line says `test`.
//!
//! Each test prints `ok NAME` or `FAIL NAME: reason` on its own line, and the run ends
//! with `N passed, M failed`, the format `scripts/test.sh` and CI read. Tests check the
//! machine the kernel actually built: boot information, the permissions of its own page
//! tables (by probing, through the exception table, what faults and what does not),
//! exception delivery, the clock, CPUs and IPIs, locks, the executor, frames, zeroing,
//! address spaces and shootdowns, and ring 3. `test.filter=TEXT` runs only the tests
//! whose name contains TEXT (e.g. `test test.filter=mm_`). `test.inject_failure` adds a test that fails, to
//! prove the harness and the scripts notice.

// Failures carry their message inline (formatting needs no allocation on a failing
// path); the size only matters on this test path.
#![allow(clippy::result_large_err)]

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt::Write;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicU64, Ordering};

use panda_arch::frame;
use panda_arch::percpu;
use panda_arch::probe::{self, RetIn};
use panda_arch::trap::TrapFrame;

use crate::boot::{BootInfo, MemoryKind, MemoryMap};
use crate::console;
use crate::kernel_tables::KernelTables;

/// A failure message, formatted without a heap.
pub struct Failure {
    buf: [u8; 160],
    len: usize,
}

impl Failure {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf8>")
    }
}

impl Write for Failure {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

type Outcome = Result<(), Failure>;

fn fail(args: core::fmt::Arguments<'_>) -> Failure {
    let mut f = Failure {
        buf: [0; 160],
        len: 0,
    };
    let _ = f.write_fmt(args);
    f
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(fail(format_args!($($arg)*)));
        }
    };
}

struct Context<'a> {
    boot: &'a BootInfo,
    tables: &'a KernelTables,
    /// Enabled processors the MADT lists: all must be online.
    cpus_expected: usize,
}

type Test = (&'static str, fn(&Context<'_>) -> Outcome);

/// Each test by its function name, which is also its name in the output.
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as fn(&Context<'_>) -> Outcome)),*]
    };
}

const TESTS: &[Test] = tests![
    boot_info_memory_map,
    boot_info_hhdm_and_rsdp,
    boot_info_kernel_claimed,
    memory_map_claim_splits,
    memory_map_usable_never_covers_reserved,
    paging_kernel_tables_active,
    paging_text_is_read_only,
    paging_rodata_is_read_only,
    paging_data_is_writable,
    paging_only_text_executes,
    paging_stack_guard_pages_unmapped,
    paging_lower_half_empty,
    paging_hhdm_covers_usable_ram,
    paging_kernel_half_shared_slots,
    cpu_protection_bits,
    trap_breakpoint_resumes,
    trap_invalid_opcode_reported,
    trap_tss_loaded,
    clock_monotonic_and_calibrated,
    smp_all_cpus_online,
    smp_ids_unique_and_dense,
    smp_ipi_ping_every_cpu,
    smp_cross_cpu_call,
    smp_cross_cpu_call_on_a_set,
    smp_timer_ticks_on_every_cpu,
    heap_alloc_free_returns_memory,
    locks_out_of_order_are_named,
];

type AsyncTest = (
    &'static str,
    fn() -> Pin<Box<dyn Future<Output = Outcome> + Send>>,
);

/// Tests that run as tasks on the executor (they spawn and await other tasks).
macro_rules! async_tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), || Box::pin($test()) as Pin<Box<dyn Future<Output = Outcome> + Send>>)),*]
    };
}

const ASYNC_TESTS: &[AsyncTest] = async_tests![
    sched_every_cpu_runs_pinned_tasks,
    smp_cross_cpu_calls_both_ways_under_load,
    sched_ten_thousand_tasks_with_stealing,
    sched_sleep_wakes_no_earlier_than_asked,
    mm_zero_pools_fill_when_idle,
    mm_idle_cpus_top_up_busy_cpus_pools,
    mm_every_zero_method_clears_every_byte,
    mm_frames_return_to_baseline,
    mm_exhaustion_fails_cleanly,
    mm_address_space_regions_and_faults,
    mm_unmap_is_seen_by_another_cpu,
    mm_unmapped_frames_stay_in_use_until_every_cpu_flushed,
    mm_shootdowns_of_two_spaces_run_in_parallel,
    mm_shootdowns_of_one_space_run_in_parallel,
    mm_switching_spaces_leaves_the_old_active_set,
    mm_fault_under_exhaustion_fails_cleanly,
    user_mode_round_trips,
    user_sse_state_is_per_thread,
    user_process_syscalls_faults_and_exit,
    user_fault_awaits_the_zeroing_task,
    mm_measure,
];

/// Runs every test (as a task on the boot CPU); true when all passed.
pub async fn run_all(boot: &BootInfo, tables: &KernelTables, cpus_expected: usize) -> bool {
    let ctx = Context {
        boot,
        tables,
        cpus_expected,
    };
    let inject = boot.has_flag("test.inject_failure");
    let injected: Test = ("injected_failure", |_| {
        Err(fail(format_args!("test.inject_failure was given")))
    });
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut record = |name: &str, outcome: Outcome| match outcome {
        Ok(()) => {
            passed += 1;
            console!("ok {name}");
        }
        Err(why) => {
            failed += 1;
            console!("FAIL {name}: {}", why.as_str());
        }
    };
    // `test.filter=TEXT` runs only the tests whose name contains TEXT.
    let filter = boot.option("test.filter").unwrap_or("");
    let chosen = |name: &str| name.contains(filter);
    for (name, test) in TESTS.iter().filter(|(n, _)| chosen(n)) {
        record(name, test(&ctx));
        // Each synchronous test is one poll: let the executor come round between them
        // (the watchdog reports a poll that never returns).
        if let Some(exec) = crate::executor::get() {
            exec.yield_now().await;
        }
    }
    for (name, test) in ASYNC_TESTS.iter().filter(|(n, _)| chosen(n)) {
        record(name, test().await);
    }
    // Last, so that it covers every test before it (a filtered run may be too short
    // for the watchdog to have looked, so it runs only when chosen too).
    if chosen("watchdog_watched_the_whole_run") {
        record(
            "watchdog_watched_the_whole_run",
            watchdog_watched_the_whole_run(&ctx),
        );
    }
    if inject {
        record(injected.0, (injected.1)(&ctx));
    }
    console!("{passed} passed, {failed} failed");
    failed == 0
}

/// The watchdog ran through the tests (unless `watchdog=off`) without firing, and how
/// close a CPU came to its limit is in the log, to judge the limit's margin.
fn watchdog_watched_the_whole_run(ctx: &Context<'_>) -> Outcome {
    let limit = panda_arch::watchdog::limit_ns();
    let quiet = panda_arch::watchdog::longest_quiet_ns();
    log::info!(target: "watchdog", "longest a CPU went without a timer tick while watched: {} ms (limit {} ms)", quiet / 1_000_000, limit / 1_000_000);
    if ctx.boot.option("watchdog") == Some("off") {
        ensure!(limit == 0, "watchdog=off, yet the watchdog runs");
        return Ok(());
    }
    ensure!(limit != 0, "the watchdog is not running");
    ensure!(
        quiet > 0 && quiet < limit,
        "longest quiet time {quiet} ns, limit {limit} ns"
    );
    Ok(())
}

fn boot_info_memory_map(ctx: &Context<'_>) -> Outcome {
    let map = &ctx.boot.memory_map;
    ensure!(
        map.check().is_ok(),
        "memory map invariant broken: {:?}",
        map.check()
    );
    let usable = map.total(MemoryKind::Usable);
    ensure!(usable >= 16 << 20, "only {usable} bytes usable");
    ensure!(map.total_ram() >= usable, "RAM total below usable total");
    Ok(())
}

fn boot_info_hhdm_and_rsdp(ctx: &Context<'_>) -> Outcome {
    ensure!(
        ctx.boot.hhdm_offset == panda_arch::HHDM_BASE,
        "HHDM at {:#x}",
        ctx.boot.hhdm_offset
    );
    let rsdp = ctx
        .boot
        .rsdp
        .ok_or_else(|| fail(format_args!("no RSDP from the bootloader")))?;
    let mut sig = [0u8; 8];
    probe::read_bytes(ctx.boot.hhdm_offset + rsdp, &mut sig).map_err(|f| {
        fail(format_args!(
            "RSDP at {rsdp:#x} unreadable through the HHDM: {f:?}"
        ))
    })?;
    ensure!(&sig == b"RSD PTR ", "RSDP signature is {sig:?}");
    ensure!(
        ctx.boot.has_flag("test"),
        "command line {:?} lacks `test`",
        ctx.boot.cmdline.as_str()
    );
    Ok(())
}

fn boot_info_kernel_claimed(ctx: &Context<'_>) -> Outcome {
    let image = panda_arch::boot::kernel_image();
    let (start, end) = (
        ctx.boot.kernel_virt_to_phys(image.start),
        ctx.boot.kernel_virt_to_phys(image.end),
    );
    for r in ctx.boot.memory_map.regions() {
        let overlaps = r.start < end && start < r.end;
        ensure!(
            !(overlaps && r.kind == MemoryKind::Usable),
            "kernel image [{start:#x},{end:#x}) overlaps usable {r:?}"
        );
    }
    Ok(())
}

fn memory_map_claim_splits(_: &Context<'_>) -> Outcome {
    let mut map = MemoryMap::new();
    let _ = map.add(0x10_0000, 0x80_0000, MemoryKind::Usable);
    let _ = map.claim(0x20_0000, 0x30_0000, MemoryKind::KernelAndModules);
    let _ = map.claim(0x30_0000, 0x30_1000, MemoryKind::BootloaderReclaimable);
    let r = map.regions();
    ensure!(r.len() == 4, "expected 4 regions, got {r:?}");
    ensure!(
        r[0].start == 0x10_0000 && r[0].end == 0x20_0000 && r[0].kind == MemoryKind::Usable,
        "{:?}",
        r[0]
    );
    ensure!(
        r[1].kind == MemoryKind::KernelAndModules && r[1].end == 0x30_0000,
        "{:?}",
        r[1]
    );
    ensure!(
        r[2].kind == MemoryKind::BootloaderReclaimable && r[2].end == 0x30_1000,
        "{:?}",
        r[2]
    );
    ensure!(
        r[3].start == 0x30_1000 && r[3].end == 0x80_0000 && r[3].kind == MemoryKind::Usable,
        "{:?}",
        r[3]
    );
    ensure!(map.check().is_ok(), "invariant broken");
    Ok(())
}

fn memory_map_usable_never_covers_reserved(_: &Context<'_>) -> Outcome {
    let mut map = MemoryMap::new();
    let _ = map.add(0x9_f000, 0xa_0000, MemoryKind::Reserved);
    let _ = map.add(0x0, 0xa_0000, MemoryKind::Usable);
    let _ = map.add(0x10_0000, 0x200_0000, MemoryKind::Usable);
    let _ = map.add(0x100_0000, 0x100_0800, MemoryKind::AcpiNvs);
    ensure!(map.check().is_ok(), "invariant broken: {map:?}");
    for r in map.regions() {
        let covers = |a: u64| r.start <= a && a < r.end;
        ensure!(
            !(r.kind == MemoryKind::Usable && (covers(0x9_f000) || covers(0x100_0400))),
            "usable covers reserved: {map:?}"
        );
    }
    ensure!(
        map.total(MemoryKind::Usable) == 0x9_f000 + 0x1f0_0000 - 0x1000,
        "usable total {:#x}",
        map.total(MemoryKind::Usable)
    );
    Ok(())
}

fn paging_kernel_tables_active(ctx: &Context<'_>) -> Outcome {
    let active = panda_arch::paging::active_root();
    ensure!(
        active == ctx.tables.root,
        "CR3 {active:#x}, kernel tables at {:#x}",
        ctx.tables.root
    );
    let early = ctx.boot.memory_map.total(MemoryKind::KernelEarly);
    let expected = ctx.tables.table_bytes + ctx.tables.reserve_bytes;
    // AP stacks and the trampoline page are claimed as KernelEarly too.
    ensure!(
        early >= expected,
        "{early} bytes claimed early, but tables use or reserve {expected}"
    );
    let root_claimed =
        ctx.boot.memory_map.regions().iter().any(|r| {
            r.kind == MemoryKind::KernelEarly && (r.start..r.end).contains(&ctx.tables.root)
        });
    ensure!(
        root_claimed,
        "the PML4 frame {:#x} is not claimed",
        ctx.tables.root
    );
    Ok(())
}

fn expect_write_fault(what: &str, addr: u64) -> Outcome {
    // Write the byte's own value: if the write wrongly succeeds, nothing is corrupted
    // and the remaining tests still run.
    let mut current = [0u8; 1];
    probe::read_bytes(addr, &mut current)
        .map_err(|f| fail(format_args!("{what} at {addr:#x} unreadable: {f:?}")))?;
    match probe::write_u8(addr, current[0]) {
        Ok(()) => Err(fail(format_args!(
            "writing {what} at {addr:#x} did not fault"
        ))),
        Err(f) => {
            ensure!(
                f.vector == 14 && f.protection() && f.write(),
                "wrong fault {f:?}"
            );
            ensure!(
                f.address == addr,
                "cr2 {:#x}, expected {addr:#x}",
                f.address
            );
            Ok(())
        }
    }
}

fn paging_text_is_read_only(_: &Context<'_>) -> Outcome {
    let image = panda_arch::boot::kernel_image();
    expect_write_fault(".text", probe::ret_address(RetIn::Text))?;
    expect_write_fault(".text start", image.text.0)
}

fn paging_rodata_is_read_only(_: &Context<'_>) -> Outcome {
    expect_write_fault(".rodata", probe::ret_address(RetIn::Rodata))?;
    let image = panda_arch::boot::kernel_image();
    expect_write_fault(".rodata end", image.rodata.1 - 1)
}

static DATA_CELL: AtomicU64 = AtomicU64::new(7);

fn paging_data_is_writable(_: &Context<'_>) -> Outcome {
    let addr = DATA_CELL.as_ptr() as u64;
    // The probe writes the low byte: 7 becomes 0x2a.
    probe::write_u8(addr, 0x2a).map_err(|f| fail(format_args!("write to .data faulted: {f:?}")))?;
    let now = DATA_CELL.load(Ordering::SeqCst);
    ensure!(now == 0x2a, "wrote 0x2a, read back {now:#x}");
    Ok(())
}

fn paging_only_text_executes(_: &Context<'_>) -> Outcome {
    probe::exec_ret_in(RetIn::Text)
        .map_err(|f| fail(format_args!("ret in .text faulted: {f:?}")))?;
    for kind in [RetIn::Rodata, RetIn::Data] {
        match probe::exec_ret_in(kind) {
            Ok(()) => return Err(fail(format_args!("executed a ret in {kind:?}: NX missing"))),
            Err(f) => ensure!(f.fetch() && f.protection(), "{kind:?}: wrong fault {f:?}"),
        }
    }
    Ok(())
}

fn paging_stack_guard_pages_unmapped(_: &Context<'_>) -> Outcome {
    let stacks = panda_arch::stacks::boot_stacks();
    for guard in stacks.guards() {
        match probe::read_u64(guard + 8) {
            Ok(_) => return Err(fail(format_args!("guard page {guard:#x} is mapped"))),
            Err(f) => ensure!(
                f.vector == 14 && !f.protection() && f.address == guard + 8,
                "wrong fault {f:?}"
            ),
        }
        // The stack right above the guard is mapped.
        probe::read_u64(guard + 4096)
            .map_err(|f| fail(format_args!("stack above {guard:#x} unmapped: {f:?}")))?;
    }
    Ok(())
}

fn paging_lower_half_empty(_: &Context<'_>) -> Outcome {
    for addr in [
        0u64,
        0x1000,
        0x20_0000,
        0x40_0000,
        0x1_0000_0000,
        0x7fff_ffff_f000,
    ] {
        ensure!(
            probe::read_u64(addr).is_err(),
            "lower-half address {addr:#x} is mapped"
        );
    }
    Ok(())
}

fn paging_hhdm_covers_usable_ram(ctx: &Context<'_>) -> Outcome {
    let root = panda_arch::paging::active_root();
    for r in ctx
        .boot
        .memory_map
        .regions()
        .iter()
        .filter(|r| r.kind.is_ram())
    {
        for phys in [r.start, r.end - 8] {
            let virt = ctx.boot.hhdm_offset + phys;
            let (p, bits) = panda_arch::paging::translate_in(root, ctx.boot.hhdm_offset, virt)
                .ok_or_else(|| fail(format_args!("HHDM misses {phys:#x} ({:?})", r.kind)))?;
            ensure!(p == phys, "HHDM maps {virt:#x} to {p:#x}");
            ensure!(
                bits & panda_arch::paging::flags::NO_EXECUTE != 0,
                "HHDM page {phys:#x} is executable"
            );
        }
    }
    Ok(())
}

fn paging_kernel_half_shared_slots(ctx: &Context<'_>) -> Outcome {
    let root = ctx.tables.root;
    for slot in 256..512u64 {
        let entry = panda_arch::paging::read_phys_u64(ctx.boot.hhdm_offset, root + slot * 8)
            .ok_or_else(|| fail(format_args!("PML4 unreadable")))?;
        ensure!(
            entry & 1 != 0,
            "PML4 slot {slot} is empty: the kernel half would not be shared"
        );
    }
    for slot in 0..256u64 {
        let entry =
            panda_arch::paging::read_phys_u64(ctx.boot.hhdm_offset, root + slot * 8).unwrap_or(1);
        ensure!(entry == 0, "PML4 slot {slot} (lower half) is {entry:#x}");
    }
    Ok(())
}

fn cpu_protection_bits(_: &Context<'_>) -> Outcome {
    let f = panda_arch::cpu::features();
    let (cr0, cr4, efer) = panda_arch::cpu::control_registers();
    ensure!(cr0 & (1 << 16) != 0, "CR0.WP is off");
    ensure!(
        !f.nx || efer & (1 << 11) != 0,
        "EFER.NXE is off though the CPU has NX"
    );
    ensure!(
        !f.smep || cr4 & (1 << 20) != 0,
        "CR4.SMEP is off though the CPU has SMEP"
    );
    ensure!(
        !f.smap || cr4 & (1 << 21) != 0,
        "CR4.SMAP is off though the CPU has SMAP"
    );
    Ok(())
}

static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

fn count_breakpoint(frame: &mut TrapFrame) {
    // int3 is a trap: RIP already points past it, so returning resumes execution.
    BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
    let _ = frame;
}

fn trap_breakpoint_resumes(_: &Context<'_>) -> Outcome {
    panda_arch::trap::set_handler(3, count_breakpoint);
    let before = BREAKPOINTS.load(Ordering::SeqCst);
    panda_arch::cpu::breakpoint();
    panda_arch::cpu::breakpoint();
    panda_arch::trap::clear_handler(3);
    let seen = BREAKPOINTS.load(Ordering::SeqCst) - before;
    ensure!(seen == 2, "handler saw {seen} breakpoints, expected 2");
    Ok(())
}

fn trap_invalid_opcode_reported(_: &Context<'_>) -> Outcome {
    match probe::invalid_opcode() {
        Ok(()) => Err(fail(format_args!("ud2 did not trap"))),
        Err(f) => {
            ensure!(f.vector == 6, "ud2 raised vector {}", f.vector);
            Ok(())
        }
    }
}

fn trap_tss_loaded(_: &Context<'_>) -> Outcome {
    let tr = panda_arch::gdt::task_register();
    ensure!(tr == 0x28, "task register is {tr:#x}");
    Ok(())
}

fn clock_monotonic_and_calibrated(_: &Context<'_>) -> Outcome {
    let hz = panda_arch::time::tsc_hz();
    ensure!(
        (100_000_000..20_000_000_000).contains(&hz),
        "TSC frequency {hz} Hz is implausible"
    );
    let a = panda_arch::time::now_ns();
    let mut spin = 0u64;
    while panda_arch::time::now_ns() == a && spin < 100_000_000 {
        spin += 1;
    }
    let b = panda_arch::time::now_ns();
    ensure!(b > a, "clock did not advance ({a} -> {b})");
    Ok(())
}

/// Waits up to `ms` milliseconds (TSC) for `done`.
fn wait_for(ms: u64, done: impl Fn() -> bool) -> bool {
    let deadline = panda_arch::time::now_ns() + ms * 1_000_000;
    while panda_arch::time::now_ns() < deadline {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

fn smp_all_cpus_online(ctx: &Context<'_>) -> Outcome {
    let online = percpu::online_count();
    ensure!(
        online == ctx.cpus_expected,
        "{online} CPUs online, the MADT enables {}",
        ctx.cpus_expected
    );
    Ok(())
}

fn smp_ids_unique_and_dense(_: &Context<'_>) -> Outcome {
    let n = percpu::online_count();
    for i in 0..n {
        let cpu = percpu::cpu(i);
        ensure!(
            cpu.online(),
            "cpu{i} of {n} is not online: indices are not dense"
        );
        ensure!(cpu.index() == i, "block {i} says index {}", cpu.index());
        for j in 0..i {
            ensure!(
                percpu::cpu(j).apic_id() != cpu.apic_id(),
                "cpu{j} and cpu{i} share apic id {}",
                cpu.apic_id()
            );
        }
    }
    ensure!(!percpu::cpu(n).online(), "cpu{n} online beyond the count");
    Ok(())
}

fn smp_ipi_ping_every_cpu(_: &Context<'_>) -> Outcome {
    let me = percpu::current_index();
    for cpu in percpu::online().filter(|c| c.index() != me) {
        let before = cpu.wake_ipis.load(Ordering::Relaxed);
        panda_arch::ipi::wake(cpu.index());
        let answered = wait_for(1000, || cpu.wake_ipis.load(Ordering::Relaxed) > before);
        ensure!(
            answered,
            "cpu{} (apic {}) did not take a wake IPI within 1 s",
            cpu.index(),
            cpu.apic_id()
        );
    }
    Ok(())
}

fn report_self(_: u64) -> u64 {
    ((percpu::current_index() as u64) << 32) | panda_arch::apic::id() as u64
}

fn smp_cross_cpu_call(_: &Context<'_>) -> Outcome {
    for cpu in percpu::online() {
        let answer = panda_arch::ipi::call_on(cpu.index(), report_self, 0)
            .map_err(|e| fail(format_args!("call on cpu{}: {e:?}", cpu.index())))?;
        let (index, apic) = ((answer >> 32) as usize, answer as u32);
        ensure!(
            index == cpu.index(),
            "call for cpu{} ran on cpu{index}",
            cpu.index()
        );
        ensure!(
            apic == cpu.apic_id(),
            "cpu{} answered apic id {apic}, expected {}",
            cpu.index(),
            cpu.apic_id()
        );
    }
    Ok(())
}

static SET_CALLS: AtomicU64 = AtomicU64::new(0);

fn count_set_call(_: u64) -> u64 {
    // Each CPU sets its own bit: the result shows exactly which CPUs ran it.
    SET_CALLS.fetch_or(1 << (percpu::current_index() % 64), Ordering::SeqCst);
    0
}

fn smp_cross_cpu_call_on_a_set(_: &Context<'_>) -> Outcome {
    let n = percpu::online_count().min(64);
    SET_CALLS.store(0, Ordering::SeqCst);
    // Every other CPU, the caller included.
    let ran = panda_arch::ipi::call_on_set(|c| c < n && c % 2 == 0, count_set_call, 0);
    let want: u64 = (0..n).filter(|c| c % 2 == 0).map(|c| 1u64 << c).sum();
    let got = SET_CALLS.load(Ordering::SeqCst);
    ensure!(got == want, "set call ran on {got:#b}, wanted {want:#b}");
    ensure!(
        ran == n.div_ceil(2),
        "call_on_set reported {ran} CPUs, expected {}",
        n.div_ceil(2)
    );
    Ok(())
}

fn smp_timer_ticks_on_every_cpu(_: &Context<'_>) -> Outcome {
    let n = percpu::online_count();
    let mut before = [0u64; percpu::MAX_CPUS];
    for (i, b) in before.iter_mut().enumerate().take(n) {
        *b = percpu::cpu(i).ticks.load(Ordering::Relaxed);
    }
    // Two ticks take 20 ms; allow 100 tick periods (1 s) because TCG vCPUs share few
    // host cores.
    let window_ms = 100 * crate::smp::TICK_US / 1000;
    let all = wait_for(window_ms, || {
        (0..n).all(|i| percpu::cpu(i).ticks.load(Ordering::Relaxed) >= before[i] + 2)
    });
    if !all {
        let late = (0..n)
            .find(|&i| percpu::cpu(i).ticks.load(Ordering::Relaxed) < before[i] + 2)
            .unwrap_or(0);
        return Err(fail(format_args!(
            "cpu{late} took fewer than 2 timer ticks in {window_ms} ms"
        )));
    }
    Ok(())
}

/// The lock-order checker: with a rank-60 lock held, taking a rank-30 one is an
/// inversion (named), a rank-65 one is not; a call served meanwhile starts afresh.
fn locks_out_of_order_are_named(_: &Context<'_>) -> Outcome {
    use panda_arch::sync::{nested, order_violation, Mutex, Rank};
    static OUTER: Rank = Rank::new(60, "test outer");
    static INNER: Rank = Rank::new(30, "test inner");
    static LATER: Rank = Rank::new(65, "test later");
    static LOCK: Mutex<()> = Mutex::new(&OUTER, ());
    ensure!(
        order_violation(&INNER).is_none(),
        "a violation with no lock held"
    );
    let guard = LOCK.lock();
    let seen = order_violation(&INNER).map(|r| r.name);
    let later = order_violation(&LATER).map(|r| r.name);
    let served = nested(|| order_violation(&INNER).map(|r| r.name));
    drop(guard);
    let after = order_violation(&INNER).map(|r| r.name);
    ensure!(seen == Some("test outer"), "inversion not named: {seen:?}");
    ensure!(later.is_none(), "a higher rank was refused: {later:?}");
    ensure!(
        served.is_none(),
        "a served call inherited the order: {served:?}"
    );
    ensure!(
        after.is_none(),
        "the lock was still counted after release: {after:?}"
    );
    Ok(())
}

fn heap_alloc_free_returns_memory(_: &Context<'_>) -> Outcome {
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    let cycle = || -> Outcome {
        // Large: a vector of 80 KB (frame runs) and a 4 KiB box; small: boxes of every
        // size class.
        let mut v: Vec<u64> = Vec::new();
        for i in 0..10_000u64 {
            v.push(i * 3);
        }
        let page = Box::new([7u8; 4096]);
        let small: Vec<Box<[u8]>> = (0..400)
            .map(|i| alloc::vec![i as u8; 1 + (i * 7) % 2048].into_boxed_slice())
            .collect();
        ensure!(
            v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3),
            "vector lost data"
        );
        ensure!(page.iter().all(|&x| x == 7), "box lost data");
        for (i, b) in small.iter().enumerate() {
            ensure!(
                b.len() == 1 + (i * 7) % 2048 && b.iter().all(|&x| x == i as u8),
                "small box {i} lost data"
            );
        }
        Ok(())
    };
    // Other CPUs' idle zeroing allocates (the buddy's bookkeeping) from their own
    // slabs; pause it so the page count reflects this test.
    let _paused = crate::memory::pause_zeroing();
    cycle()?;
    let pages = crate::heap::slab_pages();
    let (early_before, _) = crate::heap::usage();
    for _ in 0..20 {
        cycle()?;
    }
    let pages_after = crate::heap::slab_pages();
    // A page or two of slack: the buddy allocator's own bookkeeping may settle into a
    // slightly different shape. Without reuse the count grows by thousands.
    ensure!(
        pages_after <= pages + 2,
        "slab pages grew from {pages} to {pages_after}: freed objects are not reused"
    );
    // The early heap serves only what the frame allocator's own bookkeeping allocates
    // while it holds its locks; that comes and goes but must not accumulate.
    let (early_after, _) = crate::heap::usage();
    ensure!(
        early_after <= early_before + 4096,
        "early heap grew from {early_before} to {early_after} bytes over 20 cycles"
    );
    Ok(())
}

fn executor() -> Result<&'static panda_sched::Executor<crate::executor::Machine>, Failure> {
    crate::executor::get().ok_or_else(|| fail(format_args!("no executor")))
}

fn report_cpu() -> usize {
    percpu::current_index()
}

/// A call that takes a while, so the IPI announcing it usually arrives while the
/// target is already running it from its own waiting loop.
fn slow_call(x: u64) -> u64 {
    let until = panda_arch::time::now_ns() + 20_000;
    while panda_arch::time::now_ns() < until {
        core::hint::spin_loop();
    }
    x + 1
}

/// Every CPU calls every other at once, many times: each caller serves its own mailbox
/// while it waits, and the IPI for that very call arrives meanwhile. A call must run
/// exactly once and leave the mailbox free (a mailbox left busy makes the next caller
/// spin for ever: a hang at -smp 8 under concurrent shootdowns came from that).
async fn smp_cross_cpu_calls_both_ways_under_load() -> Outcome {
    use core::sync::atomic::AtomicUsize;
    static RAN: AtomicUsize = AtomicUsize::new(0);
    let exec = executor()?;
    // At most 8 CPUs take part (two are enough for the race): at -smp 64 under TCG on
    // a 2-core host, 63 callers queueing for one vCPU that runs 1/32 of the time can
    // wait longer than the watchdog allows, which is the host's overcommit, not a hang.
    let n = exec.cpu_count().min(8);
    if n < 2 {
        return Ok(());
    }
    let rounds = 200;
    let before = RAN.load(Ordering::SeqCst);
    let mut handles = Vec::new();
    for cpu in 0..n {
        handles.push(exec.spawn_pinned(cpu, async move {
            let mut wrong = 0u64;
            for i in 0..rounds {
                let target = (cpu + 1 + (i as usize % (n - 1))) % n;
                match panda_arch::ipi::call_on(target, slow_call, i) {
                    Ok(r) if r == i + 1 => {}
                    _ => wrong += 1,
                }
                RAN.fetch_add(1, Ordering::SeqCst);
                // Often enough that the executor comes round well within the
                // watchdog's limit even when each call waits for a descheduled vCPU.
                if i % 4 == 0 {
                    exec.yield_now().await;
                }
            }
            wrong
        }));
    }
    let mut wrong = 0;
    for h in handles {
        wrong += h.await;
    }
    ensure!(wrong == 0, "{wrong} calls returned a wrong result");
    let ran = RAN.load(Ordering::SeqCst) - before;
    let want = n * rounds as usize;
    ensure!(ran == want, "{ran} calls finished, expected {want}");
    let busy = (0..n).find(|&c| !panda_arch::ipi::mailbox_idle(c));
    ensure!(
        busy.is_none(),
        "cpu{} mailbox left busy after every call returned",
        busy.unwrap_or(0)
    );
    Ok(())
}

async fn sched_every_cpu_runs_pinned_tasks() -> Outcome {
    let exec = executor()?;
    for cpu in 0..exec.cpu_count() {
        // A pinned task on an idle CPU runs only if the wake-up IPI reaches it.
        let ran_on = exec.spawn_pinned(cpu, async { report_cpu() }).await;
        ensure!(ran_on == cpu, "task pinned to cpu{cpu} ran on cpu{ran_on}");
    }
    Ok(())
}

async fn sched_ten_thousand_tasks_with_stealing() -> Outcome {
    use core::sync::atomic::AtomicUsize;
    static DONE: AtomicUsize = AtomicUsize::new(0);
    let exec = executor()?;
    let stolen_before: u64 = (0..exec.cpu_count()).map(|c| exec.stats(c).stolen).sum();
    let start_done = DONE.load(Ordering::SeqCst);
    const TASKS: usize = 10_000;
    for _ in 0..TASKS {
        // All on this CPU: the others get work only by stealing it.
        exec.spawn(async move {
            exec.yield_now().await;
            exec.yield_now().await;
            DONE.fetch_add(1, Ordering::SeqCst);
        });
    }
    let deadline = panda_arch::time::now_ns() + 60_000_000_000;
    while DONE.load(Ordering::SeqCst) - start_done < TASKS && panda_arch::time::now_ns() < deadline
    {
        exec.yield_now().await;
    }
    let done = DONE.load(Ordering::SeqCst) - start_done;
    ensure!(
        done == TASKS,
        "{done} of {TASKS} tasks completed within 60 s"
    );
    let stolen: u64 = (0..exec.cpu_count())
        .map(|c| exec.stats(c).stolen)
        .sum::<u64>()
        - stolen_before;
    ensure!(
        exec.cpu_count() == 1 || stolen > 0,
        "no task was stolen by another CPU"
    );
    crate::console!(
        "   ({TASKS} tasks, {stolen} stolen across {} CPUs)",
        exec.cpu_count()
    );
    Ok(())
}

async fn sched_sleep_wakes_no_earlier_than_asked() -> Outcome {
    let exec = executor()?;
    for ms in [1u64, 5, 20] {
        let start = panda_arch::time::now_ns();
        exec.sleep(ms * 1_000_000).await;
        let slept = panda_arch::time::now_ns() - start;
        ensure!(
            slept >= ms * 1_000_000,
            "sleep({ms} ms) returned after {slept} ns"
        );
        ensure!(
            slept < ms * 1_000_000 + 1_000_000_000,
            "sleep({ms} ms) took {slept} ns"
        );
    }
    // Sleepers on other CPUs (idle ones wake on their timer tick to fire them).
    let mut handles = alloc::vec::Vec::new();
    for cpu in 0..exec.cpu_count() {
        handles.push(exec.spawn_pinned(cpu, async move {
            let start = panda_arch::time::now_ns();
            exec.sleep(3_000_000).await;
            panda_arch::time::now_ns() - start
        }));
    }
    for (cpu, h) in handles.into_iter().enumerate() {
        let slept = h.await;
        ensure!(
            slept >= 3_000_000,
            "cpu{cpu}: sleep(3 ms) returned after {slept} ns"
        );
    }
    Ok(())
}

/// Each way of zeroing a frame (the boot picks the fastest) clears all 4096 bytes of a
/// frame full of ones, and nothing past it.
async fn mm_every_zero_method_clears_every_byte() -> Outcome {
    let mut pair =
        frame::alloc_run(1).ok_or_else(|| fail(format_args!("no two contiguous frames")))?;
    let ones = [0xffu8; 8192];
    for method in panda_arch::paging::ZeroMethod::ALL {
        pair.write(0, &ones);
        pair.zero_frame_with(0, method);
        let mut word = [0u8; 8];
        for i in 0..512 {
            pair.read(i * 8, &mut word);
            let v = u64::from_le_bytes(word);
            ensure!(
                v == 0,
                "{}: word {i} is {v:#x} after zeroing",
                method.name()
            );
        }
        pair.read(4096, &mut word);
        ensure!(word == [0xff; 8], "{}: wrote past the frame", method.name());
    }
    Ok(())
}

/// A CPU that switches from one user space to another leaves the first one's active
/// set (so the first one's shootdowns no longer interrupt it), and leaves the second
/// one's when it returns to the kernel's tables.
async fn mm_switching_spaces_leaves_the_old_active_set() -> Outcome {
    let cpu = percpu::current_index();
    let a = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let b = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    a.activate();
    let in_a = a.active_cpus().contains(cpu);
    b.activate();
    let (a_after, b_after) = (a.active_cpus().contains(cpu), b.active_cpus().contains(cpu));
    b.deactivate();
    let b_end = b.active_cpus().contains(cpu);
    ensure!(in_a, "activating a did not put cpu{cpu} in its set");
    ensure!(
        !a_after,
        "cpu{cpu} stayed in a's active set after switching to b"
    );
    ensure!(b_after, "activating b did not put cpu{cpu} in its set");
    ensure!(
        !b_end,
        "cpu{cpu} stayed in b's active set after deactivating"
    );
    Ok(())
}

async fn mm_zero_pools_fill_when_idle() -> Outcome {
    let exec = executor()?;
    let deadline = panda_arch::time::now_ns() + 10_000_000_000;
    let want = frame::pool_capacity().min(64);
    let available = |c: usize| frame::pool_stats(c).map_or(0, |s| s.available);
    let full = |c: usize| available(c) >= want;
    while !(0..exec.cpu_count()).all(full) && panda_arch::time::now_ns() < deadline {
        exec.sleep(5_000_000).await;
    }
    for cpu in 0..exec.cpu_count() {
        ensure!(
            full(cpu),
            "cpu{cpu}'s pool has {} zeroed frames after 10 s of idle",
            available(cpu)
        );
    }
    // The frames really are zero: dirty a frame, free it, and check every frame the
    // pools hand out reads zero in full.
    let cpu = percpu::current_index();
    for _ in 0..8 {
        let mut f = frame::try_take_zeroed(cpu)
            .ok_or_else(|| fail(format_args!("pool emptied under the test")))?
            .into_frame();
        let mut word = [0u8; 8];
        for off in (0..4096).step_by(8) {
            f.read(off, &mut word);
            ensure!(
                word == [0; 8],
                "zeroed frame {:#x} has {:#x} at +{off}",
                f.phys(),
                u64::from_le_bytes(word)
            );
        }
        // Dirty it before it goes back (dropped), so a pool that skips zeroing would
        // be caught.
        f.write(100, &[0x5a]);
    }
    Ok(())
}

/// A CPU that never idles never fills its own pool: the idle CPUs must. The next CPU
/// is kept busy by a task that yields until told to stop, its pool is emptied, and
/// while it stays busy its pool must fill again with zeroed frames, from other CPUs.
async fn mm_idle_cpus_top_up_busy_cpus_pools() -> Outcome {
    use core::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    static SPINS: AtomicU64 = AtomicU64::new(0);
    let exec = executor()?;
    let n = exec.cpu_count();
    if n < 2 {
        return Ok(()); // no other CPU to help
    }
    let busy_cpu = (percpu::current_index() + 1) % n;
    STOP.store(false, Ordering::SeqCst);
    SPINS.store(0, Ordering::SeqCst);
    let busy = exec.spawn_pinned(busy_cpu, async move {
        while !STOP.load(Ordering::SeqCst) {
            SPINS.fetch_add(1, Ordering::Relaxed);
            exec.yield_now().await;
        }
    });
    let deadline = panda_arch::time::now_ns() + 1_000_000_000;
    while SPINS.load(Ordering::Relaxed) == 0 && panda_arch::time::now_ns() < deadline {
        exec.sleep(1_000_000).await;
    }
    while let Some(z) = frame::try_take_zeroed(busy_cpu) {
        drop(z);
    }
    let stats = |c: usize| frame::pool_stats(c).unwrap_or_default();
    let (spins, from_others) = (SPINS.load(Ordering::Relaxed), stats(busy_cpu).from_others);
    let want = frame::pool_capacity().min(32);
    let deadline = panda_arch::time::now_ns() + 3_000_000_000;
    while stats(busy_cpu).available < want && panda_arch::time::now_ns() < deadline {
        exec.sleep(5_000_000).await;
    }
    let (available, helped) = (
        stats(busy_cpu).available,
        stats(busy_cpu).from_others - from_others,
    );
    let still_busy = SPINS.load(Ordering::Relaxed) > spins;
    // The frames other CPUs put there read zero.
    let zeroed = frame::try_take_zeroed(busy_cpu)
        .map(|z| z.into_frame().is_zero())
        .unwrap_or(true);
    STOP.store(true, Ordering::SeqCst);
    busy.await;
    ensure!(spins > 0 && still_busy, "cpu{busy_cpu} was not kept busy");
    ensure!(
        available >= want && helped >= want as u64,
        "cpu{busy_cpu}, busy, has {available} zeroed frames ({helped} from other CPUs) after 3 s; want {want}"
    );
    ensure!(
        zeroed,
        "a frame another CPU zeroed for cpu{busy_cpu} is not zero"
    );
    Ok(())
}

async fn mm_frames_return_to_baseline() -> Outcome {
    let exec = executor()?;
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    // Allocate on every CPU, free on the next one (cross-CPU frees). Half of what is
    // free, spread over the CPUs, at most 2000 each.
    let n = exec.cpu_count();
    let per_cpu = (frame::total_free() as usize / 2 / n).min(2000);
    let mut handles = alloc::vec::Vec::new();
    for cpu in 0..n {
        handles.push(exec.spawn_pinned(cpu, async move {
            let mut taken = alloc::vec::Vec::new();
            for _ in 0..per_cpu {
                match frame::alloc() {
                    Some(f) => taken.push(f),
                    None => break,
                }
            }
            taken
        }));
    }
    let mut lists = alloc::vec::Vec::new();
    for h in handles {
        lists.push(h.await);
    }
    // Check before freeing, but free before reporting, so a failure leaks nothing.
    let mut all = alloc::collections::BTreeSet::new();
    let mut shared = None;
    for f in lists.iter().flatten() {
        if !all.insert(f.phys()) {
            shared = Some(f.phys());
        }
    }
    let total = all.len();
    for (cpu, list) in lists.into_iter().enumerate() {
        // Dropped (freed) on the next CPU.
        exec.spawn_pinned((cpu + 1) % n, async move { drop(list) })
            .await;
    }
    ensure!(
        shared.is_none(),
        "frame {:#x} handed out twice",
        shared.unwrap_or(0)
    );
    ensure!(
        total == per_cpu * n,
        "only {total} of {} frames allocated",
        per_cpu * n
    );
    let now = crate::memory::frames_not_in_use();
    ensure!(
        now == baseline,
        "free+pooled frames {now}, baseline {baseline}"
    );
    Ok(())
}

async fn mm_exhaustion_fails_cleanly() -> Outcome {
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let cpu = percpu::current_index();
    let mut taken = alloc::vec::Vec::new();
    while let Some(f) = frame::alloc() {
        taken.push(f);
    }
    let held = taken.len();
    ensure!(held > 1000, "only {held} frames before exhaustion");
    drop(taken);
    let now = crate::memory::frames_not_in_use();
    ensure!(
        now == baseline,
        "after exhaustion: {now} frames, baseline {baseline}"
    );
    crate::console!("   (exhausted after {held} frames on cpu{cpu}; all returned)");
    Ok(())
}

/// Not a pass/fail test: prints medians of the frame paths (docs/MEMORY.md quotes them).
async fn mm_measure() -> Outcome {
    let cpu = percpu::current_index();
    let tsc = panda_arch::cpu::rdtsc;
    let median = |f: &mut dyn FnMut() -> u64| {
        let mut samples = [0u64; 201];
        for s in samples.iter_mut() {
            *s = f();
        }
        samples.sort_unstable();
        panda_arch::time::ticks_to_ns(samples[100])
    };
    let cached = median(&mut || {
        let t = tsc();
        drop(frame::alloc());
        tsc() - t
    });
    let global = median(&mut || {
        let t = tsc();
        drop(frame::alloc_run(0));
        tsc() - t
    });
    let mut f = frame::alloc().ok_or_else(|| fail(format_args!("no frame")))?;
    let zero = median(&mut || {
        let t = tsc();
        f.zero();
        tsc() - t
    });
    drop(f);
    crate::console!(
        "   (median of 201, guest TSC: alloc+free via per-CPU cache {cached} ns, via global buddy {global} ns, zero one 4 KiB frame {zero} ns)"
    );
    // Shootdown round trip: a cross-CPU call that invlpgs one page, to 1 and to 7 CPUs
    // in turn (as AddressSpace::shoot_down does), and a CR3 reload (a full flush of
    // non-global entries; without PCID there is no no-flush switch to compare).
    let n = percpu::online_count();
    let page = panda_abi::HEAP_BASE as u64;
    for targets in [1usize, 7] {
        if n > targets {
            let chosen = |c: usize| c != cpu && c <= targets;
            let ns = median(&mut || {
                let t = tsc();
                panda_arch::ipi::call_on_set(chosen, invlpg_here, page);
                tsc() - t
            });
            crate::console!("   (shootdown round trip to {targets} CPU(s), in parallel: {ns} ns)");
        }
    }
    let cr3 = median(&mut || {
        let t = tsc();
        panda_arch::paging::reload_cr3();
        tsc() - t
    });
    crate::console!(
        "   (CR3 switch with flush: {cr3} ns; PCID {})",
        if panda_arch::cpu::features().pcid {
            "present"
        } else {
            "absent: every switch flushes"
        }
    );
    Ok(())
}

use crate::aspace::{AddressSpace, FaultError};
use panda_mm::region::{Access, FaultDecision, Rights};

/// Reads user memory in the current space, resolving demand faults like a user access.
fn user_read(space: &AddressSpace, addr: u64) -> Result<u64, FaultDecision> {
    match probe::read_user_u64(addr) {
        Ok(v) => Ok(v),
        Err(_) => {
            space.handle_fault(addr, Access::Read).map_err(denied)?;
            probe::read_user_u64(addr).map_err(|_| FaultDecision::OutsideRegions)
        }
    }
}

fn user_write(space: &AddressSpace, addr: u64, value: u64) -> Result<(), FaultDecision> {
    match probe::write_user_u64(addr, value) {
        Ok(()) => Ok(()),
        Err(_) => {
            space.handle_fault(addr, Access::Write).map_err(denied)?;
            probe::write_user_u64(addr, value).map_err(|_| FaultDecision::ProtectionViolation)
        }
    }
}

/// The tests above expect verdicts; running out of memory there is itself a failure,
/// reported as a verdict no test expects.
fn denied(e: FaultError) -> FaultDecision {
    match e {
        FaultError::Denied(d) => d,
        FaultError::OutOfMemory => FaultDecision::DemandZero(Rights {
            write: false,
            execute: false,
        }),
    }
}

async fn mm_fault_under_exhaustion_fails_cleanly() -> Outcome {
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let cpu = percpu::current_index();
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    space.activate();
    let heap = panda_abi::HEAP_BASE as u64;
    let _ = space.set_brk(heap + 0x10_0000).await;
    // Take every free and pooled frame this CPU can reach.
    let mut held = alloc::vec::Vec::new();
    while let Some(f) = frame::alloc() {
        held.push(f);
    }
    while let Some(z) = frame::try_take_zeroed(cpu) {
        held.push(z.into_frame());
    }
    let starved = space.handle_fault(heap + 0x8_0000, Access::Write);
    drop(held);
    let recovered = space.handle_fault(heap + 0x8_0000, Access::Write);
    space.deactivate();
    drop(space);
    let now = crate::memory::frames_not_in_use();
    ensure!(
        starved == Err(FaultError::OutOfMemory),
        "fault under exhaustion gave {starved:?}"
    );
    ensure!(
        recovered == Ok(()),
        "fault after memory returned gave {recovered:?}"
    );
    ensure!(
        now == baseline,
        "{now} frames after the test, baseline {baseline}"
    );
    Ok(())
}

async fn mm_address_space_regions_and_faults() -> Outcome {
    use panda_abi::{ELF_LOAD_BASE, HEAP_BASE, INITIAL_STACK_POINTER, STACK_BASE};
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let outcome: Outcome = async {
        let space = AddressSpace::new().map_err(|e| fail(format_args!("new space: {e:?}")))?;
        space.activate();
        let result: Outcome = async {
            let heap = HEAP_BASE as u64;
            space
                .set_brk(heap + 0x4000)
                .await
                .map_err(|e| fail(format_args!("brk: {e:?}")))?;
            // Demand-zero: a fresh page reads zero, then keeps what is written.
            ensure!(
                user_read(&space, heap + 0x1008) == Ok(0),
                "fresh heap page not zero"
            );
            user_write(&space, heap, 0x1234_5678)
                .map_err(|d| fail(format_args!("heap write: {d:?}")))?;
            ensure!(user_read(&space, heap) == Ok(0x1234_5678), "heap lost data");
            // Shrink to an unaligned break: the page holding it keeps its data, the
            // pages above are gone and read zero when the heap grows again.
            user_write(&space, heap + 0x2000, 0xdead).map_err(|d| fail(format_args!("{d:?}")))?;
            space
                .set_brk(heap + 0x10)
                .await
                .map_err(|e| fail(format_args!("{e:?}")))?;
            ensure!(
                user_read(&space, heap) == Ok(0x1234_5678),
                "shrink lost the break's page"
            );
            ensure!(
                space.translate(heap + 0x2000).is_none(),
                "page above the break still mapped"
            );
            ensure!(
                user_read(&space, heap + 0x2000) == Err(FaultDecision::OutsideRegions),
                "read above the break allowed"
            );
            space
                .set_brk(heap + 0x4000)
                .await
                .map_err(|e| fail(format_args!("{e:?}")))?;
            ensure!(
                user_read(&space, heap + 0x2000) == Ok(0),
                "regrown heap shows old contents"
            );
            // Buffers.
            let buf = space
                .alloc_buffer(8192)
                .map_err(|e| fail(format_args!("{e:?}")))?;
            user_write(&space, buf + 4096, 7).map_err(|d| fail(format_args!("buffer: {d:?}")))?;
            ensure!(user_read(&space, buf + 4096) == Ok(7), "buffer lost data");
            // Stack: top and the 16th MiB, then the guard page.
            let top = INITIAL_STACK_POINTER as u64;
            user_write(&space, top - 8, 1).map_err(|d| fail(format_args!("stack top: {d:?}")))?;
            user_write(&space, STACK_BASE as u64, 2)
                .map_err(|d| fail(format_args!("stack bottom: {d:?}")))?;
            ensure!(
                user_write(&space, STACK_BASE as u64 - 8, 3) == Err(FaultDecision::StackOverflow),
                "stack guard page writable"
            );
            // An ELF-style read-only segment: readable (zero), not writable.
            let base = ELF_LOAD_BASE as u64;
            space
                .add_segment(
                    base,
                    base + 0x1000,
                    Rights {
                        write: false,
                        execute: true,
                    },
                )
                .map_err(|e| fail(format_args!("{e:?}")))?;
            ensure!(user_read(&space, base) == Ok(0), "segment read");
            ensure!(
                user_write(&space, base, 1) == Err(FaultDecision::ProtectionViolation),
                "read-only segment writable"
            );
            // Protect: a writable segment page, written, then made read-only.
            let data = base + 0x1000;
            space
                .add_segment(
                    data,
                    data + 0x1000,
                    Rights {
                        write: true,
                        execute: false,
                    },
                )
                .map_err(|e| fail(format_args!("{e:?}")))?;
            user_write(&space, data, 9).map_err(|d| fail(format_args!("data segment: {d:?}")))?;
            space
                .protect_segment(
                    data,
                    Rights {
                        write: false,
                        execute: false,
                    },
                )
                .map_err(|e| fail(format_args!("protect: {e:?}")))?;
            ensure!(
                probe::write_user_u64(data, 10).is_err(),
                "write allowed after protect (stale TLB or PTE)"
            );
            ensure!(
                user_read(&space, data) == Ok(9),
                "protect lost the page's data"
            );
            // Nothing else is mapped.
            ensure!(
                user_read(&space, 0) == Err(FaultDecision::OutsideRegions),
                "null readable"
            );
            ensure!(
                user_read(&space, 0x1_0000_0000_0000) == Err(FaultDecision::OutsideRegions),
                "hole"
            );
            Ok(())
        }
        .await;
        space.deactivate();
        result
    }
    .await;
    // The space is dropped: every frame and table page must be back.
    let now = crate::memory::frames_not_in_use();
    outcome?;
    ensure!(
        now == baseline,
        "after tear-down {now} frames, baseline {baseline}: leak"
    );
    Ok(())
}

static SHARED_SPACE: spin::Mutex<Option<alloc::sync::Arc<AddressSpace>>> = spin::Mutex::new(None);

/// Runs on another CPU (cross-CPU call): enters the shared space, reads `addr`.
/// Returns the value, or u64::MAX if the read faulted.
fn read_on_this_cpu(addr: u64) -> u64 {
    // Enter only once: a CR3 reload would flush the TLB and hide a missing shootdown.
    if let Some(space) = SHARED_SPACE.lock().as_ref() {
        if !space.is_current() {
            space.activate();
        }
    }
    probe::read_user_u64(addr).unwrap_or(u64::MAX)
}

fn leave_shared_space(_: u64) -> u64 {
    if let Some(space) = SHARED_SPACE.lock().as_ref() {
        space.deactivate();
    }
    0
}

async fn mm_unmap_is_seen_by_another_cpu() -> Outcome {
    let exec = executor()?;
    if exec.cpu_count() < 2 {
        crate::console!("   (needs 2 CPUs: skipped)");
        return Ok(());
    }
    let heap = panda_abi::HEAP_BASE as u64;
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    *SHARED_SPACE.lock() = Some(space.clone());
    space.activate();
    let result: Outcome = async {
        space
            .set_brk(heap + 0x1000)
            .await
            .map_err(|e| fail(format_args!("{e:?}")))?;
        user_write(&space, heap, 0x5eed).map_err(|d| fail(format_args!("{d:?}")))?;
        // CPU 1 enters the space and reads the page: its TLB now holds the translation.
        let seen = panda_arch::ipi::call_on(1, read_on_this_cpu, heap)
            .map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(seen == 0x5eed, "cpu1 read {seen:#x}");
        // Unmap here while CPU 1 still runs the space.
        space
            .set_brk(heap)
            .await
            .map_err(|e| fail(format_args!("{e:?}")))?;
        let after = panda_arch::ipi::call_on(1, read_on_this_cpu, heap)
            .map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(
            after == u64::MAX,
            "cpu1 still read {after:#x} through a stale TLB entry after the unmap"
        );
        Ok(())
    }
    .await;
    let _ = panda_arch::ipi::call_on(1, leave_shared_space, 0);
    space.deactivate();
    *SHARED_SPACE.lock() = None;
    result
}

/// Two spaces on two CPUs, each shrinking its heap over and over: their shootdowns
/// must be in flight at the same time (no global shootdown lock).
async fn mm_shootdowns_of_two_spaces_run_in_parallel() -> Outcome {
    shootdowns_run_in_parallel(false).await
}

/// Two threads of one space on two CPUs, each freeing buffers over and over: no lock of
/// the space is held across a shootdown's wait, so both are in flight at once.
async fn mm_shootdowns_of_one_space_run_in_parallel() -> Outcome {
    shootdowns_run_in_parallel(true).await
}

/// Tasks pinned on CPUs 0 and 1 unmap pages in a loop (`shared`: buffers of one space
/// both run; otherwise heap shrinks of a space each) until two shootdowns were seen in
/// flight at once, or 20 s pass.
async fn shootdowns_run_in_parallel(shared: bool) -> Outcome {
    use core::sync::atomic::AtomicBool;
    static DONE: AtomicBool = AtomicBool::new(false);
    let exec = executor()?;
    if exec.cpu_count() < 2 {
        crate::console!("   (needs 2 CPUs: skipped)");
        return Ok(());
    }
    let one = if shared {
        Some(AddressSpace::new().map_err(|e| fail(format_args!("no space: {e:?}")))?)
    } else {
        None
    };
    crate::aspace::take_most_shootdowns_in_flight();
    DONE.store(false, Ordering::SeqCst);
    let mut handles = Vec::new();
    for cpu in 0..2 {
        let one = one.clone();
        handles.push(exec.spawn_pinned(cpu, async move {
            let space = match one {
                Some(space) => space,
                None => AddressSpace::new().map_err(|_| "no space")?,
            };
            space.activate();
            let deadline = panda_arch::time::now_ns() + 20_000_000_000;
            let mut result = Ok(());
            while !DONE.load(Ordering::SeqCst) && panda_arch::time::now_ns() < deadline {
                if let Err(why) = unmap_eight_pages(&space, shared).await {
                    result = Err(why);
                    break;
                }
                if crate::aspace::most_shootdowns_in_flight() >= 2 {
                    DONE.store(true, Ordering::SeqCst);
                }
                // Let the executor come round (a failing run loops for 20 s).
                exec.yield_now().await;
            }
            space.deactivate();
            result
        }));
    }
    for h in handles {
        h.await
            .map_err(|why| fail(format_args!("an unmapping task failed: {why}")))?;
    }
    let most = crate::aspace::take_most_shootdowns_in_flight();
    let what = if shared { "one space's" } else { "two spaces'" };
    ensure!(
        most >= 2,
        "{what} shootdowns never ran at once in 20 s (most in flight: {most})"
    );
    Ok(())
}

/// Maps eight pages (a buffer, or the heap) by writing them, then unmaps them (buffer
/// free or heap shrink), which shoots them down.
async fn unmap_eight_pages(space: &AddressSpace, buffer: bool) -> Result<(), &'static str> {
    let base = if buffer {
        space.alloc_buffer(8 * 0x1000).map_err(|_| "buffer")?
    } else {
        let heap = panda_abi::HEAP_BASE as u64;
        space.set_brk(heap + 8 * 0x1000).await.map_err(|_| "brk")?;
        heap
    };
    for page in 0..8 {
        user_write(space, base + page * 0x1000, page).map_err(|_| "fault")?;
    }
    if buffer {
        space.free_buffer(base).map_err(|_| "free")
    } else {
        space.set_brk(base).await.map(|_| ()).map_err(|_| "shrink")
    }
}

/// The frames a shrink is about to unmap, for the flush probe.
static PROBED: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
/// Bit per CPU whose flush ran the probe, and how many probed frames were already free.
static PROBE_CPUS: AtomicU64 = AtomicU64::new(0);
static PROBE_FREED_EARLY: AtomicU64 = AtomicU64::new(0);

/// Runs inside each CPU's shootdown flush, before it flushes: until this returns, the
/// CPU may still use the old translations, so none of the frames may be free yet.
fn probe_frames_still_in_use() {
    for f in PROBED.iter().map(|f| f.load(Ordering::SeqCst)) {
        if f != 0 && !frame::is_in_use(f) {
            PROBE_FREED_EARLY.fetch_add(1, Ordering::SeqCst);
        }
    }
    PROBE_CPUS.fetch_or(1 << (percpu::current_index() % 64), Ordering::SeqCst);
}

/// A frame is reused only after every CPU that may cache its translation flushed: a
/// probe run inside each CPU's flush (so that CPU's acknowledgement waits for it) finds
/// every unmapped frame still in use, and they are free once the shrink returns.
async fn mm_unmapped_frames_stay_in_use_until_every_cpu_flushed() -> Outcome {
    let exec = executor()?;
    if exec.cpu_count() < 2 {
        crate::console!("   (needs 2 CPUs: skipped)");
        return Ok(());
    }
    // No idle zeroing: a CPU's flush then never interrupts its own refill holding
    // its frame cache's lock, which the probe takes.
    let _paused = crate::memory::pause_zeroing();
    let heap = panda_abi::HEAP_BASE as u64;
    let pages = PROBED.len() as u64;
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    *SHARED_SPACE.lock() = Some(space.clone());
    space.activate();
    let result: Outcome = async {
        space
            .set_brk(heap + pages * 0x1000)
            .await
            .map_err(|e| fail(format_args!("{e:?}")))?;
        for (i, slot) in PROBED.iter().enumerate() {
            let page = heap + i as u64 * 0x1000;
            user_write(&space, page, 0x5eed).map_err(|d| fail(format_args!("{d:?}")))?;
            let (phys, _) = space
                .translate(page)
                .ok_or_else(|| fail(format_args!("page {page:#x} not mapped")))?;
            slot.store(phys & !0xfff, Ordering::SeqCst);
        }
        // CPU 1 runs the space and caches a translation: it is a shootdown target.
        let seen = panda_arch::ipi::call_on(1, read_on_this_cpu, heap)
            .map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(seen == 0x5eed, "cpu1 read {seen:#x}");
        PROBE_CPUS.store(0, Ordering::SeqCst);
        PROBE_FREED_EARLY.store(0, Ordering::SeqCst);
        crate::aspace::set_flush_probe(probe_frames_still_in_use, true);
        let shrunk = space.set_brk(heap).await;
        crate::aspace::set_flush_probe(probe_frames_still_in_use, false);
        shrunk.map_err(|e| fail(format_args!("{e:?}")))?;
        let early = PROBE_FREED_EARLY.load(Ordering::SeqCst);
        let cpus = PROBE_CPUS.load(Ordering::SeqCst);
        ensure!(
            cpus & 0b10 != 0,
            "cpu1's flush did not run the probe (cpus {cpus:#b})"
        );
        ensure!(
            early == 0,
            "{early} frame checks found an unmapped frame free before every CPU had flushed"
        );
        let still = PROBED
            .iter()
            .map(|f| f.load(Ordering::SeqCst))
            .filter(|&f| f != 0 && frame::is_in_use(f))
            .count();
        ensure!(
            still == 0,
            "{still} unmapped frames still in use after the shrink"
        );
        Ok(())
    }
    .await;
    let _ = panda_arch::ipi::call_on(1, leave_shared_space, 0);
    space.deactivate();
    *SHARED_SPACE.lock() = None;
    PROBED.iter().for_each(|f| f.store(0, Ordering::SeqCst));
    result
}

fn invlpg_here(page: u64) -> u64 {
    panda_arch::paging::flush_page(page);
    0
}

/// Runs user code until a syscall or an exception: interrupts that end a run early
/// (the timer tick, IPIs) just resume it, as a scheduler would.
fn run_past_interrupts(ctx: &mut panda_arch::user::UserContext) -> panda_arch::user::Exit {
    use panda_arch::user::{run, Exit};
    loop {
        match run(ctx) {
            Exit::Interrupt { .. } => continue,
            exit => return exit,
        }
    }
}

/// Enters ring 3 on a tiny program and checks each way back: `syscall`, a page fault,
/// an invalid opcode, and a timer interrupt while the program spins.
async fn user_mode_round_trips() -> Outcome {
    use panda_arch::user::{self, Exit, UserContext};
    let base = panda_abi::ELF_LOAD_BASE as u64;
    #[rustfmt::skip]
    let code: [u8; 21] = [
        0x48, 0xc7, 0xc0, 0x34, 0x12, 0x00, 0x00, // mov rax, 0x1234
        0x0f, 0x05,                               // syscall
        0x48, 0x8b, 0x1c, 0x25, 0, 0, 0, 0,       // mov rbx, [0]
        0x0f, 0x0b,                               // ud2
        0xeb, 0xfe,                               // jmp $
    ];
    let mut frame = frame::alloc()
        .ok_or_else(|| fail(format_args!("no frame")))?
        .into_zeroed()
        .into_frame();
    frame.write(0, &code);
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let rx = Rights {
        write: false,
        execute: true,
    };
    space
        .add_segment(base, base + 0x1000, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    space
        .map_frame(base, frame, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    space.activate();
    let mut ctx = UserContext {
        rip: base,
        rsp: panda_abi::INITIAL_STACK_POINTER as u64,
        rbx: 0x5555,
        r12: 0x1212,
        ..UserContext::default()
    };
    let result = (|| -> Outcome {
        let first = run_past_interrupts(&mut ctx);
        ensure!(
            first == Exit::Syscall,
            "first exit {first:?}, expected the syscall"
        );
        ensure!(
            ctx.rax == 0x1234 && ctx.rip == base + 9,
            "after syscall rax={:#x} rip={:#x}",
            ctx.rax,
            ctx.rip
        );
        ensure!(
            ctx.rbx == 0x5555 && ctx.r12 == 0x1212,
            "user registers not preserved: rbx={:#x} r12={:#x}",
            ctx.rbx,
            ctx.r12
        );
        ensure!(ctx.rflags & 0x200 != 0, "user code ran with interrupts off");
        let second = run_past_interrupts(&mut ctx);
        ensure!(
            matches!(second, Exit::PageFault { addr: 0, .. }),
            "second exit {second:?}, expected #PF"
        );
        ensure!(
            ctx.cr2 == 0 && ctx.rip == base + 9 && ctx.error_code & 4 != 0,
            "page fault: cr2={:#x} rip={:#x} err={:#x}",
            ctx.cr2,
            ctx.rip,
            ctx.error_code
        );
        ctx.rip += 8;
        let third = run_past_interrupts(&mut ctx);
        ensure!(
            matches!(third, Exit::Exception { vector: 6, .. }) && ctx.rip == base + 17,
            "third exit {third:?} at {:#x}, expected #UD",
            ctx.rip
        );
        ctx.rip += 2;
        let fourth = user::run(&mut ctx);
        ensure!(
            fourth
                == (Exit::Interrupt {
                    vector: panda_arch::apic::TIMER_VECTOR
                })
                && ctx.rip == base + 19,
            "spinning program left with {fourth:?} at {:#x}, expected the timer interrupt",
            ctx.rip
        );
        ensure!(
            x86_64::instructions::interrupts::are_enabled(),
            "interrupts off after returning from user mode"
        );
        Ok(())
    })();
    space.deactivate();
    result
}

/// Two threads on one CPU each leave a value in xmm0; each must find its own when it
/// runs again.
async fn user_sse_state_is_per_thread() -> Outcome {
    use panda_arch::user::{Exit, UserContext};
    let base = panda_abi::ELF_LOAD_BASE as u64;
    #[rustfmt::skip]
    let code: [u8; 14] = [
        0x66, 0x48, 0x0f, 0x6e, 0xc0, // movq xmm0, rax
        0x0f, 0x05,                   // syscall
        0x66, 0x48, 0x0f, 0x7e, 0xc0, // movq rax, xmm0
        0x0f, 0x05,                   // syscall
    ];
    let mut frame = frame::alloc()
        .ok_or_else(|| fail(format_args!("no frame")))?
        .into_zeroed()
        .into_frame();
    frame.write(0, &code);
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let rx = Rights {
        write: false,
        execute: true,
    };
    space
        .add_segment(base, base + 0x1000, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    space
        .map_frame(base, frame, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    space.activate();
    let thread = |rax| UserContext {
        rip: base,
        rax,
        ..UserContext::default()
    };
    let (mut a, mut b) = (thread(0xaaaa_aaaa), thread(0xbbbb_bbbb));
    let result = (|| -> Outcome {
        for ctx in [&mut a, &mut b] {
            ensure!(run_past_interrupts(ctx) == Exit::Syscall, "first syscall");
        }
        for (ctx, want) in [(&mut a, 0xaaaa_aaaa), (&mut b, 0xbbbb_bbbb)] {
            ctx.rax = 0;
            ensure!(run_past_interrupts(ctx) == Exit::Syscall, "second syscall");
            ensure!(
                ctx.rax == want,
                "xmm0 held {:#x}, expected {want:#x}: SSE state leaked between threads",
                ctx.rax
            );
        }
        Ok(())
    })();
    space.deactivate();
    result
}

/// The first user program (source in the comment of `user_process_syscalls_faults_and_exit`).
const PROGRAM: [u8; 142] = [
    0x48, 0x8d, 0x3d, 0x76, 0x00, 0x00, 0x00, 0xbe, 0x11, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x03,
    0x00, 0x0f, 0x05, 0xb8, 0x04, 0x00, 0x02, 0x00, 0x31, 0xff, 0x0f, 0x05, 0x48, 0x89, 0xc3, 0x48,
    0x8d, 0xb8, 0x00, 0x20, 0x00, 0x00, 0xb8, 0x04, 0x00, 0x02, 0x00, 0x0f, 0x05, 0x48, 0xc7, 0x83,
    0x00, 0x10, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x48, 0x8b, 0xbb, 0x00, 0x10, 0x00, 0x00, 0xb8,
    0x99, 0x99, 0x09, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xf8, 0xfb, 0x75, 0x25, 0x48, 0xc7, 0xc6, 0xad,
    0xde, 0x00, 0x00, 0x57, 0x48, 0x89, 0xf7, 0xbe, 0x04, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x03,
    0x00, 0x0f, 0x05, 0x5f, 0x48, 0x83, 0xf8, 0xfc, 0x75, 0x07, 0xb8, 0x01, 0x00, 0x02, 0x00, 0x0f,
    0x05, 0xbf, 0x63, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x02, 0x00, 0x0f, 0x05, 0x68, 0x65, 0x6c,
    0x6c, 0x6f, 0x20, 0x66, 0x72, 0x6f, 0x6d, 0x20, 0x72, 0x69, 0x6e, 0x67, 0x20, 0x33,
];

/// A process built from raw code (ELF loading arrives next) at ELF_LOAD_BASE.
fn process_from_code(code: &[u8]) -> Result<alloc::sync::Arc<crate::process::Process>, Failure> {
    let base = panda_abi::ELF_LOAD_BASE as u64;
    let mut frame = frame::alloc()
        .ok_or_else(|| fail(format_args!("no frame")))?
        .into_zeroed()
        .into_frame();
    frame.write(0, code);
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let rx = Rights {
        write: false,
        execute: true,
    };
    space
        .add_segment(base, base + 0x1000, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    space
        .map_frame(base, frame, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    Ok(crate::process::Process::new(space))
}

/// A user program (assembled from scripts-free source kept in the comment below) logs,
/// grows its heap with brk, writes and reads a fresh heap page (a demand fault), pushes
/// on its demand-paged stack, checks that an unknown operation returns
/// UnknownOperation and a bad pointer BadAddress, and exits with the value it read
/// (42). A second program writes to its own code and must be killed. Both run as
/// executor tasks that may migrate between CPUs; afterwards every frame is back.
///
/// Source of the first program (GNU as, Intel syntax): lea rdi,[rip+msg]; mov esi,17;
/// mov eax,0x30001; syscall; mov eax,0x20004; xor edi,edi; syscall; mov rbx,rax;
/// lea rdi,[rax+0x2000]; mov eax,0x20004; syscall; mov qword ptr [rbx+0x1000],42;
/// mov rdi,[rbx+0x1000]; mov eax,0x99999; syscall; cmp rax,-5; jne 1f;
/// mov rsi,0xdead; push rdi; mov rdi,rsi; mov esi,4; mov eax,0x30001; syscall; pop rdi;
/// cmp rax,-4; jne 1f; mov eax,0x20001; syscall; 1: mov edi,99; mov eax,0x20001;
/// syscall; msg: .ascii "hello from ring 3". Second: lea rax,[rip+_start];
/// mov qword ptr [rax],1; mov edi,7; mov eax,0x20001; syscall.
async fn user_process_syscalls_faults_and_exit() -> Outcome {
    const WRITES_ITS_CODE: [u8; 26] = [
        0x48, 0x8d, 0x05, 0xf9, 0xff, 0xff, 0xff, 0x48, 0xc7, 0x00, 0x01, 0x00, 0x00, 0x00, 0xbf,
        0x07, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x02, 0x00, 0x0f, 0x05,
    ];
    let exec = executor()?;
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let start = |process: alloc::sync::Arc<crate::process::Process>| {
        let ctx = panda_arch::user::UserContext {
            rip: panda_abi::ELF_LOAD_BASE as u64,
            rsp: panda_abi::INITIAL_STACK_POINTER as u64,
            ..Default::default()
        };
        exec.spawn(crate::process::run_thread(process, ctx))
    };
    let good = start(process_from_code(&PROGRAM)?).await;
    let bad = start(process_from_code(&WRITES_ITS_CODE)?).await;
    // A finished task's own allocation (its future, a frame run when it exceeds the
    // slab sizes) is released by its CPU just after the join handle is completed:
    // give that CPU a moment before comparing.
    let mut now = crate::memory::frames_not_in_use();
    for _ in 0..100 {
        if now == baseline {
            break;
        }
        exec.sleep(1_000_000).await;
        now = crate::memory::frames_not_in_use();
    }
    ensure!(
        good == 42,
        "the program exited with {good}, expected 42 (99: a syscall result was wrong)"
    );
    ensure!(
        bad == crate::process::KILLED,
        "writing its own code ended with {bad}, expected the kill status"
    );
    ensure!(
        now == baseline,
        "{now} frames after both processes ended, baseline {baseline}"
    );
    Ok(())
}

/// With this CPU's zeroed pool empty and other work queued on it, a user fault must
/// await the CPU's zeroing task — the other work runs meanwhile — and resume once the
/// task's refill wakes it.
async fn user_fault_awaits_the_zeroing_task() -> Outcome {
    use core::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    static SPINS: AtomicU64 = AtomicU64::new(0);
    let exec = executor()?;
    let cpu = percpu::current_index();
    let before = crate::aspace::stat(crate::aspace::Stat::PoolWaits);
    let process = process_from_code(&PROGRAM)?;
    // Other work for this CPU: a task that yields until told to stop (so the CPU never
    // idles, and idle-time zeroing cannot refill the pool behind the test's back). And
    // the same on every other CPU: an idle CPU would top this CPU's pool up.
    STOP.store(false, Ordering::SeqCst);
    SPINS.store(0, Ordering::SeqCst);
    let busy = exec.spawn_pinned(cpu, async move {
        while !STOP.load(Ordering::SeqCst) {
            SPINS.fetch_add(1, Ordering::Relaxed);
            exec.yield_now().await;
        }
    });
    let others: Vec<_> = (0..exec.cpu_count())
        .filter(|&c| c != cpu)
        .map(|c| {
            exec.spawn_pinned(c, async move {
                while !STOP.load(Ordering::SeqCst) {
                    exec.yield_now().await;
                }
            })
        })
        .collect();
    while let Some(z) = frame::try_take_zeroed(cpu) {
        drop(z);
    }
    let ctx = panda_arch::user::UserContext {
        rip: panda_abi::ELF_LOAD_BASE as u64,
        rsp: panda_abi::INITIAL_STACK_POINTER as u64,
        ..Default::default()
    };
    let thread = exec.spawn_pinned(cpu, crate::process::run_thread(process, ctx));
    let deadline = panda_arch::time::now_ns() + 3_000_000_000;
    while !thread.is_finished() && panda_arch::time::now_ns() < deadline {
        exec.sleep(1_000_000).await;
    }
    STOP.store(true, Ordering::SeqCst);
    busy.await;
    for other in others {
        other.await;
    }
    ensure!(
        thread.is_finished(),
        "the thread never resumed from its fault (3 s)"
    );
    let status = thread.await;
    let awaited = crate::aspace::stat(crate::aspace::Stat::PoolWaits) - before;
    ensure!(status == 42, "the program exited with {status}");
    ensure!(awaited >= 1, "no fault awaited the zeroing task");
    ensure!(
        SPINS.load(Ordering::Relaxed) > 0,
        "the other task did not run"
    );
    Ok(())
}
