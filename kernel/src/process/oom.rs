//! Memory limits and running out of memory, the process side: ending a process whose
//! fault would pass its memory limit, and choosing whom to end when the machine itself
//! runs out of frames.
//!
//! The address space (`crate::aspace`) finds both situations and calls in here, through
//! the two functions `limit_policy` installs in it at boot (`process::init`): the
//! address space names nothing of `process`.
//! **Over the limit**: the faulting process ends, with one log line naming the limit
//! (its own, or the ancestor's whose tree limit it hit). **Out of frames** (the frame
//! pool is down to the kernel's reserve): the process with the largest footprint (the
//! bytes charged to it alone, not its children's) is ended with its tree — never init
//! (or another process the kernel started) while some other process holds memory — and
//! the faulting thread waits, as a future, until that process is gone and its frames are
//! back, then tries again. The wait is bounded (`OOM_WAIT_NS`), and so are the tries
//! (`aspace::MAX_RECLAIMS`): a fault that still finds nothing ends its process as out of
//! memory. A process that is already ending and is the largest is waited for, not
//! ended again; so is one being torn down (its frames on their way back). docs/MEMORY.md, "Limits and running out", has the reasons.

use super::*;
use crate::aspace::{LimitPolicy, Reclaim};
use alloc::boxed::Box;
use panda_mm::account::OverLimit;

/// Longest a fault waits for the chosen process to be gone before it looks again.
const OOM_WAIT_NS: u64 = 5_000_000_000;

/// Processes the out-of-memory policy ended.
static OOM_KILLS: AtomicU64 = AtomicU64::new(0);
/// The pid last ended for lack of memory: two faults choosing the same victim at once
/// log it once.
static LAST_VICTIM: AtomicU64 = AtomicU64::new(0);

/// Processes the out-of-memory policy ended since boot (`SystemInfo::oom_kills`).
pub fn oom_kills() -> u64 {
    OOM_KILLS.load(Ordering::Relaxed)
}

/// This module's answers to the address space's fault path (`aspace::limits`),
/// installed by `process::init`.
pub(super) fn limit_policy() -> LimitPolicy {
    LimitPolicy {
        end_over_limit,
        out_of_frames: |pid| Box::pin(out_of_frames(pid)),
    }
}

fn find(pid: u64) -> Option<Arc<Process>> {
    let table = PROCESSES.lock();
    table.get(&pid).and_then(|e| e.process.upgrade())
}

/// Ends process `pid`, whose fault at `addr` would take its account past `over`'s
/// limit, with one log line. Returns false if there is no such process (a space no
/// process owns yet: the caller fails the fault instead).
pub fn end_over_limit(pid: u64, addr: u64, access: Access, over: OverLimit) -> bool {
    let Some(process) = find(pid) else {
        return false;
    };
    if !process.is_ending() {
        let kib = over.limit / 1024;
        if over.own {
            warn!(target: "user", "pid {pid} ({}) killed: page fault at {addr:#x} ({access:?}): over its memory limit of {kib} KiB", process.name);
        } else {
            warn!(target: "user", "pid {pid} ({}) killed: page fault at {addr:#x} ({access:?}): over the memory limit of {kib} KiB of its ancestor pid {}", process.name, over.id);
        }
        process.end(KILLED);
    }
    true
}

/// The machine is out of frames and process `pid` needs one: ends the process with the
/// largest footprint (unless one such is ending already) and waits until it is gone.
pub async fn out_of_frames(pid: u64) -> Reclaim {
    let Some(me) = find(pid) else {
        return Reclaim::Fail;
    };
    if me.is_ending() {
        return Reclaim::Ended;
    }
    let Some(record) = choose_and_end(pid) else {
        return Reclaim::Fail;
    };
    if me.is_ending() {
        return Reclaim::Ended;
    }
    let Some(exec) = crate::executor::get() else {
        return Reclaim::Fail;
    };
    // Until the victim is gone (every frame back), this process ends, or the bound.
    let ended = first(
        me.kill.wait(),
        first(record.gone.wait(), exec.sleep(OOM_WAIT_NS)),
    )
    .await;
    if ended.is_some() || me.is_ending() {
        Reclaim::Ended
    } else {
        Reclaim::Retry
    }
}

/// Picks the process with the largest footprint, ends it (logging why) unless it is
/// ending already, and returns its exit record to wait on; `None` if no process holds
/// memory. The chosen one may be the caller's own process (`pid`).
fn choose_and_end(pid: u64) -> Option<Arc<ExitRecord>> {
    // Taken out of the table first: a process handle dropped with the table locked
    // could be the last one, and its reaper takes the table's lock.
    let mut dying = None;
    let all: Vec<(Arc<Process>, bool)> = {
        let table = PROCESSES.lock();
        table
            .values()
            .filter_map(|e| {
                let p = e.process.upgrade();
                if p.is_none() && !e.record.gone.is_fired() {
                    dying = Some(e.record.clone());
                }
                p.map(|p| (p, e.parent == 0))
            })
            .collect()
    };
    // A process being torn down right now (its last handle dropped, its frames on
    // their way back) no longer shows a footprint, but its memory is coming: wait for
    // it rather than end another (seen in the fuzzer: init ended as "the largest of 1"
    // while the hog it had chosen was still freeing 400 MiB).
    if dying.is_some() {
        drop(all);
        return dying;
    }
    let holding = || all.iter().filter(|(p, _)| p.account().own() > 0);
    let considered = holding().count();
    // Processes the kernel started (init) only if nothing else holds memory.
    let largest = |top: bool| {
        holding()
            .filter(|(_, t)| *t == top)
            .max_by_key(|(p, _)| p.account().own())
    };
    let (victim, _) = largest(false).or_else(|| largest(true))?;
    let record = victim.reaper.record.clone();
    if !victim.is_ending() {
        victim.end(KILLED);
        if LAST_VICTIM.swap(victim.pid, Ordering::SeqCst) != victim.pid {
            OOM_KILLS.fetch_add(1, Ordering::Relaxed);
            warn!(
                target: "user",
                "oom: killed pid {} ({}), footprint {} KiB, the largest of {considered} processes (memory ran out at a fault of pid {pid})",
                victim.pid,
                victim.name,
                victim.account().own() / 1024
            );
        }
    }
    drop(all);
    Some(record)
}
