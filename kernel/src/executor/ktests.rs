//! In-kernel tests of the executor on every CPU: pinned tasks, stealing, sleeps. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use core::sync::atomic::Ordering;

use crate::ktest::support::{
    async_tests, ensure, executor, report_cpu, tests, AsyncTest, Outcome, Test,
};

pub(crate) const TESTS: &[Test] = tests![];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![
    sched_every_cpu_runs_pinned_tasks,
    sched_ten_thousand_tasks_with_stealing,
    sched_sleep_wakes_no_earlier_than_asked
];

async fn sched_every_cpu_runs_pinned_tasks() -> Outcome {
    let exec = executor()?;
    for cpu in panda_mm::CpuId::all(exec.cpu_count()) {
        // A pinned task on an idle CPU runs only if the wake-up IPI reaches it.
        let ran_on = exec.spawn_pinned(cpu, async { report_cpu() }).await;
        ensure!(
            ran_on == cpu.index(),
            "task pinned to cpu{cpu} ran on cpu{ran_on}"
        );
    }
    Ok(())
}

async fn sched_ten_thousand_tasks_with_stealing() -> Outcome {
    use core::sync::atomic::AtomicUsize;
    static DONE: AtomicUsize = AtomicUsize::new(0);
    let exec = executor()?;
    let stolen_before: u64 = panda_mm::CpuId::all(exec.cpu_count())
        .map(|c| exec.stats(c).stolen)
        .sum();
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
    let stolen: u64 = panda_mm::CpuId::all(exec.cpu_count())
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
    for cpu in panda_mm::CpuId::all(exec.cpu_count()) {
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
