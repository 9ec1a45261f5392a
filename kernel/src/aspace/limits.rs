//! What the fault path asks of the process side when a fault would pass a memory limit
//! or finds the machine out of frames.
//!
//! Processes own address spaces, so the address space does not name them: the process
//! side (`process::oom`) installs its two answers here once at boot
//! (`set_limit_policy`), and the fault path calls `end_over_limit` and `out_of_frames`
//! below. Before that (or in a kernel with no processes) no process can be ended, and
//! the fault fails as out of memory.

use alloc::boxed::Box;
use core::future::Future;
use core::pin::Pin;

use panda_mm::account::OverLimit;
use panda_mm::region::Access;

/// What a fault that found no frame should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// Memory was (or is being) given back: try again.
    Retry,
    /// The faulting process itself is ending (chosen, or ended meanwhile).
    Ended,
    /// Nothing to end (or nobody to charge it to): fail the fault.
    Fail,
}

/// The waiting half of `LimitPolicy::out_of_frames`. Boxed: the only allocation is at a
/// fault that already found the frame pool at the kernel's reserve, which the kernel
/// heap may still draw on (the policy itself collects the process list there too).
pub type ReclaimWait = Pin<Box<dyn Future<Output = Reclaim> + Send>>;

/// The process side's answers (`process::oom`), by the pid a space's account is
/// charged to (`Account::id`).
pub struct LimitPolicy {
    /// Ends process `pid`, whose fault at `addr` would take its account past `over`'s
    /// limit, with one log line. False if no process owns the space (the fault fails).
    pub end_over_limit: fn(pid: u64, addr: u64, access: Access, over: OverLimit) -> bool,
    /// The machine is out of frames and process `pid` needs one: ends the process with
    /// the largest footprint and waits (bounded) until its memory is back.
    pub out_of_frames: fn(pid: u64) -> ReclaimWait,
}

static POLICY: spin::Once<LimitPolicy> = spin::Once::new();

/// Installs the process side's answers (once, at boot; later calls change nothing).
pub fn set_limit_policy(policy: LimitPolicy) {
    POLICY.call_once(|| policy);
}

/// `LimitPolicy::end_over_limit`; false before a policy is installed.
pub(super) fn end_over_limit(pid: u64, addr: u64, access: Access, over: OverLimit) -> bool {
    POLICY
        .get()
        .is_some_and(|p| (p.end_over_limit)(pid, addr, access, over))
}

/// `LimitPolicy::out_of_frames`; `Fail` before a policy is installed.
pub(super) async fn out_of_frames(pid: u64) -> Reclaim {
    match POLICY.get() {
        Some(p) => (p.out_of_frames)(pid).await,
        None => Reclaim::Fail,
    }
}
