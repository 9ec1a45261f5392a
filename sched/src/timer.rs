//! Sleep futures and per-CPU timer lists.
//!
//! A `Sleep` arms one timer entry (deadline, waker) on the timer list of the CPU that
//! first polls it; the executor loop fires expired entries on every turn (a CPU in
//! `hlt` is woken by its periodic timer interrupt, so a deadline is late by at most one
//! tick plus queueing). A sleep never completes before its deadline: `poll` compares
//! the clock itself, so a spurious or early wake only leaves it pending.
//!
//! A `Sleep` owns its entry: it remembers where the entry is (`TimerKey`: the arming
//! CPU, the deadline and a sequence number), a poll with a different waker swaps the
//! waker in that entry instead of arming another, and dropping the `Sleep` (e.g. a
//! killed process's thread in `sleep(u64::MAX)`) removes the entry from the arming
//! CPU's list at once, with the `Waker` (and the task it keeps alive) in it.

use alloc::collections::BTreeMap;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

/// Where an armed timer entry lives: the CPU whose list holds it and its key there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimerKey {
    pub(crate) cpu: usize,
    pub(crate) deadline: u64,
    pub(crate) seq: u64,
}

/// The executor's side of timers, as a `Sleep` sees it.
///
/// A removed or replaced `Waker` is handed back to the caller rather than dropped
/// under the list's lock: dropping a waker may drop the last reference to a task, and
/// with it a future holding another `Sleep` whose `Drop` takes the same lock.
pub(crate) trait Timers: Send + Sync {
    fn now_ns(&self) -> u64;
    /// Arms an entry on the calling CPU's list.
    fn add_timer(&self, deadline_ns: u64, waker: Waker) -> TimerKey;
    /// Puts `waker` in the armed entry `key` and returns the one it replaces; if the
    /// entry is gone (fired), returns `waker` as the error.
    fn replace_timer_waker(&self, key: TimerKey, waker: Waker) -> Result<Waker, Waker>;
    /// Removes the entry `key` if it is still armed and returns its waker.
    fn cancel_timer(&self, key: TimerKey) -> Option<Waker>;
}

/// One CPU's armed timers, earliest `(deadline, seq)` first. The sequence number makes
/// keys unique, so equal deadlines fire in arming order and each entry can be removed
/// exactly. A B-tree frees its nodes as entries leave, so a burst of timers does not
/// pin its peak memory.
pub(crate) type TimerList = BTreeMap<(u64, u64), Waker>;

/// A future that completes at or after a deadline on the executor's clock.
pub struct Sleep {
    deadline: u64,
    timers: &'static dyn Timers,
    /// The entry armed for this sleep and the waker in it (so a poll with the same
    /// waker touches no list). `None` before the first pending poll and after the
    /// sleep completed.
    armed: Option<(TimerKey, Waker)>,
}

impl Sleep {
    pub(crate) fn new(deadline: u64, timers: &'static dyn Timers) -> Self {
        Self {
            deadline,
            timers,
            armed: None,
        }
    }

    /// The deadline in nanoseconds of the executor's clock.
    pub fn deadline(&self) -> u64 {
        self.deadline
    }

    /// Removes this sleep's entry, if armed (a no-op but for one lookup if it fired).
    fn disarm(&mut self) {
        if let Some((key, _)) = self.armed.take() {
            // The removed waker is dropped here, after the list's lock is released.
            drop(self.timers.cancel_timer(key));
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.timers.now_ns() >= self.deadline {
            // Done: an entry not yet fired would only wake the task once more.
            self.disarm();
            return Poll::Ready(());
        }
        let waker = cx.waker();
        let timers = self.timers;
        let deadline = self.deadline;
        match self.armed.take() {
            Some((key, armed)) if armed.will_wake(waker) => {
                self.armed = Some((key, armed));
            }
            Some((key, _)) => {
                // A new waker: replace the old one in the same entry, so there is
                // never more than one entry per sleep.
                let key = match timers.replace_timer_waker(key, waker.clone()) {
                    Ok(old) => {
                        drop(old);
                        key
                    }
                    // Fired meanwhile (the clock reached the deadline since the check
                    // above): arm again so the new waker is not missed.
                    Err(new) => timers.add_timer(deadline, new),
                };
                self.armed = Some((key, waker.clone()));
            }
            None => {
                let key = timers.add_timer(deadline, waker.clone());
                self.armed = Some((key, waker.clone()));
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    /// A sleep dropped before it fires (its task was cancelled, e.g. its process was
    /// killed) takes its entry off the arming CPU's list, wherever it is dropped.
    fn drop(&mut self) {
        self.disarm();
    }
}
