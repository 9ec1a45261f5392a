//! In-kernel tests of the lock-order checker. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::Failure`).
#![allow(clippy::result_large_err)]

use crate::ktest::{async_tests, ensure, tests, AsyncTest, Context, Outcome, Test};

pub(crate) const TESTS: &[Test] = tests![locks_out_of_order_are_named];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![];

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
