//! The system-call interface: operation numbers and error codes.
//!
//! `syscall` with the operation in `rax` and arguments in `rdi, rsi, rdx, r10, r8, r9`;
//! the result comes back in `rax` as an `isize`: `>= 0` is success, `< 0` is the negated
//! code of an [`Error`]. Only `rcx` and `r11` are clobbered. Operations are grouped by
//! area: process `0x2_xxxx`, environment `0x3_xxxx`, buffer `0x4_xxxx`, thread
//! `0x5_xxxx`, file `0x6_xxxx`.

/// Gives up the CPU; the thread runs again later.
pub const OP_PROCESS_YIELD: usize = 0x2_0000;
/// Ends the process with `code` (rdi).
pub const OP_PROCESS_EXIT: usize = 0x2_0001;
/// The caller's process id.
pub const OP_PROCESS_GET_PID: usize = 0x2_0002;
/// Waits for child process `pid` (rdi) to end; returns its exit status. Only the
/// parent may wait, and only one of its threads at a time.
pub const OP_PROCESS_WAIT: usize = 0x2_0003;
/// Moves the break to `new_end` (rdi; 0 queries); returns the current break.
pub const OP_PROCESS_BRK: usize = 0x2_0004;
/// Sleeps `ns` (rdi) nanoseconds.
pub const OP_PROCESS_SLEEP: usize = 0x2_0005;
/// Ends child process `pid` (rdi) as killed (status `EXIT_KILLED`).
pub const OP_PROCESS_KILL: usize = 0x2_0006;
/// Like `OP_PROCESS_WAIT` for `pid` (rdi), giving up after `timeout_ns` (rsi; 0 only
/// looks) with `TimedOut`.
pub const OP_PROCESS_WAIT_TIMEOUT: usize = 0x2_0007;
/// CPU time used so far, in ns, by the threads of process `pid` (rdi): 0 for the
/// caller's own process, else one of its children still running.
pub const OP_PROCESS_CPU_TIME: usize = 0x2_0009;

/// Most processes one process tree may hold at once, running or ended and not yet
/// waited for: a process the kernel started (init) and all its descendants, itself
/// included. A spawn past it fails with [`Error::LimitReached`]. It bounds what a
/// fork bomb (children spawning children) can take, where the per-process limit on
/// children (1024) bounds only one level.
pub const MAX_TREE_PROCESSES: usize = 2048;
/// Copies the [`MemoryInfo`] of process `pid` (rdi; 0: the caller; otherwise one of
/// its unreaped children that has not ended yet, `NotFound` else) to `ptr, len` (rsi,
/// rdx); returns the bytes written.
pub const OP_PROCESS_MEMORY: usize = 0x2_0008;

/// Starts the initrd program at `path_ptr, path_len` (rdi, rsi) with `arg` (rdx); its
/// only argument (argv\[0\]) is the path.
pub const OP_ENVIRONMENT_SPAWN: usize = 0x3_0000;
/// Writes `ptr, len` (rdi, rsi) to the console.
pub const OP_ENVIRONMENT_LOG: usize = 0x3_0001;
/// Monotonic time in nanoseconds.
pub const OP_ENVIRONMENT_TIME: usize = 0x3_0002;
/// Copies the kernel's [`SystemInfo`] to `ptr, len` (rdi, rsi); returns bytes written.
pub const OP_ENVIRONMENT_INFO: usize = 0x3_0003;
/// Like `OP_ENVIRONMENT_SPAWN`, with arguments: path `path_ptr, path_len` (rdi, rsi),
/// an argument block `args_ptr, args_len` (rdx, r10; see [`crate::args`]) and the
/// number argument `arg` (r8). The new process finds argc and argv in `rsi`, `rdx`.
pub const OP_ENVIRONMENT_SPAWN_ARGS: usize = 0x3_0004;
/// Like `OP_ENVIRONMENT_SPAWN_ARGS` (the same registers), with the child's memory
/// limit in bytes in `r9`: 0 means the caller's own limit (what the other spawns give);
/// a limit above the caller's is `InvalidArgument`. The child's usage counts against
/// the caller's limit too (and every ancestor's): see [`MemoryInfo`].
pub const OP_ENVIRONMENT_SPAWN_LIMITED: usize = 0x3_0005;

/// Allocates a buffer of `size` (rdi) bytes in the buffer region; returns its address.
pub const OP_BUFFER_ALLOC: usize = 0x4_0000;
/// Frees the buffer starting at `address` (rdi).
pub const OP_BUFFER_FREE: usize = 0x4_0001;
/// Writes `len` (rsi) bytes of the buffer at `buffer` (rdi) to the console, no copy.
pub const OP_BUFFER_LOG: usize = 0x4_0002;

/// Starts a thread at `entry` (rdi) with stack `stack_top` (rsi) and `arg` (rdx).
pub const OP_THREAD_SPAWN: usize = 0x5_0000;
/// Waits for thread `tid` (rdi); returns its exit code.
pub const OP_THREAD_JOIN: usize = 0x5_0001;
/// Ends the calling thread with `code` (rdi).
pub const OP_THREAD_EXIT: usize = 0x5_0002;
/// Pins the calling thread to CPU `cpu` (rdi).
pub const OP_THREAD_SET_AFFINITY: usize = 0x5_0003;
/// Number of CPUs online.
pub const OP_CPU_COUNT: usize = 0x5_0004;
/// The CPU the calling thread is running on (as of the call).
pub const OP_THREAD_CURRENT_CPU: usize = 0x5_0005;
/// The calling thread's id.
pub const OP_THREAD_GET_ID: usize = 0x5_0006;
/// Sets the calling thread's FS base (rdi) for thread-local storage.
pub const OP_THREAD_SET_FS_BASE: usize = 0x5_0007;
/// CPU time used so far by the calling thread, in ns.
pub const OP_THREAD_CPU_TIME: usize = 0x5_0008;

/// Reads the initrd file `path_ptr, path_len` (rdi, rsi) into `buffer, len` (rdx, r10).
pub const OP_FILE_READ_BUFFER: usize = 0x6_0000;

/// Every operation, for tests and dispatch tables.
pub const OPERATIONS: [usize; 29] = [
    OP_PROCESS_YIELD,
    OP_PROCESS_CPU_TIME,
    OP_THREAD_CPU_TIME,
    OP_PROCESS_EXIT,
    OP_PROCESS_GET_PID,
    OP_PROCESS_WAIT,
    OP_PROCESS_BRK,
    OP_PROCESS_SLEEP,
    OP_PROCESS_KILL,
    OP_PROCESS_WAIT_TIMEOUT,
    OP_PROCESS_MEMORY,
    OP_ENVIRONMENT_SPAWN,
    OP_ENVIRONMENT_LOG,
    OP_ENVIRONMENT_TIME,
    OP_ENVIRONMENT_INFO,
    OP_ENVIRONMENT_SPAWN_ARGS,
    OP_ENVIRONMENT_SPAWN_LIMITED,
    OP_BUFFER_ALLOC,
    OP_BUFFER_FREE,
    OP_BUFFER_LOG,
    OP_THREAD_SPAWN,
    OP_THREAD_JOIN,
    OP_THREAD_EXIT,
    OP_THREAD_SET_AFFINITY,
    OP_CPU_COUNT,
    OP_THREAD_CURRENT_CPU,
    OP_THREAD_GET_ID,
    OP_THREAD_SET_FS_BASE,
    OP_FILE_READ_BUFFER,
];

/// What `OP_ENVIRONMENT_INFO` reports: the machine and the kernel's memory counters.
/// Fields are only ever appended; a caller passing a shorter length gets a prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SystemInfo {
    /// CPUs online.
    pub cpus: u64,
    /// Bytes of RAM the frame allocator manages, and how many are free (including
    /// frames in per-CPU caches and zeroed pools).
    pub memory_total: u64,
    pub memory_free: u64,
    /// Demand-zero faults resolved (user faults and kernel writes on a user's behalf).
    pub faults: u64,
    /// ... of which took a frame from the CPU's zeroed pool at once.
    pub zero_pool_hits: u64,
    /// ... of which found the pool empty and awaited its refill.
    pub zero_pool_waits: u64,
    /// ... of which zeroed a frame on the spot (no refill in time, or no executor).
    pub zeroed_inline: u64,
    /// TLB shootdowns initiated, and the cross-CPU flush requests they sent.
    pub shootdowns: u64,
    pub shootdown_ipis: u64,
    /// Time-stamp counter frequency, for converting TSC deltas to time.
    pub tsc_hz: u64,
    /// Where the user fault path's cycles go (TSC, summed over every demand-zero fault
    /// of user threads): the whole kernel handler, and in it classifying the address,
    /// zeroing frames inline, and mapping (table lock, walk, entry). The rest of a
    /// fault's latency as the user sees it is the trap in and out.
    pub fault_handler_cycles: u64,
    pub fault_classify_cycles: u64,
    pub fault_zero_cycles: u64,
    pub fault_map_cycles: u64,
    /// Faults those sums cover.
    pub profiled_faults: u64,
    /// Bytes of kernel heap in use (allocated and not yet freed): leak checks compare
    /// it before and after a workload.
    pub kernel_heap_bytes: u64,
    /// 1 if demand-zero faults use the zeroed pools, 0 if the kernel was booted with
    /// `mm.prezero=off` (every fault zeroes its frame inline).
    pub zero_pools_on: u64,
    /// Frames zeroed ahead of need into the pools (by idle CPUs and the zeroing tasks),
    /// over every CPU: with `zeroed_inline`, where the zeroing work went.
    pub zeroed_ahead: u64,
    /// Of `zeroed_ahead`, frames an idle CPU zeroed into another (busy) CPU's pool.
    pub zeroed_for_other_cpus: u64,
    /// TSC cycles all CPUs together spent zeroing the `zeroed_ahead` frames: what the
    /// pools cost, in CPU time that faults did not spend (`fault_zero_cycles`).
    pub zero_ahead_cycles: u64,
    /// Memory-accounting errors since boot: a process whose charge was not exactly
    /// what it held when it ended, or more given back than charged. 0 unless the
    /// kernel has a bug.
    pub memory_account_errors: u64,
    /// Processes ended because the machine ran out of memory (the largest each time).
    pub oom_kills: u64,
    /// Of `kernel_heap_bytes`, at most this much is the frame allocator's own
    /// bookkeeping (its free runs, a B-tree on the heap), which grows with fragmentation
    /// rather than with any workload: leak checks subtract it.
    pub frame_bookkeeping_bytes: u64,
}

impl SystemInfo {
    /// Number of u64 fields (the struct is exactly these, in order).
    pub const WORDS: usize = 23;

    /// The fields in declaration order.
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        [
            self.cpus,
            self.memory_total,
            self.memory_free,
            self.faults,
            self.zero_pool_hits,
            self.zero_pool_waits,
            self.zeroed_inline,
            self.shootdowns,
            self.shootdown_ipis,
            self.tsc_hz,
            self.fault_handler_cycles,
            self.fault_classify_cycles,
            self.fault_zero_cycles,
            self.fault_map_cycles,
            self.profiled_faults,
            self.kernel_heap_bytes,
            self.zero_pools_on,
            self.zeroed_ahead,
            self.zeroed_for_other_cpus,
            self.zero_ahead_cycles,
            self.memory_account_errors,
            self.oom_kills,
            self.frame_bookkeeping_bytes,
        ]
    }

    /// From words in declaration order; missing trailing fields are 0.
    pub fn from_words(words: &[u64]) -> Self {
        let w = |i: usize| words.get(i).copied().unwrap_or(0);
        Self {
            cpus: w(0),
            memory_total: w(1),
            memory_free: w(2),
            faults: w(3),
            zero_pool_hits: w(4),
            zero_pool_waits: w(5),
            zeroed_inline: w(6),
            shootdowns: w(7),
            shootdown_ipis: w(8),
            tsc_hz: w(9),
            fault_handler_cycles: w(10),
            fault_classify_cycles: w(11),
            fault_zero_cycles: w(12),
            fault_map_cycles: w(13),
            profiled_faults: w(14),
            kernel_heap_bytes: w(15),
            zero_pools_on: w(16),
            zeroed_ahead: w(17),
            zeroed_for_other_cpus: w(18),
            zero_ahead_cycles: w(19),
            memory_account_errors: w(20),
            oom_kills: w(21),
            frame_bookkeeping_bytes: w(22),
        }
    }
}

/// No memory limit of its own (`MemoryInfo::limit`): bounded by its ancestors' and the
/// machine's memory.
pub const NO_LIMIT: u64 = u64::MAX;

/// What `OP_PROCESS_MEMORY` reports of one process, in bytes. A process is charged for
/// every frame it maps (pages and page tables) and a fixed amount of kernel memory per
/// thread; a process's charge counts against its own limit and every ancestor's.
/// Fields are only ever appended; a caller passing a shorter length gets a prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MemoryInfo {
    /// The most its tree (it and its descendants) may hold; [`NO_LIMIT`] for none.
    pub limit: u64,
    /// What its tree holds now (what the limit bounds).
    pub usage: u64,
    /// What it holds itself (its footprint, which the out-of-memory choice compares).
    pub own: u64,
    /// The highest `usage` so far.
    pub peak: u64,
    /// What it can still be charged before its limit or an ancestor's refuses.
    pub available: u64,
}

impl MemoryInfo {
    /// Number of u64 fields.
    pub const WORDS: usize = 5;

    /// The fields in declaration order.
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        [self.limit, self.usage, self.own, self.peak, self.available]
    }

    /// From words in declaration order; missing trailing fields are 0.
    pub fn from_words(words: &[u64]) -> Self {
        let w = |i: usize| words.get(i).copied().unwrap_or(0);
        Self {
            limit: w(0),
            usage: w(1),
            own: w(2),
            peak: w(3),
            available: w(4),
        }
    }
}

/// The status `OP_PROCESS_WAIT` returns for a process the kernel ended (a fault, a
/// protection violation, memory exhaustion): above every status a process can exit
/// with, since exit codes are truncated to 32 bits.
pub const EXIT_KILLED: usize = 1 << 32;

/// The status a process exiting with `code` reports to its waiter.
pub const fn exit_status(code: u64) -> usize {
    code as u32 as usize
}

/// Why an operation failed. The result register holds `-(code)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(isize)]
pub enum Error {
    /// An argument is out of range or malformed.
    InvalidArgument = 1,
    /// No memory (frames, kernel memory above its reserve, or room in a region), or a
    /// per-process limit (threads, unreaped children, buffers) is reached.
    OutOfMemory = 2,
    /// No such process, thread, file or buffer.
    NotFound = 3,
    /// A pointer outside the caller's valid user memory.
    BadAddress = 4,
    /// The operation number is unknown.
    UnknownOperation = 5,
    /// Not allowed in this state (e.g. waiting for oneself).
    NotPermitted = 6,
    /// A wait's time-out passed first.
    TimedOut = 7,
    /// A process tree's limit on processes is reached (`OP_ENVIRONMENT_SPAWN`: the
    /// tree already holds `MAX_TREE_PROCESSES` processes, running or not yet waited
    /// for).
    LimitReached = 8,
}

impl Error {
    /// Every error, in code order.
    pub const ALL: [Error; 8] = [
        Error::InvalidArgument,
        Error::OutOfMemory,
        Error::NotFound,
        Error::BadAddress,
        Error::UnknownOperation,
        Error::NotPermitted,
        Error::TimedOut,
        Error::LimitReached,
    ];

    /// The value returned in `rax`.
    pub const fn to_result(self) -> isize {
        -(self as isize)
    }

    /// The error a negative result stands for.
    pub fn from_result(result: isize) -> Option<Error> {
        Error::ALL.into_iter().find(|e| e.to_result() == result)
    }
}

/// Encodes an operation's outcome as the result register.
pub fn encode(result: Result<usize, Error>) -> isize {
    match result {
        Ok(v) => v as isize,
        Err(e) => e.to_result(),
    }
}

/// Decodes the result register.
pub fn decode(result: isize) -> Result<usize, Error> {
    if result >= 0 {
        Ok(result as usize)
    } else {
        Err(Error::from_result(result).unwrap_or(Error::UnknownOperation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_unique_and_grouped_by_area() {
        let ops = OPERATIONS;
        for (i, a) in ops.iter().enumerate() {
            assert!(!ops[i + 1..].contains(a), "operation {a:#x} listed twice");
            assert!(
                (0x2..=0x6).contains(&(a >> 16)),
                "operation {a:#x} outside the areas"
            );
        }
        assert_eq!(OP_PROCESS_BRK >> 16, 0x2);
        assert_eq!(OP_ENVIRONMENT_LOG >> 16, 0x3);
        assert_eq!(OP_BUFFER_ALLOC >> 16, 0x4);
    }

    #[test]
    fn system_info_words_round_trip() {
        let info = SystemInfo {
            cpus: 1,
            memory_total: 2,
            memory_free: 3,
            faults: 4,
            zero_pool_hits: 5,
            zero_pool_waits: 6,
            zeroed_inline: 7,
            shootdowns: 8,
            shootdown_ipis: 9,
            tsc_hz: 10,
            fault_handler_cycles: 11,
            fault_classify_cycles: 12,
            fault_zero_cycles: 13,
            fault_map_cycles: 14,
            profiled_faults: 15,
            kernel_heap_bytes: 16,
            zero_pools_on: 17,
            zeroed_ahead: 18,
            zeroed_for_other_cpus: 19,
            zero_ahead_cycles: 20,
            memory_account_errors: 21,
            oom_kills: 22,
            frame_bookkeeping_bytes: 23,
        };
        assert_eq!(SystemInfo::from_words(&info.to_words()), info);
        assert_eq!(core::mem::size_of::<SystemInfo>(), SystemInfo::WORDS * 8);
        assert_eq!(SystemInfo::from_words(&[7]).cpus, 7);
    }

    #[test]
    fn memory_info_words_round_trip() {
        let m = MemoryInfo {
            limit: 1,
            usage: 2,
            own: 3,
            peak: 4,
            available: 5,
        };
        assert_eq!(MemoryInfo::from_words(&m.to_words()), m);
        assert_eq!(core::mem::size_of::<MemoryInfo>(), MemoryInfo::WORDS * 8);
    }

    #[test]
    fn killed_status_is_distinct_from_every_exit_code() {
        for code in [0u64, 1, 42, u32::MAX as u64, u64::MAX, (1 << 32) + 5] {
            assert_ne!(exit_status(code), EXIT_KILLED);
            assert!(
                exit_status(code) as isize >= 0,
                "a status must not read as an error"
            );
        }
        assert!(EXIT_KILLED as isize > 0);
    }

    #[test]
    fn exit_status_is_the_code_truncated_to_32_bits() {
        assert_eq!(exit_status(0), 0);
        assert_eq!(exit_status(42), 42);
        assert_eq!(exit_status(u32::MAX as u64), u32::MAX as usize);
        assert_eq!(exit_status((1 << 32) + 5), 5);
        assert_eq!(exit_status(u64::MAX), u32::MAX as usize);
    }

    #[test]
    fn results_round_trip() {
        for e in Error::ALL {
            assert!(e.to_result() < 0);
            assert_eq!(decode(encode(Err(e))), Err(e));
        }
        assert_eq!(decode(encode(Ok(0x1_0000_0000))), Ok(0x1_0000_0000));
        assert_eq!(decode(-999), Err(Error::UnknownOperation));
    }
}
