//! In-kernel tests, run when the command line says `test`: the harness.
//!
//! The tests live next to the code they test, in `MODULE/ktests.rs` (e.g.
//! `aspace/ktests.rs` for address spaces), each module listing its own in `TESTS`
//! (synchronous) and `ASYNC_TESTS` (tasks on the executor); `SUITES` below names the
//! modules in the order they run. This file holds the harness, the failure type and
//! `ensure!`, and helpers several modules' tests share.
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
use core::fmt::Write;
use core::future::Future;
use core::pin::Pin;

use panda_arch::percpu;
use panda_arch::probe;

use crate::aspace::{AddressSpace, FaultError};
use crate::boot::BootInfo;
use crate::console;
use crate::kernel_tables::KernelTables;
use panda_mm::region::{Access, FaultDecision, Rights};
use panda_platform::vm::UserAddr;

/// A failure message, formatted without a heap.
pub struct Failure {
    buf: [u8; 160],
    len: usize,
}

impl Failure {
    pub(crate) fn as_str(&self) -> &str {
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

pub(crate) type Outcome = Result<(), Failure>;

/// A failure with a formatted message.
pub(crate) fn fail(args: core::fmt::Arguments<'_>) -> Failure {
    let mut f = Failure {
        buf: [0; 160],
        len: 0,
    };
    let _ = f.write_fmt(args);
    f
}

/// Fails the test with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::ktest::fail(format_args!($($arg)*)));
        }
    };
}
pub(crate) use ensure;

/// What synchronous tests may look at.
pub(crate) struct Context<'a> {
    pub boot: &'a BootInfo,
    pub tables: &'a KernelTables,
    /// Enabled processors the MADT lists: all must be online.
    pub cpus_expected: usize,
}

pub(crate) type Test = (&'static str, fn(&Context<'_>) -> Outcome);

/// Each test by its function name, which is also its name in the output.
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as fn(&$crate::ktest::Context<'_>) -> $crate::ktest::Outcome)),*]
    };
}
pub(crate) use tests;

pub(crate) type AsyncTest = (
    &'static str,
    fn() -> Pin<Box<dyn Future<Output = Outcome> + Send>>,
);

/// Tests that run as tasks on the executor (they spawn and await other tasks).
macro_rules! async_tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), || alloc::boxed::Box::pin($test()) as core::pin::Pin<alloc::boxed::Box<dyn core::future::Future<Output = $crate::ktest::Outcome> + Send>>)),*]
    };
}
pub(crate) use async_tests;

/// The modules with in-kernel tests, in the order they run (each module's synchronous
/// tests first, in this order, then each module's async tests): the tests themselves
/// live next to the code they test, in `MODULE/ktests.rs`, each listing its own.
const SUITES: &[(&[Test], &[AsyncTest])] = &[
    (crate::boot::ktests::TESTS, crate::boot::ktests::ASYNC_TESTS),
    (
        crate::kernel_tables::ktests::TESTS,
        crate::kernel_tables::ktests::ASYNC_TESTS,
    ),
    (crate::smp::ktests::TESTS, crate::smp::ktests::ASYNC_TESTS),
    (crate::heap::ktests::TESTS, crate::heap::ktests::ASYNC_TESTS),
    (
        crate::locks::ktests::TESTS,
        crate::locks::ktests::ASYNC_TESTS,
    ),
    (
        crate::executor::ktests::TESTS,
        crate::executor::ktests::ASYNC_TESTS,
    ),
    (
        crate::memory::ktests::TESTS,
        crate::memory::ktests::ASYNC_TESTS,
    ),
    (
        crate::aspace::ktests::TESTS,
        crate::aspace::ktests::ASYNC_TESTS,
    ),
    (
        crate::process::ktests::TESTS,
        crate::process::ktests::ASYNC_TESTS,
    ),
];

/// Measurements printed after the tests (never a pass or a failure: numbers for the
/// docs, from the machine the tests ran on).
const MEASUREMENTS: &[AsyncTest] = crate::memory::ktests::MEASUREMENTS;

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
    let sync_tests = SUITES.iter().flat_map(|(tests, _)| tests.iter());
    for (name, test) in sync_tests.filter(|(n, _)| chosen(n)) {
        record(name, test(&ctx));
        // Each synchronous test is one poll: let the executor come round between them
        // (the watchdog reports a poll that never returns).
        if let Some(exec) = crate::executor::get() {
            exec.yield_now().await;
        }
    }
    let async_tests = SUITES.iter().flat_map(|(_, tests)| tests.iter());
    for (name, test) in async_tests.filter(|(n, _)| chosen(n)) {
        record(name, test().await);
    }
    for (name, measure) in MEASUREMENTS.iter().filter(|(n, _)| chosen(n)) {
        console!("measurement {name} (not a test):");
        if let Err(why) = measure().await {
            console!("   (could not measure: {})", why.as_str());
        }
    }
    // Last, so that it covers every test before it (a filtered run may be too short
    // for the watchdog to have looked, so it runs only when chosen too).
    if chosen("watchdog_watched_the_whole_run") {
        record(
            "watchdog_watched_the_whole_run",
            watchdog_watched_the_whole_run(&ctx),
        );
    }
    if chosen("mm_no_frame_was_freed_twice") {
        record("mm_no_frame_was_freed_twice", mm_no_frame_was_freed_twice());
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
    let limit = panda_platform::watchdog::limit_ns();
    let quiet = panda_platform::watchdog::longest_quiet_ns();
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

/// Over the whole run, the frame allocator's ownership bits refused no free of a frame
/// that was not out and skipped no listed frame that was (and, with `mm.poison=on`, no
/// free or pooled frame was written): every test's frames had one owner at a time.
fn mm_no_frame_was_freed_twice() -> Outcome {
    let misuse = panda_platform::frame::misuse();
    ensure!(
        misuse == Default::default(),
        "{} frees of frames not out, {} listed frames still out (the first are logged)",
        misuse.double_frees,
        misuse.double_allocs
    );
    let poisoned = panda_platform::frame::poison::hits();
    ensure!(
        poisoned == 0,
        "{poisoned} free or pooled frames were written"
    );
    Ok(())
}

/// Waits up to `ms` milliseconds (TSC) for `done`.
pub(crate) fn wait_for(ms: u64, done: impl Fn() -> bool) -> bool {
    let deadline = panda_arch::time::now_ns() + ms * 1_000_000;
    while panda_arch::time::now_ns() < deadline {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Keeps CPU `cpu` busy, so it never idles (and never zeroes frames ahead): a task
/// pinned there yields until `stop` is set, counting its turns in `spins`.
pub(crate) fn keep_busy(
    cpu: panda_mm::CpuId,
    stop: &'static core::sync::atomic::AtomicBool,
    spins: &'static core::sync::atomic::AtomicU64,
) -> Result<panda_sched::JoinHandle<()>, Failure> {
    let exec = executor()?;
    Ok(exec.spawn_pinned(cpu, async move {
        while !stop.load(core::sync::atomic::Ordering::SeqCst) {
            spins.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            exec.yield_now().await;
        }
    }))
}

/// Empties CPU `cpu`'s zeroed pool (the frames go back to the allocator).
pub(crate) fn empty_pool(cpu: panda_mm::CpuId) {
    while let Some(z) = panda_platform::frame::try_take_zeroed(cpu) {
        drop(z);
    }
}

/// The executor, or a failure if the tests run without one.
pub(crate) fn executor() -> Result<&'static panda_sched::Executor<crate::executor::Machine>, Failure>
{
    crate::executor::get().ok_or_else(|| fail(format_args!("no executor")))
}

/// CPU `index` (a test counting CPUs by number: `0..exec.cpu_count()`) as the
/// `CpuId` the executor and the memory layers take; a failure past `MAX_CPUS`.
pub(crate) fn cpu_id(index: usize) -> Result<panda_mm::CpuId, Failure> {
    panda_mm::CpuId::new(index).ok_or_else(|| fail(format_args!("cpu{index} is past MAX_CPUS")))
}

/// The calling CPU's index (a cross-CPU call's body).
pub(crate) fn report_cpu() -> usize {
    percpu::current_index()
}

/// `addr` as a user address, for tests whose addresses are in the user half by
/// construction (panics otherwise: a test's bug).
pub(crate) fn user_addr(addr: u64) -> UserAddr {
    UserAddr::new(addr).expect("a test's user address is in the user half")
}

/// Reads user memory in the current space, resolving demand faults like a user access.
pub(crate) fn user_read(space: &AddressSpace, addr: u64) -> Result<u64, FaultDecision> {
    match probe::read_user_u64(addr) {
        Ok(v) => Ok(v),
        Err(_) => {
            let at = UserAddr::new(addr).ok_or(FaultDecision::OutsideRegions)?;
            space.handle_fault(at, Access::Read).map_err(denied)?;
            probe::read_user_u64(addr).map_err(|_| FaultDecision::OutsideRegions)
        }
    }
}

/// Writes user memory in the current space, resolving demand faults like a user access.
pub(crate) fn user_write(space: &AddressSpace, addr: u64, value: u64) -> Result<(), FaultDecision> {
    match probe::write_user_u64(addr, value) {
        Ok(()) => Ok(()),
        Err(_) => {
            let at = UserAddr::new(addr).ok_or(FaultDecision::OutsideRegions)?;
            space.handle_fault(at, Access::Write).map_err(denied)?;
            probe::write_user_u64(addr, value).map_err(|_| FaultDecision::ProtectionViolation)
        }
    }
}

/// The tests expect verdicts; running out of memory there is itself a failure,
/// reported as a verdict no test expects.
pub(crate) fn denied(e: FaultError) -> FaultDecision {
    match e {
        FaultError::Denied(d) => d,
        FaultError::OutOfMemory => FaultDecision::DemandZero(Rights {
            write: false,
            execute: false,
        }),
    }
}

/// Flushes `page` from this CPU's TLB (a cross-CPU call's body).
pub(crate) fn invlpg_here(page: u64) -> u64 {
    panda_arch::paging::flush_page(page);
    0
}
