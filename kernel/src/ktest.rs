//! In-kernel tests, run when the command line says `test`: the harness.
//!
//! The tests live next to the code they test, in `MODULE/ktests.rs` (e.g.
//! `aspace/ktests.rs` for address spaces), each module listing its own in `TESTS`
//! (synchronous) and `ASYNC_TESTS` (tasks on the executor); `SUITES` below names the
//! modules in the order they run. This file is the runner; the harness (the failure
//! type, `ensure!`, the test tables) and the helpers several modules' tests share are
//! in `ktest/support.rs`, which the tests import (so no test imports the runner).
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

use crate::boot::BootInfo;
use crate::console;
use crate::kernel_tables::KernelTables;

pub(crate) mod support;

use support::{ensure, fail, AsyncTest, Context, Outcome, Test};

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
