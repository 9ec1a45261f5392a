//! User processes and threads as executor tasks.
//!
//! A thread is a future: `run_thread` loops on `user::run`, which returns at the
//! thread's next trap on the executor's stack; the future then handles the trap —
//! a system call (which may await), a page fault (resolved in the process's address
//! space, or the end of the process), an interrupt (the timer tick makes the thread
//! yield, so others on the CPU get their turn) — and goes round again. Between traps
//! the thread's whole state is its `UserContext`.
//!
//! This is the first slice of the user-space issue: one thread per process, the
//! process, environment and time system calls, faults in every region. ELF loading,
//! the initrd, spawn/wait, threads, buffers and files come next.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use panda_abi::syscall::{self, Error};
use panda_arch::user::{self, Exit, UserContext};
use panda_mm::region::Access;

use crate::aspace::{AddressSpace, FaultError};

/// Exit status of a process ended by the kernel (fault, protection violation).
pub const KILLED: i64 = -1;

static NEXT_PID: AtomicU64 = AtomicU64::new(1);

/// A process: an address space and an id.
pub struct Process {
    pub pid: u64,
    pub space: Arc<AddressSpace>,
}

impl Process {
    pub fn new(space: Arc<AddressSpace>) -> Arc<Self> {
        Arc::new(Self {
            pid: NEXT_PID.fetch_add(1, Ordering::Relaxed),
            space,
        })
    }
}

/// What a system call asks of the thread loop.
enum After {
    Resume,
    Exit(i64),
}

/// Runs the process's thread from `ctx` until the process exits; returns its status.
pub async fn run_thread(process: Arc<Process>, mut ctx: UserContext) -> i64 {
    let status = loop {
        // The task may have moved CPUs, or another space may have run here meanwhile.
        if !process.space.is_current() {
            process.space.activate();
        }
        match user::run(&mut ctx) {
            Exit::Syscall => match system_call(&process, &mut ctx).await {
                After::Resume => {}
                After::Exit(code) => break code,
            },
            Exit::Trap { vector: 14 } => {
                let access = if ctx.error_code & 0x10 != 0 {
                    Access::Execute
                } else if ctx.error_code & 2 != 0 {
                    Access::Write
                } else {
                    Access::Read
                };
                if let Err(e) = process.space.handle_fault_async(ctx.cr2, access).await {
                    warn!(
                        target: "user",
                        "pid {} killed: page fault at {:#x} ({access:?}, rip {:#x}): {}",
                        process.pid,
                        ctx.cr2,
                        ctx.rip,
                        describe(e)
                    );
                    break KILLED;
                }
            }
            // An interrupt ended the run (the timer tick, an IPI): let others run.
            Exit::Trap { vector } if vector >= 32 => yield_once().await,
            Exit::Trap { vector } => {
                let (mnemonic, name) = panda_arch::trap::exception_name(vector as u64);
                warn!(
                    target: "user",
                    "pid {} killed: {mnemonic} ({name}) at rip {:#x}, error code {:#x}",
                    process.pid,
                    ctx.rip,
                    ctx.error_code
                );
                break KILLED;
            }
        }
    };
    process.space.deactivate();
    status
}

fn describe(e: FaultError) -> &'static str {
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
async fn yield_once() {
    if let Some(exec) = crate::exec::get() {
        exec.yield_now().await;
    }
}

async fn system_call(process: &Process, ctx: &mut UserContext) -> After {
    let (op, a0, a1) = (ctx.rax as usize, ctx.rdi, ctx.rsi);
    let result: Result<usize, Error> = match op {
        syscall::OP_PROCESS_EXIT => return After::Exit(a0 as i64),
        syscall::OP_PROCESS_YIELD => {
            yield_once().await;
            Ok(0)
        }
        syscall::OP_PROCESS_GET_PID => Ok(process.pid as usize),
        syscall::OP_PROCESS_BRK => brk(process, a0),
        syscall::OP_PROCESS_SLEEP => match crate::exec::get() {
            Some(exec) => {
                exec.sleep(a0).await;
                Ok(0)
            }
            None => Err(Error::NotPermitted),
        },
        syscall::OP_ENVIRONMENT_LOG => log_user(process, a0, a1),
        syscall::OP_ENVIRONMENT_TIME => Ok(panda_arch::time::now_ns() as usize),
        syscall::OP_CPU_COUNT => Ok(panda_arch::percpu::online_count()),
        _ => Err(Error::UnknownOperation),
    };
    ctx.rax = syscall::encode(result) as u64;
    After::Resume
}

fn brk(process: &Process, new_end: u64) -> Result<usize, Error> {
    if new_end == 0 {
        return Ok(process.space.regions().brk() as usize);
    }
    process
        .space
        .set_brk(new_end)
        .map(|b| b as usize)
        .map_err(|_| Error::InvalidArgument)
}

/// Reads a u64 of the process's memory, faulting a valid page in as a user access would.
fn read_user(process: &Process, addr: u64) -> Result<u64, Error> {
    match panda_arch::probe::read_user_u64(addr) {
        Ok(v) => Ok(v),
        Err(_) => {
            process
                .space
                .handle_fault(addr, Access::Read)
                .map_err(|_| Error::BadAddress)?;
            panda_arch::probe::read_user_u64(addr).map_err(|_| Error::BadAddress)
        }
    }
}

fn log_user(process: &Process, ptr: u64, len: u64) -> Result<usize, Error> {
    const MAX: u64 = 1024;
    if len > MAX || ptr.checked_add(len).is_none() {
        return Err(Error::InvalidArgument);
    }
    let mut bytes = [0u8; MAX as usize];
    let mut at = 0u64;
    while at < len {
        let word = read_user(process, (ptr + at) & !7)?.to_le_bytes();
        let from = ((ptr + at) & 7) as usize;
        let n = (8 - from).min((len - at) as usize);
        bytes[at as usize..at as usize + n].copy_from_slice(&word[from..from + n]);
        at += n as u64;
    }
    let text = core::str::from_utf8(&bytes[..len as usize]).unwrap_or("<not UTF-8>");
    info!(target: "user", "pid {}: {}", process.pid, text);
    Ok(len as usize)
}
