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
/// Waits for process `pid` (rdi) to end; returns its exit code.
pub const OP_PROCESS_WAIT: usize = 0x2_0003;
/// Moves the break to `new_end` (rdi; 0 queries); returns the current break.
pub const OP_PROCESS_BRK: usize = 0x2_0004;
/// Sleeps `ns` (rdi) nanoseconds.
pub const OP_PROCESS_SLEEP: usize = 0x2_0005;

/// Starts the initrd program at `path_ptr, path_len` (rdi, rsi) with `arg` (rdx).
pub const OP_ENVIRONMENT_SPAWN: usize = 0x3_0000;
/// Writes `ptr, len` (rdi, rsi) to the console.
pub const OP_ENVIRONMENT_LOG: usize = 0x3_0001;
/// Monotonic time in nanoseconds.
pub const OP_ENVIRONMENT_TIME: usize = 0x3_0002;

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

/// Reads the initrd file `path_ptr, path_len` (rdi, rsi) into `buffer, len` (rdx, r10).
pub const OP_FILE_READ_BUFFER: usize = 0x6_0000;

/// Every operation, for tests and dispatch tables.
pub const OPERATIONS: [usize; 18] = [
    OP_PROCESS_YIELD,
    OP_PROCESS_EXIT,
    OP_PROCESS_GET_PID,
    OP_PROCESS_WAIT,
    OP_PROCESS_BRK,
    OP_PROCESS_SLEEP,
    OP_ENVIRONMENT_SPAWN,
    OP_ENVIRONMENT_LOG,
    OP_ENVIRONMENT_TIME,
    OP_BUFFER_ALLOC,
    OP_BUFFER_FREE,
    OP_BUFFER_LOG,
    OP_THREAD_SPAWN,
    OP_THREAD_JOIN,
    OP_THREAD_EXIT,
    OP_THREAD_SET_AFFINITY,
    OP_CPU_COUNT,
    OP_FILE_READ_BUFFER,
];

/// Why an operation failed. The result register holds `-(code)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(isize)]
pub enum Error {
    /// An argument is out of range or malformed.
    InvalidArgument = 1,
    /// No memory (frames, or room in a region) for the request.
    OutOfMemory = 2,
    /// No such process, thread, file or buffer.
    NotFound = 3,
    /// A pointer outside the caller's valid user memory.
    BadAddress = 4,
    /// The operation number is unknown.
    UnknownOperation = 5,
    /// Not allowed in this state (e.g. waiting for oneself).
    NotPermitted = 6,
}

impl Error {
    /// Every error, in code order.
    pub const ALL: [Error; 6] = [
        Error::InvalidArgument,
        Error::OutOfMemory,
        Error::NotFound,
        Error::BadAddress,
        Error::UnknownOperation,
        Error::NotPermitted,
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
    fn results_round_trip() {
        for e in Error::ALL {
            assert!(e.to_result() < 0);
            assert_eq!(decode(encode(Err(e))), Err(e));
        }
        assert_eq!(decode(encode(Ok(0x1_0000_0000))), Ok(0x1_0000_0000));
        assert_eq!(decode(-999), Err(Error::UnknownOperation));
    }
}
