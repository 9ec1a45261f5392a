//! The fair run queue: user threads ordered by weighted virtual runtime.
//!
//! Every task spawned in a [`Group`] (the kernel makes one per process) is a *fair* task.
//! A CPU keeps its fair tasks in two ordered maps (pinned, and shared ones that other
//! CPUs may steal or pull), keyed by `(vruntime, task id)`, and always runs the one with
//! the smallest virtual runtime next. Running for `d` ns adds `d * n` to a task's
//! virtual runtime, where `n` is the number of runnable tasks its group has on that CPU:
//! each group shares a CPU equally with every other group there, and its threads share
//! the group's part equally. So a process cannot take more of a CPU by spawning more
//! threads (docs/SCHEDULING.md has the reasoning and the prior art).
//!
//! The numbers are in one place here: see [`TARGET_LATENCY_NS`] and its neighbours.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::task::Task;

/// One round of a CPU's runnable fair tasks lasts about this long while there are at
/// most `TARGET_LATENCY_NS / MIN_GRANULARITY_NS` of them: each gets a slice of this
/// divided by their number.
pub const TARGET_LATENCY_NS: u64 = 20_000_000;
/// No slice is shorter than this (it is the kernel's timer tick: a thread spinning in
/// user mode is only interrupted at ticks). With more runnable tasks than
/// `TARGET_LATENCY_NS / MIN_GRANULARITY_NS` a round grows as `n * MIN_GRANULARITY_NS`.
pub const MIN_GRANULARITY_NS: u64 = 4_000_000;
/// A woken task preempts the running one when its virtual runtime is smaller by more
/// than this.
pub const WAKEUP_GRANULARITY_NS: u64 = 1_000_000;
/// A task that slept is placed no further back than this behind the CPU's smallest
/// virtual runtime (so it runs soon), and gains no more credit than this however long
/// it slept (so sleeping cannot bank CPU time).
pub const SLEEPER_CREDIT_NS: u64 = TARGET_LATENCY_NS / 2;
/// How often a busy CPU compares its load with the others' and pulls tasks.
pub const BALANCE_INTERVAL_NS: u64 = 20_000_000;

/// The slice each of `runnable` fair tasks gets on one CPU.
pub fn slice_ns(runnable: usize) -> u64 {
    (TARGET_LATENCY_NS / runnable.max(1) as u64).max(MIN_GRANULARITY_NS)
}

/// The largest virtual runtime `task` (counted on `cpu`) may be queued with on `queue`:
/// `TARGET_LATENCY_NS` of its weighted time ahead of the CPU's smallest. A task that
/// only ran its slices is never that far ahead; one whose virtual runtime was set on
/// another scale (placed while its group was growing, moved between CPUs whose
/// smallest virtual runtimes drifted apart) is pulled back, so no task waits more
/// than a few rounds whatever happened before (a first version without the bound let
/// a killed process's threads wait 73 s for their turn to see the kill).
pub(crate) fn max_vruntime(queue: &FairQueue, task: &Task, cpu: usize) -> u64 {
    let weight = task
        .group
        .as_ref()
        .map_or(1, |g| u64::from(g.runnable_on(cpu)).max(1));
    queue
        .min_vruntime
        .saturating_add(TARGET_LATENCY_NS.saturating_mul(weight))
}

/// Virtual runtime `v` from a CPU whose smallest is `from_min` to one whose smallest is
/// `to_min`: the same distance ahead of (or behind) the smallest. The CPUs' scales are
/// unrelated, so a task moving between them keeps only its lag.
pub(crate) fn rescale(v: u64, from_min: u64, to_min: u64) -> u64 {
    if v >= from_min {
        to_min.saturating_add(v - from_min)
    } else {
        to_min.saturating_sub(from_min - v)
    }
}

/// A scheduling group: the tasks of one process. Groups share a CPU equally; a group's
/// tasks share its part. It also accounts the CPU time its tasks used.
pub struct Group {
    id: u64,
    /// Per CPU: the group's tasks queued or running there.
    runnable: Box<[AtomicU32]>,
    cpu_ns: AtomicU64,
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

impl Group {
    pub(crate) fn new(cpus: usize) -> Arc<Group> {
        Arc::new(Group {
            id: NEXT_GROUP.fetch_add(1, Ordering::Relaxed),
            runnable: (0..cpus).map(|_| AtomicU32::new(0)).collect(),
            cpu_ns: AtomicU64::new(0),
        })
    }

    /// A number no other group has.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// CPU time the group's tasks have used, in ns (polls that ended; the running poll
    /// is added by `Executor::current_group_cpu_ns`).
    pub fn cpu_time_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::Relaxed)
    }

    /// The group's tasks queued or running on CPU `cpu`.
    pub fn runnable_on(&self, cpu: usize) -> u32 {
        self.runnable
            .get(cpu)
            .map_or(0, |r| r.load(Ordering::Relaxed))
    }

    pub(crate) fn charge(&self, ns: u64) {
        self.cpu_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, cpu: usize) {
        self.runnable[cpu].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn uncount(&self, cpu: usize) {
        let _ = self.runnable[cpu].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(1))
        });
    }
}

type Key = (u64, u64);

/// One CPU's fair tasks.
pub(crate) struct FairQueue {
    pinned: BTreeMap<Key, Arc<Task>>,
    shared: BTreeMap<Key, Arc<Task>>,
    /// Grows monotonically: the smallest virtual runtime this CPU has picked to run.
    /// Placement of woken, new and migrated tasks is relative to it.
    pub(crate) min_vruntime: u64,
}

impl FairQueue {
    pub(crate) const fn new() -> Self {
        Self {
            pinned: BTreeMap::new(),
            shared: BTreeMap::new(),
            min_vruntime: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.pinned.len() + self.shared.len()
    }

    pub(crate) fn shared_len(&self) -> usize {
        self.shared.len()
    }

    pub(crate) fn insert(&mut self, task: Arc<Task>) {
        let key = (task.vruntime.load(Ordering::Relaxed), task.id);
        if task.pinned.load(Ordering::Relaxed) {
            self.pinned.insert(key, task);
        } else {
            self.shared.insert(key, task);
        }
    }

    /// Takes the task with the smallest virtual runtime, and advances `min_vruntime`.
    pub(crate) fn pop_first(&mut self) -> Option<Arc<Task>> {
        let p = self.pinned.first_key_value().map(|(k, _)| *k);
        let s = self.shared.first_key_value().map(|(k, _)| *k);
        let task = match (p, s) {
            (Some(p), Some(s)) if p <= s => self.pinned.pop_first(),
            (Some(_), None) => self.pinned.pop_first(),
            (_, Some(_)) => self.shared.pop_first(),
            (None, None) => None,
        }
        .map(|(_, t)| t)?;
        self.min_vruntime = self.min_vruntime.max(task.vruntime.load(Ordering::Relaxed));
        Some(task)
    }

    /// Takes the shared task that would run last here (the largest virtual runtime),
    /// for another CPU to run instead.
    pub(crate) fn pop_last_shared(&mut self) -> Option<Arc<Task>> {
        self.shared.pop_last().map(|(_, t)| t)
    }

    /// The smallest virtual runtime queued (pinned or shared).
    pub(crate) fn first_vruntime(&self) -> Option<u64> {
        let p = self.pinned.first_key_value().map(|(k, _)| k.0);
        let s = self.shared.first_key_value().map(|(k, _)| k.0);
        match (p, s) {
            (Some(p), Some(s)) => Some(p.min(s)),
            (a, b) => a.or(b),
        }
    }
}
