//! One wrapper per system call. `syscall` takes the operation in `rax` and arguments
//! in `rdi, rsi, rdx, r10, r8, r9`; the result comes back in `rax`, and only `rcx` and `r11`
//! are clobbered.

use panda_abi::syscall::{self as abi, decode, Error, MemoryInfo, SystemInfo};

type R = Result<usize, Error>;

#[inline(always)]
fn call(op: usize, a0: u64, a1: u64, a2: u64, a3: u64) -> isize {
    let result: isize;
    // SAFETY: the kernel's syscall entry preserves every register but rax (result),
    // rcx and r11 (clobbered by the instruction itself), and touches user memory only
    // as each operation documents.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") op as isize => result,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    result
}

/// A call with a fifth argument in `r8` (`OP_ENVIRONMENT_SPAWN_ARGS`).
#[inline(always)]
fn call5(op: usize, a: [u64; 5]) -> isize {
    let result: isize;
    // SAFETY: as for `call`: only rax, rcx and r11 change; user memory is touched only
    // as the operation documents.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") op as isize => result,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    result
}

/// A call with a fifth and sixth argument in `r8`, `r9` (`OP_ENVIRONMENT_SPAWN_LIMITED`).
#[inline(always)]
fn call6(op: usize, a: [u64; 6]) -> isize {
    let result: isize;
    // SAFETY: as for `call`: only rax, rcx and r11 change; user memory is touched only
    // as the operation documents.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") op as isize => result,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    result
}

/// A raw six-argument call, for tests of the kernel's argument checks.
pub fn raw6(op: usize, a: [u64; 6]) -> isize {
    call6(op, a)
}

/// A raw five-argument call, for tests of the kernel's argument checks.
pub fn raw5(op: usize, a: [u64; 5]) -> isize {
    call5(op, a)
}

/// A raw call, for tests of the kernel's argument checks.
pub fn raw(op: usize, a0: u64, a1: u64, a2: u64, a3: u64) -> isize {
    call(op, a0, a1, a2, a3)
}

pub fn exit(code: u64) -> ! {
    call(abi::OP_PROCESS_EXIT, code, 0, 0, 0);
    unreachable!("OP_PROCESS_EXIT returned")
}

pub fn yield_now() {
    call(abi::OP_PROCESS_YIELD, 0, 0, 0, 0);
}

pub fn pid() -> u64 {
    call(abi::OP_PROCESS_GET_PID, 0, 0, 0, 0) as u64
}

/// Waits for child process `pid`; its exit status (`EXIT_KILLED` if the kernel ended
/// it). `NotFound` if `pid` is not a child of this process (or was already waited for).
pub fn wait(pid: u64) -> R {
    decode(call(abi::OP_PROCESS_WAIT, pid, 0, 0, 0))
}

/// Like `wait`, giving up with `TimedOut` after `timeout_ns` (0: only looks).
pub fn wait_timeout(pid: u64, timeout_ns: u64) -> R {
    decode(call(abi::OP_PROCESS_WAIT_TIMEOUT, pid, timeout_ns, 0, 0))
}

/// Ends child process `pid` (its waiter sees `EXIT_KILLED`).
pub fn kill(pid: u64) -> R {
    decode(call(abi::OP_PROCESS_KILL, pid, 0, 0, 0))
}

/// Moves the program's break (0 queries it); returns the break.
///
/// The heap region is shared with the runtime: its allocator owns the first
/// `RUNTIME_HEAP_SIZE` bytes (`[HEAP_BASE, PROGRAM_BREAK_BASE)`), and the program's
/// break moves within `[PROGRAM_BREAK_BASE, HEAP_LIMIT]`, so `brk` and `Vec` never hand
/// out the same memory. A break below `PROGRAM_BREAK_BASE` is `InvalidArgument` here
/// (the raw call, `raw(OP_PROCESS_BRK, ..)`, bypasses this and can pull memory from
/// under the allocator).
pub fn brk(new_end: usize) -> R {
    crate::reserve_runtime_heap();
    if new_end != 0 && new_end < crate::PROGRAM_BREAK_BASE {
        return Err(Error::InvalidArgument);
    }
    decode(call(abi::OP_PROCESS_BRK, new_end as u64, 0, 0, 0))
}

pub fn sleep_ns(ns: u64) {
    call(abi::OP_PROCESS_SLEEP, ns, 0, 0, 0);
}

/// Starts the initrd program `path` with `arg`; returns its pid.
pub fn spawn(path: &str, arg: u64) -> R {
    decode(call(
        abi::OP_ENVIRONMENT_SPAWN,
        path.as_ptr() as u64,
        path.len() as u64,
        arg,
        0,
    ))
}

/// Starts the initrd program `path` with arguments `args` (the new program's `args()`
/// are `path`, then these) and the number `arg`; returns its pid. `InvalidArgument` if
/// an argument holds a NUL byte or they exceed `panda_abi::args`' limits.
pub fn spawn_args(path: &str, args: &[&str], arg: u64) -> R {
    if args.iter().any(|a| a.as_bytes().contains(&0)) {
        return Err(Error::InvalidArgument);
    }
    let mut block = alloc::vec::Vec::new();
    for a in args {
        block.extend_from_slice(a.as_bytes());
        block.push(0);
    }
    spawn_block(path, &block, arg)
}

/// `OP_ENVIRONMENT_SPAWN_ARGS` with a ready-made argument block (NUL-terminated
/// strings, `panda_abi::args`), passed to the kernel as it is.
pub fn spawn_block(path: &str, block: &[u8], arg: u64) -> R {
    decode(call5(
        abi::OP_ENVIRONMENT_SPAWN_ARGS,
        [
            path.as_ptr() as u64,
            path.len() as u64,
            block.as_ptr() as u64,
            block.len() as u64,
            arg,
        ],
    ))
}

/// Like [`spawn_args`], with the child's memory limit in bytes (0: the caller's own;
/// above it: `InvalidArgument`). The child's usage counts against the caller's limit
/// too. A limit too small for the program to load is `OutOfMemory`.
pub fn spawn_limited(path: &str, args: &[&str], arg: u64, limit: u64) -> R {
    if args.iter().any(|a| a.as_bytes().contains(&0)) {
        return Err(Error::InvalidArgument);
    }
    let mut block = alloc::vec::Vec::new();
    for a in args {
        block.extend_from_slice(a.as_bytes());
        block.push(0);
    }
    decode(call6(
        abi::OP_ENVIRONMENT_SPAWN_LIMITED,
        [
            path.as_ptr() as u64,
            path.len() as u64,
            block.as_ptr() as u64,
            block.len() as u64,
            arg,
            limit,
        ],
    ))
}

/// The memory account of process `pid` (0: the caller; else one of its children that
/// has not ended): limit, usage (its tree), own footprint, peak, what is left.
pub fn memory(pid: u64) -> Result<MemoryInfo, Error> {
    let mut words = [0u64; MemoryInfo::WORDS];
    let n = decode(call(
        abi::OP_PROCESS_MEMORY,
        pid,
        words.as_mut_ptr() as u64,
        (MemoryInfo::WORDS * 8) as u64,
        0,
    ))?;
    Ok(MemoryInfo::from_words(&words[..n / 8]))
}

pub fn log(bytes: &[u8]) -> R {
    decode(call(
        abi::OP_ENVIRONMENT_LOG,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        0,
        0,
    ))
}

/// Monotonic nanoseconds since boot.
pub fn time_ns() -> u64 {
    call(abi::OP_ENVIRONMENT_TIME, 0, 0, 0, 0) as u64
}

/// The kernel's machine and memory counters.
pub fn info() -> Result<SystemInfo, Error> {
    let mut words = [0u64; SystemInfo::WORDS];
    let n = decode(call(
        abi::OP_ENVIRONMENT_INFO,
        words.as_mut_ptr() as u64,
        (SystemInfo::WORDS * 8) as u64,
        0,
        0,
    ))?;
    Ok(SystemInfo::from_words(&words[..n / 8]))
}

/// A buffer of `size` bytes (page-rounded, demand-zero) in the buffer region.
pub fn buffer_alloc(size: usize) -> R {
    decode(call(abi::OP_BUFFER_ALLOC, size as u64, 0, 0, 0))
}

pub fn buffer_free(addr: usize) -> R {
    decode(call(abi::OP_BUFFER_FREE, addr as u64, 0, 0, 0))
}

/// Writes `len` bytes of the buffer at `addr` to the console, without a copy.
pub fn buffer_log(addr: usize, len: usize) -> R {
    decode(call(abi::OP_BUFFER_LOG, addr as u64, len as u64, 0, 0))
}

/// Reads the initrd file `path` into `[addr, addr + len)`; returns the bytes read.
pub fn read_file(path: &str, addr: usize, len: usize) -> R {
    decode(call(
        abi::OP_FILE_READ_BUFFER,
        path.as_ptr() as u64,
        path.len() as u64,
        addr as u64,
        len as u64,
    ))
}

/// Starts a thread at `entry` with stack `stack_top` and `arg` in `rdi`.
pub fn thread_spawn(entry: usize, stack_top: usize, arg: u64) -> R {
    decode(call(
        abi::OP_THREAD_SPAWN,
        entry as u64,
        stack_top as u64,
        arg,
        0,
    ))
}

pub fn thread_join(tid: u64) -> R {
    decode(call(abi::OP_THREAD_JOIN, tid, 0, 0, 0))
}

pub fn thread_exit(code: u64) -> ! {
    call(abi::OP_THREAD_EXIT, code, 0, 0, 0);
    unreachable!("OP_THREAD_EXIT returned")
}

/// Pins the calling thread to `cpu`.
pub fn set_affinity(cpu: usize) -> R {
    decode(call(abi::OP_THREAD_SET_AFFINITY, cpu as u64, 0, 0, 0))
}

pub fn cpu_count() -> usize {
    call(abi::OP_CPU_COUNT, 0, 0, 0, 0) as usize
}

/// The calling thread's id (the one `thread_spawn` returned for it).
pub fn thread_id() -> u64 {
    call(abi::OP_THREAD_GET_ID, 0, 0, 0, 0) as u64
}

/// Sets the calling thread's FS base (what `fs:`-relative accesses use), for
/// thread-local storage.
pub fn set_fs_base(base: usize) -> R {
    decode(call(abi::OP_THREAD_SET_FS_BASE, base as u64, 0, 0, 0))
}

pub fn current_cpu() -> usize {
    call(abi::OP_THREAD_CURRENT_CPU, 0, 0, 0, 0) as usize
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads a counter; CR4.TSD is clear, so it is allowed in ring 3.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}

/// CPU time the calling thread has used, in ns.
pub fn thread_cpu_time_ns() -> u64 {
    call(abi::OP_THREAD_CPU_TIME, 0, 0, 0, 0) as u64
}

/// CPU time process `pid` has used, in ns: 0 for the calling process, else one of its
/// running children.
pub fn process_cpu_time_ns(pid: u64) -> R {
    decode(call(abi::OP_PROCESS_CPU_TIME, pid, 0, 0, 0))
}
