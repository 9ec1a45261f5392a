//! Sleep futures and per-CPU timer lists.
//!
//! A `Sleep` registers its deadline and waker on the timer list of the CPU that polls
//! it, once; the executor loop fires expired timers on every turn (a CPU in `hlt` is
//! woken by its periodic timer interrupt, so a deadline is late by at most one tick
//! plus queueing). A sleep never completes before its deadline: `poll` compares the
//! clock itself, so a spurious or early wake only re-registers it.

use alloc::collections::BinaryHeap;
use core::cmp::{Ordering as CmpOrdering, Reverse};
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

/// The executor's side of timers, as a `Sleep` sees it.
pub(crate) trait Timers: Send + Sync {
    fn now_ns(&self) -> u64;
    fn add_timer(&self, deadline_ns: u64, waker: Waker);
}

pub(crate) struct TimerEntry {
    pub(crate) deadline: u64,
    pub(crate) seq: u64,
    pub(crate) waker: Waker,
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// Earliest deadline first.
pub(crate) type TimerHeap = BinaryHeap<Reverse<TimerEntry>>;

/// A future that completes at or after a deadline on the executor's clock.
pub struct Sleep {
    deadline: u64,
    timers: &'static dyn Timers,
    /// The waker a timer is armed for. An armed timer stays until its deadline, so a
    /// poll with the same waker need not arm another.
    armed: Option<Waker>,
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
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.timers.now_ns() >= self.deadline {
            return Poll::Ready(());
        }
        if !self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.timers.add_timer(self.deadline, cx.waker().clone());
            self.armed = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}
