//! System calls: decoding `rax` and the arguments, and each operation's handler.
//! User memory is reached only through `AddressSpace::read_user`/`write_user` (copies,
//! faulting pages in as the user's own access would), over a `UserRange`: each user
//! pointer argument is checked once here (`user_range`: `BadAddress` unless it lies in
//! the user half), where the handler first uses it — after the checks that come before
//! it (lengths: `InvalidArgument`; a child's id: `NotFound`) — and everything below
//! takes the checked range.

use super::*;
use crate::executor::yield_once;
use panda_arch::PAGE_SIZE;
use panda_mm::CpuId;
use panda_platform::vm::UserRange;
use panda_sched::AsyncLock;

pub(super) fn user_error(e: FaultError) -> Error {
    match e {
        FaultError::OutOfMemory => Error::OutOfMemory,
        FaultError::Denied(_) => Error::BadAddress,
    }
}

/// The one check of a user pointer argument: `[ptr, ptr + len)` must lie in the user
/// half, without overflow (`BadAddress` otherwise, whatever `len`, zero included).
/// Whether the user may access the bytes is the copy's question, later.
fn user_range(ptr: u64, len: u64) -> Result<UserRange, Error> {
    UserRange::new(ptr, len).ok_or(Error::BadAddress)
}

/// What a system call asks of the thread loop (`thread`), which calls in here.
pub(super) enum After {
    Resume,
    ExitThread(u64),
    ExitProcess(u64),
}

pub(super) async fn system_call(process: &Arc<Process>, tid: u64, ctx: &mut UserContext) -> After {
    let (op, a0, a1, a2, a3) = (ctx.rax as usize, ctx.rdi, ctx.rsi, ctx.rdx, ctx.r10);
    let exec = crate::executor::get();
    let result: Result<usize, Error> = match op {
        syscall::OP_PROCESS_EXIT => return After::ExitProcess(syscall::exit_status(a0) as u64),
        syscall::OP_THREAD_EXIT => return After::ExitThread(syscall::exit_status(a0) as u64),
        syscall::OP_PROCESS_YIELD => {
            yield_once().await;
            Ok(0)
        }
        syscall::OP_PROCESS_GET_PID => Ok(process.pid as usize),
        syscall::OP_PROCESS_BRK => brk(process, a0).await,
        syscall::OP_PROCESS_SLEEP => match exec {
            Some(exec) => {
                process.unless_killed(exec.sleep(a0)).await;
                Ok(0)
            }
            None => Err(Error::NotPermitted),
        },
        syscall::OP_PROCESS_WAIT => wait_for_child(process, a0, None).await,
        syscall::OP_PROCESS_WAIT_TIMEOUT => wait_for_child(process, a0, Some(a1)).await,
        syscall::OP_PROCESS_KILL => kill_child(process, a0),
        syscall::OP_PROCESS_CPU_TIME => process_cpu_time(process, a0),
        syscall::OP_THREAD_CPU_TIME => match exec {
            Some(exec) => Ok(exec.current_cpu_time_ns() as usize),
            None => Err(Error::NotPermitted),
        },
        syscall::OP_PROCESS_MEMORY => memory_to_user(process, a0, a1, a2).await,
        syscall::OP_ENVIRONMENT_SPAWN => spawn_from_user(process, a0, a1, a2).await,
        syscall::OP_ENVIRONMENT_SPAWN_ARGS => {
            spawn_args_from_user(process, [a0, a1, a2, a3], ctx.r8, 0).await
        }
        syscall::OP_ENVIRONMENT_SPAWN_LIMITED => {
            spawn_args_from_user(process, [a0, a1, a2, a3], ctx.r8, ctx.r9).await
        }
        syscall::OP_ENVIRONMENT_LOG => log_user(process, a0, a1).await,
        syscall::OP_ENVIRONMENT_TIME => Ok(panda_arch::time::now_ns() as usize),
        syscall::OP_ENVIRONMENT_INFO => info_to_user(process, a0, a1).await,
        syscall::OP_CPU_COUNT => Ok(panda_arch::percpu::online_count()),
        syscall::OP_THREAD_CURRENT_CPU => Ok(panda_arch::percpu::current_index()),
        syscall::OP_THREAD_SPAWN => match exec {
            Some(exec) => {
                let user_end = panda_arch::USER_END;
                // The stack top may be 0: a thread that never touches its stack
                // needs none. Kernel-half and non-canonical values are refused.
                if !(panda_abi::ELF_LOAD_BASE as u64..user_end).contains(&a0) || a1 > user_end {
                    Err(Error::InvalidArgument)
                } else {
                    let child = UserContext {
                        rip: a0,
                        rsp: a1,
                        rdi: a2,
                        ..Default::default()
                    };
                    process.charge_thread().and_then(|()| {
                        start_thread(exec, process, child, None)
                            .map(|tid| tid as usize)
                            .inspect_err(|_| process.uncharge_thread())
                    })
                }
            }
            None => Err(Error::NotPermitted),
        },
        syscall::OP_THREAD_GET_ID => Ok(tid as usize),
        syscall::OP_THREAD_SET_FS_BASE => {
            if user::valid_fs_base(a0) {
                ctx.fs_base = a0;
                Ok(0)
            } else {
                Err(Error::InvalidArgument)
            }
        }
        syscall::OP_THREAD_JOIN => join(process, tid, a0).await,
        syscall::OP_THREAD_SET_AFFINITY => match exec {
            // An online CPU is below `MAX_CPUS`, so it is a `CpuId`.
            Some(exec) if (a0 as usize) < panda_arch::percpu::online_count() => {
                match CpuId::new(a0 as usize) {
                    Some(cpu) => {
                        exec.move_to(cpu, true).await;
                        Ok(0)
                    }
                    None => Err(Error::InvalidArgument),
                }
            }
            _ => Err(Error::InvalidArgument),
        },
        syscall::OP_BUFFER_ALLOC => buffer_alloc(process, a0).await,
        syscall::OP_BUFFER_FREE => match process.unless_killed(process.space.free_buffer(a0)).await
        {
            Some(result) => result.map(|()| 0).map_err(|_| Error::NotFound),
            None => Ok(0), // the caller is ending; the result is never seen
        },
        syscall::OP_BUFFER_LOG => buffer_log(process, a0, a1).await,
        syscall::OP_FILE_READ_BUFFER => read_file(process, a0, a1, a2, a3).await,
        _ => Err(Error::UnknownOperation),
    };
    ctx.rax = syscall::encode(result) as u64;
    After::Resume
}

async fn brk(process: &Process, new_end: u64) -> Result<usize, Error> {
    if new_end == 0 {
        return Ok(process.space.brk() as usize);
    }
    // Growth the memory limit could never back is refused (the pages are charged only
    // when touched; this catches the request that cannot fit at all). Not the first
    // growth from the heap's base: that is how a runtime reserves its allocator's range
    // (the user runtime takes 64 GiB of address space at once, docs/PROGRAMS.md), and
    // only what it touches costs anything.
    let pages = |b: u64| b.div_ceil(PAGE_SIZE);
    let old = process.space.brk();
    let growth = pages(new_end)
        .saturating_sub(pages(old))
        .saturating_mul(PAGE_SIZE);
    if old > panda_abi::HEAP_BASE as u64 && growth > process.account().available() {
        return Err(Error::OutOfMemory);
    }
    // A shrink unmaps in batches and yields between them; a process that ends
    // meanwhile stops there (the rest goes with its space).
    match process.unless_killed(process.space.set_brk(new_end)).await {
        Some(result) => result
            .map(|b| b as usize)
            .map_err(|_| Error::InvalidArgument),
        None => Ok(0), // the caller is ending; the result is never seen
    }
}

/// `OP_BUFFER_ALLOC`. A buffer's bookkeeping is kernel memory: refused below the
/// reserve — after the out-of-memory policy had its chance to end the largest process,
/// as a fault would. A buffer larger than the memory limit leaves room for is refused
/// too (its pages are charged only when touched).
async fn buffer_alloc(process: &Process, size: u64) -> Result<usize, Error> {
    if !crate::memory::above_reserve() {
        let _ = super::out_of_frames(process.pid).await;
        if !crate::memory::above_reserve() {
            return Err(Error::OutOfMemory);
        }
    }
    if size.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE) > process.account().available() {
        return Err(Error::OutOfMemory);
    }
    process
        .space
        .alloc_buffer(size)
        .map(|a| a as usize)
        .map_err(|e| match e {
            MmError::OutOfMemory => Error::OutOfMemory,
            _ => Error::InvalidArgument,
        })
}

/// `OP_PROCESS_MEMORY`: the memory account of the caller (`pid` 0) or of one of its
/// children (unreaped and not yet gone).
async fn memory_to_user(process: &Process, pid: u64, ptr: u64, len: u64) -> Result<usize, Error> {
    let usage = if pid == 0 || pid == process.pid {
        process.account().snapshot()
    } else {
        let child = unreaped_child(process, pid)?.ok_or(Error::NotFound)?;
        let usage = child.account().snapshot();
        drop(child);
        usage
    };
    let info = syscall::MemoryInfo {
        limit: usage.limit,
        usage: usage.usage,
        own: usage.own,
        peak: usage.peak,
        available: usage.available,
    };
    let mut bytes = [0u8; syscall::MemoryInfo::WORDS * 8];
    for (i, w) in info.to_words().iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let n = (len as usize).min(bytes.len());
    write_user(process, user_range(ptr, n as u64)?, &bytes[..n]).await?;
    Ok(n)
}

/// Copies the user memory `from` into `out` (as long as `from`; faulting pages in).
async fn read_user(process: &Process, from: UserRange, out: &mut [u8]) -> Result<(), Error> {
    process.space.read_user(from, out).await.map_err(user_error)
}

/// Writes `bytes` to the user memory `to` (as long as `bytes`), faulting pages in as a user write would.
/// The whole destination is checked (and faulted in) before any byte is written, so a
/// destination that runs into memory the caller may not write gets `BadAddress` and is
/// left untouched. (If another thread of the process frees part of it between the two
/// passes, the write stops there with `BadAddress`.)
async fn write_user(process: &Process, to: UserRange, bytes: &[u8]) -> Result<(), Error> {
    process
        .space
        .write_user(to, bytes)
        .await
        .map_err(user_error)
}

async fn user_path(process: &Process, ptr: u64, len: u64) -> Result<String, Error> {
    if len == 0 || len > crate::initrd::MAX_PATH as u64 {
        return Err(Error::InvalidArgument);
    }
    let from = user_range(ptr, len)?;
    let mut buf = [0u8; crate::initrd::MAX_PATH];
    read_user(process, from, &mut buf[..len as usize]).await?;
    core::str::from_utf8(&buf[..len as usize])
        .map(String::from)
        .map_err(|_| Error::InvalidArgument)
}

async fn spawn_from_user(process: &Process, ptr: u64, len: u64, arg: u64) -> Result<usize, Error> {
    let path = user_path(process, ptr, len).await?;
    spawn(&path, arg, &Args::NONE, Some(process), None)
        .await
        .map(|p| p.pid as usize)
        .map_err(SpawnError::to_error)
}

/// `OP_ENVIRONMENT_SPAWN_ARGS`: path, argument block (`panda_abi::args`), number; and
/// `OP_ENVIRONMENT_SPAWN_LIMITED`: the same with a memory limit (0: the caller's). The
/// checks go lengths first (path, then block: `InvalidArgument`), then addresses
/// (`BadAddress`), then the block's contents (`InvalidArgument`), then the program, then
/// the limit (`InvalidArgument` above the caller's).
async fn spawn_args_from_user(
    process: &Process,
    [path_ptr, path_len, args_ptr, args_len]: [u64; 4],
    arg: u64,
    limit: u64,
) -> Result<usize, Error> {
    if path_len == 0 || path_len > crate::initrd::MAX_PATH as u64 {
        return Err(Error::InvalidArgument);
    }
    if args_len > panda_abi::args::MAX_ARGS_BYTES as u64 {
        return Err(Error::InvalidArgument);
    }
    let path = user_path(process, path_ptr, path_len).await?;
    let mut block = super::try_zeroed(args_len as usize).ok_or(Error::OutOfMemory)?;
    read_user(process, user_range(args_ptr, args_len)?, &mut block).await?;
    let args = Args::new(&block)?;
    let limit = (limit != 0).then_some(limit);
    spawn(&path, arg, &args, Some(process), limit)
        .await
        .map(|p| p.pid as usize)
        .map_err(SpawnError::to_error)
}

async fn wait_for_child(
    process: &Process,
    pid: u64,
    timeout_ns: Option<u64>,
) -> Result<usize, Error> {
    if pid == process.pid {
        return Err(Error::NotPermitted);
    }
    match process
        .unless_killed(wait_child(process.pid, pid, timeout_ns))
        .await
    {
        Some(Ok(status)) => {
            // Reaped: no longer a child to kill or count against the limit.
            process.children.lock().retain(|&c| c != pid);
            Ok(status as usize)
        }
        Some(Err(e)) => Err(e),
        None => Ok(0), // the caller is ending; the result is never seen
    }
}

/// Child `pid` of `process`, if it is an unreaped child (`NotFound` otherwise): the
/// process while it still exists, `None` once it is gone (ended, not yet waited for).
fn unreaped_child(process: &Process, pid: u64) -> Result<Option<Arc<Process>>, Error> {
    let table = PROCESSES.lock();
    let entry = table
        .get(&pid)
        .filter(|e| e.parent == process.pid && !e.orphan)
        .ok_or(Error::NotFound)?;
    Ok(entry.process.upgrade())
}

/// Ends child `pid` of `process` as killed. `NotFound` if it is not an unreaped
/// child; killing a child that already ended (not yet waited for) does nothing.
fn kill_child(process: &Process, pid: u64) -> Result<usize, Error> {
    if let Some(child) = unreaped_child(process, pid)? {
        info!(target: "user", "pid {} ({}) killed by its parent, pid {}", child.pid, child.name, process.pid);
        child.end(KILLED);
    }
    Ok(0)
}

/// CPU time of the caller's process (`pid` 0 or its own) or of a running child.
fn process_cpu_time(process: &Process, pid: u64) -> Result<usize, Error> {
    let exec = crate::executor::get().ok_or(Error::NotPermitted)?;
    if pid == 0 || pid == process.pid {
        let group = process.sched.as_ref().ok_or(Error::NotFound)?;
        return Ok(exec.group_cpu_time_ns(group) as usize);
    }
    unreaped_child(process, pid)?
        .and_then(|c| c.sched.as_ref().map(|g| g.cpu_time_ns() as usize))
        .ok_or(Error::NotFound)
}

async fn join(process: &Process, me: u64, tid: u64) -> Result<usize, Error> {
    if tid == me {
        return Err(Error::NotPermitted);
    }
    let handle = match process.threads.lock().get_mut(&tid) {
        None => return Err(Error::NotFound),
        // Someone else is joining it.
        Some(slot) => slot.take().ok_or(Error::NotFound)?,
    };
    match process.unless_killed(handle).await {
        Some(status) => {
            remove_id(&mut process.threads.lock(), tid);
            Ok(status as usize)
        }
        None => Ok(0), // the caller is ending; the result is never seen
    }
}

/// Longest text one log call (or buffer log call) writes.
pub const MAX_LOG: u64 = 1 << 20;

async fn log_user(process: &Process, ptr: u64, len: u64) -> Result<usize, Error> {
    // The length first, then the address.
    if len > MAX_LOG {
        return Err(Error::InvalidArgument);
    }
    print_user(process, user_range(ptr, len)?).await
}

/// Writes user text to the console as it is (user output is the console's, not the
/// kernel log's): invalid UTF-8 shows as U+FFFD. A line the user leaves open stays
/// open; kernel lines start on a fresh line regardless (`with_console_line`).
fn console_bytes(w: &mut dyn core::fmt::Write, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        let _ = w.write_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            let _ = w.write_str("\u{fffd}");
        }
    }
}

/// Serialises user output: one write call is one piece on the console. An async lock:
/// a call that finds it held waits as a future (racing its process's end), so it
/// spins no CPU however long the holder writes; the holder keeps it across the yields
/// between its pieces. Kernel lines do not take it (they take only the console's spin
/// lock, per line), so they still get out while a user call holds it; they come out
/// between two pieces of the user's text, on a line of their own.
static USER_OUTPUT: AsyncLock = AsyncLock::new();

/// Writes the user memory `range` (at most `MAX_LOG` bytes) to the console as one piece: concurrent
/// user writers never split it. The range is first faulted in as a user read would;
/// then, holding the user-output lock, it is copied out and printed `PRINT_PIECE`
/// bytes at a time, each piece under the console's spin lock (interrupts off for one
/// piece only) and the page-table lock, with a turn for the CPU's other tasks between
/// pieces when `executor::Slice` says so. User memory is copied, never borrowed:
/// another thread may write it meanwhile, which only changes the output. If another
/// thread unmapped a page meanwhile, the output stops there and the call reports
/// `BadAddress`. If the process ends meanwhile (killed), the output stops at the next
/// piece and the lock goes to the next writer.
async fn print_user(process: &Process, range: UserRange) -> Result<usize, Error> {
    debug_assert!(range.len() <= MAX_LOG, "the callers check the length first");
    process
        .space
        .fault_in(range, false)
        .await
        .map_err(user_error)?;
    let Some(_one_writer) = process.unless_killed(USER_OUTPUT.lock()).await else {
        return Ok(0); // the caller is ending; the result is never seen
    };
    let mut slice = crate::executor::Slice::start();
    let mut piece = [0u8; PRINT_PIECE + 3];
    // Bytes of a character cut at the end of the last piece, moved to the front.
    let mut carried = 0;
    let mut rest = range;
    while !rest.is_empty() {
        if process.is_ending() {
            return Ok(0); // killed mid-call: the result is never seen
        }
        let (head, tail) = rest.split_at(PRINT_PIECE as u64);
        let n = head.len() as usize;
        if !process
            .space
            .read_mapped(head, &mut piece[carried..carried + n])
        {
            return Err(Error::BadAddress);
        }
        rest = tail;
        let filled = carried + n;
        let keep = if !rest.is_empty() {
            cut_character(&piece[..filled])
        } else {
            0
        };
        panda_arch::serial::with_console(|w| console_bytes(w, &piece[..filled - keep]));
        piece.copy_within(filled - keep..filled, 0);
        carried = keep;
        slice.maybe_yield().await;
    }
    Ok(range.len() as usize)
}

/// Bytes of user output copied and printed at a time: at most 256 bytes on the UART
/// (a newline is two), about 22 ms with interrupts off at 115,200 baud; the screen
/// console scrolls at most a few times per piece.
const PRINT_PIECE: usize = 128;

/// How many bytes at the end of `bytes` are the start of a UTF-8 character that
/// continues after them (0 to 3), so a piece boundary never splits one.
fn cut_character(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xc0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let needed = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Writes part of a buffer to the console (like `OP_ENVIRONMENT_LOG`, but the range must
/// lie inside one live buffer).
async fn buffer_log(process: &Process, addr: u64, len: u64) -> Result<usize, Error> {
    // The same precedence as OP_ENVIRONMENT_LOG: the length first, then the address.
    if len > MAX_LOG {
        return Err(Error::InvalidArgument);
    }
    let range = user_range(addr, len)?;
    if !process.space.in_buffer(range) {
        return Err(Error::BadAddress);
    }
    print_user(process, range).await
}

async fn read_file(
    process: &Process,
    path_ptr: u64,
    path_len: u64,
    buffer: u64,
    len: u64,
) -> Result<usize, Error> {
    let path = user_path(process, path_ptr, path_len).await?;
    let file = crate::initrd::find(&path).ok_or(Error::NotFound)?;
    let n = (len as usize).min(file.len());
    write_user(process, user_range(buffer, n as u64)?, &file[..n]).await?;
    Ok(n)
}

/// The machine and memory counters.
fn system_info() -> SystemInfo {
    use crate::aspace::{self as a, Stat};
    SystemInfo {
        cpus: panda_arch::percpu::online_count() as u64,
        memory_total: panda_platform::frame::total_frames() * PAGE_SIZE,
        memory_free: crate::memory::frames_not_in_use() * PAGE_SIZE,
        faults: a::stat(Stat::Faults),
        zero_pool_hits: a::stat(Stat::PoolHits),
        zero_pool_waits: a::stat(Stat::PoolWaits),
        zeroed_inline: a::stat(Stat::ZeroedInline),
        shootdowns: a::stat(Stat::Shootdowns),
        shootdown_ipis: a::stat(Stat::ShootdownIpis),
        tsc_hz: panda_arch::time::tsc_hz(),
        fault_handler_cycles: a::stat(Stat::ProfHandler),
        fault_classify_cycles: a::stat(Stat::ProfClassify),
        fault_zero_cycles: a::stat(Stat::ProfZero),
        fault_map_cycles: a::stat(Stat::ProfMap),
        profiled_faults: a::stat(Stat::ProfFaults),
        kernel_heap_bytes: crate::heap::live_bytes(),
        zero_pools_on: crate::memory::prezero() as u64,
        zeroed_ahead: CpuId::all(panda_arch::percpu::online_count())
            .filter_map(panda_platform::frame::pool_stats)
            .map(|s| s.zeroed)
            .sum(),
        zeroed_for_other_cpus: CpuId::all(panda_arch::percpu::online_count())
            .filter_map(panda_platform::frame::pool_stats)
            .map(|s| s.from_others)
            .sum(),
        zero_ahead_cycles: panda_platform::frame::zero_ahead_cycles(),
        memory_account_errors: crate::aspace::account_errors(),
        oom_kills: super::oom_kills(),
        frame_bookkeeping_bytes: panda_platform::frame::bookkeeping_entries() as u64
            * crate::BOOKKEEPING_ENTRY_BYTES,
    }
}

async fn info_to_user(process: &Process, ptr: u64, len: u64) -> Result<usize, Error> {
    let mut bytes = [0u8; SystemInfo::WORDS * 8];
    for (i, w) in system_info().to_words().iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let n = (len as usize).min(bytes.len());
    write_user(process, user_range(ptr, n as u64)?, &bytes[..n]).await?;
    Ok(n)
}
