//! A thread as a task: the loop that enters user mode and handles each trap, and the
//! time slice that gives the CPU's other tasks their turn.

use super::syscalls::system_call;
use super::*;
use core::task::Poll;

/// Spawns a thread of `process` from `ctx` as a task (on `cpu`, pinned, if given).
/// Returns its thread id, or `OutOfMemory` when the process has `MAX_THREADS` threads
/// not yet joined or memory is down to the kernel's reserve.
pub(super) fn start_thread(
    exec: &'static panda_sched::Executor<crate::executor::Machine>,
    process: &Arc<Process>,
    ctx: UserContext,
    cpu: Option<usize>,
) -> Result<u64, Error> {
    if !crate::memory::above_reserve() {
        return Err(Error::OutOfMemory);
    }
    // The slot is taken before the task exists, so concurrent spawns cannot overshoot
    // the limit; the handle fills it once the task is spawned.
    let tid = {
        let mut threads = process.threads.lock();
        if threads.len() >= MAX_THREADS {
            return Err(Error::OutOfMemory);
        }
        let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
        threads.insert(tid, None);
        tid
    };
    let future = run_thread_with_id(process.clone(), ctx, tid);
    let handle = match (&process.sched, cpu) {
        (Some(group), cpu) => exec.spawn_in(group, cpu, cpu.is_some(), future),
        (None, Some(cpu)) => exec.spawn_pinned(cpu, future),
        (None, None) => exec.spawn(future),
    };
    if let Some(slot) = process.threads.lock().get_mut(&tid) {
        *slot = Some(handle);
    }
    Ok(tid)
}

/// A thread of `process` starting from `ctx`, as a future that completes with the
/// thread's status (its exit code, the process's status if the process ended first).
pub fn run_thread(process: Arc<Process>, ctx: UserContext) -> impl Future<Output = u64> {
    let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
    run_thread_with_id(process, ctx, tid)
}

fn run_thread_with_id(
    process: Arc<Process>,
    ctx: UserContext,
    tid: u64,
) -> impl Future<Output = u64> {
    // Counted now, not at the first poll: a sibling that exits meanwhile must not
    // see the process as threadless.
    process.live_threads.fetch_add(1, Ordering::SeqCst);
    thread_loop(process, ctx, tid)
}

/// What a system call asks of the thread loop.
pub(super) enum After {
    Resume,
    ExitThread(u64),
    ExitProcess(u64),
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
            Exit::PageFault { addr, access } => {
                let access = panda_platform::vm::fault_access(access);
                // Almost every fault completes on its first poll (a pooled or freshly
                // zeroed frame), so it is polled once directly; only one that must wait
                // (for the zeroing task) races the end of its process. (Building the
                // race for every fault cost two 168-byte copies of the future and a
                // second poll.)
                let mut fault = pin!(process.space.handle_fault_async(addr, access));
                let resolved =
                    match core::future::poll_fn(|cx| Poll::Ready(fault.as_mut().poll(cx))).await {
                        Poll::Ready(result) => Some(result),
                        Poll::Pending => process.unless_killed(fault).await,
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

/// Yields once to the executor.
pub(super) async fn yield_once() {
    if let Some(exec) = crate::executor::get() {
        exec.yield_now().await;
    }
}
