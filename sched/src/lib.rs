//! `panda-sched`: the executor every CPU runs.
//!
//! A task is a boxed `Future<Output = ()>` in an `Arc<Task>`. Each CPU has two FIFO run
//! queues: *pinned* tasks (never leave the CPU) and *shared* ones (other CPUs may steal
//! them when they run dry). The queues are intrusive linked lists through the tasks, so
//! waking a task never allocates: it only bumps a reference count and takes the target
//! queue's lock.
//!
//! Task states (one atomic per task) make the transitions race-free:
//! `IDLE -> SCHEDULED` (wake pushes it, exactly once), `SCHEDULED -> RUNNING` (a CPU
//! popped it), `RUNNING -> IDLE` (it returned `Pending`), `RUNNING -> WOKEN` (woken
//! while being polled: requeued at the back once the poll ends), `RUNNING -> DONE`.
//! A task is therefore never in two queues and never polled by two CPUs at once.
//!
//! Fairness: one pass of a CPU's loop polls at most the tasks queued when the pass
//! began; a task that wakes itself goes to the back. Then timers fire, then the next
//! pass. A task that wakes itself forever delays others by one poll per pass, no more.
//!
//! Idle: with nothing to run, nothing to steal and no idle work, a CPU raises its idle
//! flag, looks once more (interrupts off, through `Platform::idle`'s contract) and
//! halts. A wake that targets an idle CPU sends it a wake-up (an IPI in the kernel); a
//! wake that targets a busy CPU sends nothing.
//!
//! The hardware is reached only through [`Platform`], which the kernel implements with
//! GS-based CPU ids, IPIs, the TSC and `sti; hlt`, and the host tests implement with
//! threads.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

mod executor;
mod fair;
mod lock;
mod queue;
mod task;
mod timer;

pub use executor::{CpuStats, Executor, JoinHandle, MoveTo, Platform, MAX_CPUS};
pub use fair::{slice_ns, Group, MIN_GRANULARITY_NS, TARGET_LATENCY_NS};
pub use lock::{Acquire, AsyncLock, AsyncLockGuard};
pub use timer::Sleep;

#[cfg(test)]
mod fair_tests;
#[cfg(test)]
mod tests;
