//! Tasks and their wakers.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::task::Wake;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::fair::Group;

/// Not queued, not running: waiting for a wake.
pub(crate) const IDLE: u8 = 0;
/// In a run queue.
pub(crate) const SCHEDULED: u8 = 1;
/// Being polled by a CPU.
pub(crate) const RUNNING: u8 = 2;
/// Woken while being polled: goes back to a queue when the poll ends.
pub(crate) const WOKEN: u8 = 3;
/// Finished; its future is dropped.
pub(crate) const DONE: u8 = 4;

pub(crate) type BoxedFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where a task is queued when woken.
pub(crate) trait Scheduler: Send + Sync {
    fn enqueue(&self, task: Arc<Task>);
}

/// Task structures in memory (spawned and not yet freed: a finished task stays until
/// the last waker naming it is dropped).
pub(crate) static TASK_STRUCTS: AtomicUsize = AtomicUsize::new(0);

static NEXT_TASK_ID: AtomicU64 = AtomicU64::new(1);

/// `Task::counted` when the task is counted on no CPU.
pub(crate) const UNCOUNTED: usize = usize::MAX;

pub(crate) struct Task {
    pub(crate) state: AtomicU8,
    /// The CPU whose queue the task goes to when woken (its last CPU).
    pub(crate) cpu: AtomicUsize,
    /// Whether only `cpu` may poll it (changed only by the CPU polling it).
    pub(crate) pinned: AtomicBool,
    pub(crate) future: spin::Mutex<Option<BoxedFuture>>,
    pub(crate) next: spin::Mutex<Option<Arc<Task>>>,
    pub(crate) scheduler: &'static dyn Scheduler,
    /// Unique: breaks ties between equal virtual runtimes in the fair queues.
    pub(crate) id: u64,
    /// The task's scheduling group (a process): `None` for kernel tasks, which run from
    /// the FIFO queues; `Some` for fair tasks (docs/SCHEDULING.md).
    pub(crate) group: Option<Arc<Group>>,
    /// Weighted virtual runtime (fair tasks), on the scale of `cpu`'s fair queue.
    pub(crate) vruntime: AtomicU64,
    /// CPU time used by polls that ended, in ns.
    pub(crate) runtime_ns: AtomicU64,
    /// The CPU whose `Group::runnable` count includes this task, or `UNCOUNTED`.
    /// Changed only by whoever owns the task's state (the queuer or the poller).
    pub(crate) counted: AtomicUsize,
}

impl Task {
    pub(crate) fn new(
        future: BoxedFuture,
        cpu: usize,
        pinned: bool,
        scheduler: &'static dyn Scheduler,
        group: Option<Arc<Group>>,
        vruntime: u64,
    ) -> Arc<Task> {
        TASK_STRUCTS.fetch_add(1, Ordering::Relaxed);
        Arc::new(Task {
            state: AtomicU8::new(SCHEDULED),
            cpu: AtomicUsize::new(cpu),
            pinned: AtomicBool::new(pinned),
            future: spin::Mutex::new(Some(future)),
            next: spin::Mutex::new(None),
            scheduler,
            id: NEXT_TASK_ID.fetch_add(1, Ordering::Relaxed),
            group,
            vruntime: AtomicU64::new(vruntime),
            runtime_ns: AtomicU64::new(0),
            counted: AtomicUsize::new(UNCOUNTED),
        })
    }

    /// Moves the task towards a queue: exactly one of any number of concurrent wakes
    /// enqueues it.
    pub(crate) fn schedule(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let next = match state {
                IDLE => SCHEDULED,
                RUNNING => WOKEN,
                _ => return, // already queued, already woken, or done
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if next == SCHEDULED {
                        self.scheduler.enqueue(self.clone());
                    }
                    return;
                }
                Err(now) => state = now,
            }
        }
    }
}

impl Task {
    /// Counts the task as runnable on `cpu` in its group (moving the count from the CPU
    /// it was counted on, if another).
    pub(crate) fn count_on(&self, cpu: usize) {
        let Some(group) = &self.group else { return };
        let was = self.counted.swap(cpu, Ordering::Relaxed);
        if was != cpu {
            if was != UNCOUNTED {
                group.uncount(was);
            }
            group.count(cpu);
        }
    }

    /// The task is no longer runnable (it blocked, finished or is leaving its CPU).
    pub(crate) fn uncount(&self) {
        let Some(group) = &self.group else { return };
        let was = self.counted.swap(UNCOUNTED, Ordering::Relaxed);
        if was != UNCOUNTED {
            group.uncount(was);
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        TASK_STRUCTS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.schedule();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.schedule();
    }
}
