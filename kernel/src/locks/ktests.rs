//! In-kernel tests of the lock-order checker. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use crate::ktest::support::{
    async_tests, cpu_id, ensure, executor, tests, AsyncTest, Context, Failure, Outcome, Test,
};

pub(crate) const TESTS: &[Test] = tests![locks_out_of_order_are_named];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![
    locks_a_waiter_is_not_starved,
    locks_a_waiter_says_what_it_waits_for
];

/// The lock-order checker: with a rank-60 lock held, taking a rank-30 one is an
/// inversion (named), a rank-65 one is not; a call served meanwhile starts afresh.
fn locks_out_of_order_are_named(_: &Context<'_>) -> Outcome {
    use panda_platform::sync::{nested, order_violation, Mutex, Rank};
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

type Neighbours = (
    &'static panda_sched::Executor<crate::executor::Machine>,
    usize,
    usize,
);

/// The executor, the calling CPU and its neighbour (the next CPU by number), for a
/// test that makes one wait for the other; `None` on a single CPU.
fn neighbours() -> Result<Option<Neighbours>, Failure> {
    let exec = executor()?;
    let n = exec.cpu_count();
    if n < 2 {
        return Ok(None);
    }
    let me = panda_arch::percpu::current_index();
    Ok(Some((exec, me, (me + 1) % n)))
}

/// A CPU that takes a lock back to back must not keep a waiter out: a waiter that has
/// spun briefly claims the next turn (`sync::Mutex`), and from then on no other CPU
/// takes the lock before it, not even the CPU that just released it. Without the
/// claim a waiter gets the lock only if its compare-exchange lands in the few
/// instructions between the holder's release and its next attempt.
async fn locks_a_waiter_is_not_starved() -> Outcome {
    use panda_platform::sync::{Mutex, Rank};
    static RANK: Rank = Rank::new(60, "test contended");
    static LOCK: Mutex<u64> = Mutex::new(&RANK, 0);
    let Some((exec, me, other)) = neighbours()? else {
        return Ok(());
    };
    let held = LOCK.lock();
    let waiter = exec.spawn_pinned(cpu_id(other)?, async {
        *LOCK.lock() += 1;
    });
    // The waiter claims the next turn after 200 us of spinning; with vCPUs that share
    // few host cores, allow it 2 s to run at all.
    let deadline = panda_arch::time::now_ns() + 2_000_000_000;
    while LOCK.next_turn() != Some(other) && panda_arch::time::now_ns() < deadline {
        core::hint::spin_loop();
    }
    let claimed = LOCK.next_turn();
    let before = *held;
    drop(held);
    // Back to back: the waiter's claim must keep this CPU out. Taking the lock is a
    // violation only if the waiter has not had its turn yet (the value is unchanged):
    // with vCPUs descheduled by the host, the waiter can take and release the lock
    // between the release and this try, using its claim as it should (seen once at
    // -smp 8 on a 2-core host).
    let retaken = LOCK.try_lock().is_some_and(|value| *value == before);
    waiter.await;
    let after = LOCK.next_turn();
    ensure!(
        claimed == Some(other),
        "cpu{other} waited and did not claim the next turn (claim: {claimed:?})"
    );
    ensure!(!retaken, "cpu{me} retook the lock past cpu{other}'s claim");
    ensure!(
        after.is_none(),
        "the claim outlived the waiter's turn: {after:?}"
    );
    Ok(())
}

/// The watchdog report's line for a CPU spinning for a lock (`order::write_waiting`)
/// names the lock, its holder, the line that took it and who has the next turn, read
/// from the waiter's own copy while the waiter spins; once it has the lock the line is
/// gone. Any CPU index is accepted (one past the last prints nothing).
async fn locks_a_waiter_says_what_it_waits_for() -> Outcome {
    use alloc::string::String;
    use panda_platform::order::write_waiting;
    use panda_platform::sync::{Mutex, Rank};
    static RANK: Rank = Rank::new(60, "test reported");
    static LOCK: Mutex<()> = Mutex::new(&RANK, ());
    let line = |cpu: usize| {
        let mut s = String::new();
        let _ = write_waiting(&mut s, cpu);
        s
    };
    ensure!(
        line(usize::MAX).is_empty(),
        "a line for a CPU that does not exist"
    );
    let Some((exec, me, other)) = neighbours()? else {
        return Ok(());
    };
    let held = LOCK.lock();
    let waiter = exec.spawn_pinned(cpu_id(other)?, async {
        drop(LOCK.lock());
    });
    let want = alloc::format!(
        "  spinning for lock \"test reported\", held by cpu {me}, last taken at kernel/src/locks/ktests.rs:"
    );
    // The waiter claims the next turn after 200 us; allow 2 s for vCPUs to run at all.
    let deadline = panda_arch::time::now_ns() + 2_000_000_000;
    let mut seen = line(other);
    while !(seen.starts_with(&want) && seen.ends_with(" (this CPU has the next turn)\n"))
        && panda_arch::time::now_ns() < deadline
    {
        core::hint::spin_loop();
        seen = line(other);
    }
    drop(held);
    waiter.await;
    let after = line(other);
    ensure!(
        seen.starts_with(&want) && seen.ends_with(" (this CPU has the next turn)\n"),
        "cpu{other}'s line while it waited: {seen:?}"
    );
    ensure!(after.is_empty(), "a line after the wait ended: {after:?}");
    Ok(())
}
