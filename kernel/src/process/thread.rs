//! A thread as a task: the loop that enters user mode and handles each trap (a system
//! call goes to `syscalls`, which says what the loop does next), and the time slice
//! that gives the CPU's other tasks their turn. Starting a thread as a task is
//! `process::start_thread`'s (the process's thread table is there).

use super::syscalls::{system_call, After};
use super::*;
use crate::executor::yield_once;
use core::task::Poll;
use panda_mm::region::FaultDecision;

/// A thread of `process` starting from `ctx`, as a future that completes with the
/// thread's status (its exit code, the process's status if the process ended first).
pub fn run_thread(process: Arc<Process>, ctx: UserContext) -> impl Future<Output = u64> {
    let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
    run_thread_with_id(process, ctx, tid)
}

pub(super) fn run_thread_with_id(
    process: Arc<Process>,
    ctx: UserContext,
    tid: u64,
) -> impl Future<Output = u64> {
    // Counted now, not at the first poll: a sibling that exits meanwhile must not
    // see the process as threadless.
    process.live_threads.fetch_add(1, Ordering::SeqCst);
    thread_loop(process, ctx, tid)
}

async fn thread_loop(process: Arc<Process>, mut ctx: UserContext, tid: u64) -> u64 {
    // Before every return to user mode the thread asks the scheduler whether its slice
    // is over (or a woken thread should run first): then it yields, and the CPU's other
    // tasks run. A thread whose system calls and faults all complete at once never
    // returns to the executor by itself, and a thread spinning in user mode comes back
    // only at a timer tick (`Exit::Interrupt`), so this check is the preemption point
    // for both (docs/SCHEDULING.md).
    let status = loop {
        if process.is_ending() {
            break process.reaper.record.status.load(Ordering::SeqCst);
        }
        if crate::executor::should_yield() {
            yield_once().await;
            continue;
        }
        // The task may have moved CPUs, or another space may have run here meanwhile.
        if !process.space.is_current() {
            process.space.activate();
        }
        match user::run(&mut ctx) {
            Exit::Syscall => match system_call(&process, tid, &mut ctx).await {
                After::Resume => {}
                After::ExitThread(code) => break code,
                After::ExitProcess(code) => {
                    process.end(code);
                    break code;
                }
            },
            Exit::PageFault { addr, at, access } => {
                // Almost every fault completes on its first poll (a pooled or freshly
                // zeroed frame), so it is polled once directly; only one that must wait
                // (for the zeroing task) races the end of its process. (Building the
                // race for every fault cost two 168-byte copies of the future and a
                // second poll.)
                // A kernel-half or non-canonical address (arch decodes CR2 into a
                // `UserAddr` only in the user half) is outside every region, as the
                // bookkeeping would say.
                let resolved = match at {
                    None => Some(Err(FaultError::Denied(FaultDecision::OutsideRegions))),
                    Some(at) => {
                        let mut fault = pin!(process.space.handle_fault_async(at, access));
                        match core::future::poll_fn(|cx| Poll::Ready(fault.as_mut().poll(cx))).await
                        {
                            Poll::Ready(result) => Some(result),
                            Poll::Pending => process.unless_killed(fault).await,
                        }
                    }
                };
                match resolved {
                    Some(Ok(())) | None => {}
                    Some(Err(e)) => {
                        warn!(
                            target: "user",
                            "pid {} ({}) thread {tid} killed: page fault at {:#x} ({access:?}, rip {:#x}): {}",
                            process.pid,
                            process.name,
                            addr,
                            ctx.rip,
                            describe(e)
                        );
                        process.end(KILLED);
                        break KILLED;
                    }
                }
            }
            // An interrupt ended the run (the timer tick, an IPI): the check at the top
            // of the loop decides whether the thread's slice is over.
            Exit::Interrupt { .. } => {}
            Exit::Exception { vector, error_code } => {
                let (mnemonic, name) = panda_arch::trap::exception_name(vector as u64);
                warn!(
                    target: "user",
                    "pid {} ({}) thread {tid} killed: {mnemonic} ({name}) at rip {:#x}, error code {:#x}",
                    process.pid,
                    process.name,
                    ctx.rip,
                    error_code
                );
                process.end(KILLED);
                break KILLED;
            }
        }
    };
    process.space.deactivate();
    process.thread_ended(status);
    status
}

pub(super) fn describe(e: FaultError) -> &'static str {
    use panda_mm::region::FaultDecision::*;
    match e {
        FaultError::OutOfMemory => "out of memory",
        FaultError::Denied(ProtectionViolation) => "protection violation",
        FaultError::Denied(StackOverflow) => "stack overflow (past 16 MiB)",
        FaultError::Denied(OutsideRegions) => "outside every region",
        FaultError::Denied(DemandZero(_)) => "unexpected",
    }
}
