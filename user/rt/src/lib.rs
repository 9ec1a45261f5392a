//! `panda-rt`: what a Panda user program needs to start, talk to the kernel and exit.
//!
//! - `_start` (the ELF entry): aligns the stack and calls the program's `main`, declared
//!   with [`entry!`]; `main`'s return value is the exit code. The kernel passes the
//!   spawn's number argument in `rdi`, and it reaches `main` as its argument; the
//!   program's arguments (argv: its path, then what the spawner passed) are [`args`].
//! - [`sys`]: one safe wrapper per system call of `panda-abi` (results as
//!   `Result<usize, Error>`).
//! - A global allocator (a linked-list heap) over the first `RUNTIME_HEAP_SIZE` bytes of
//!   the heap region, so `alloc` works; the program's own break (`sys::brk`) starts
//!   above it, at `PROGRAM_BREAK_BASE`, so the two never overlap. Both are demand-zero:
//!   untouched memory costs nothing.
//! - [`print!`] / [`println!`] over the log call, a panic handler that reports and exits
//!   with status 101, [`thread`]: threads with their own stacks in buffers, and
//!   [`tls::ThreadLocal`]: thread-local values over each thread's FS base.
#![no_std]

extern crate alloc;

pub mod sys;
pub mod thread;
pub mod tls;

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

pub use panda_abi as abi;
pub use panda_abi::syscall::Error;

/// The program's entry: `entry!(main)` with `fn main(arg: u64) -> u64`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "C" fn __panda_main(arg: u64) -> u64 {
            let main: fn(u64) -> u64 = $main;
            main(arg)
        }
    };
}

extern "C" {
    fn __panda_main(arg: u64) -> u64;
}

core::arch::global_asm!(
    r#"
    .section .text._start, "ax"
    .global _start
    _start:
    xor ebp, ebp
    and rsp, -16
    call {start}
    ud2
    "#,
    start = sym rt_start,
);

extern "C" fn rt_start(arg: u64, argc: u64, argv: u64) -> ! {
    ARGC.store(argc as usize, Ordering::Relaxed);
    ARGV.store(argv as usize, Ordering::Relaxed);
    tls::start_main();
    // SAFETY: `entry!` defines `__panda_main` with this signature; a program without it
    // does not link.
    let code = unsafe { __panda_main(arg) };
    sys::exit(code)
}

/// argc and argv as the kernel passed them to `_start` (`rsi`, `rdx`).
static ARGC: AtomicUsize = AtomicUsize::new(0);
static ARGV: AtomicUsize = AtomicUsize::new(0);

/// The program's arguments: argument 0 is the path it was spawned as, then those its
/// spawner passed (`sys::spawn_args`; for the first program, the kernel command line's
/// words after `--`). The kernel checked that each is UTF-8 and copied them to the top
/// of the stack, where they stay for the whole run.
pub fn args() -> Args {
    Args {
        next: 0,
        argc: ARGC.load(Ordering::Relaxed),
        argv: ARGV.load(Ordering::Relaxed) as *const u64,
    }
}

/// The iterator [`args`] returns.
#[derive(Clone, Debug)]
pub struct Args {
    next: usize,
    argc: usize,
    argv: *const u64,
}

impl Iterator for Args {
    type Item = &'static str;

    fn next(&mut self) -> Option<&'static str> {
        if self.next >= self.argc || self.argv.is_null() {
            return None;
        }
        // SAFETY: the kernel's argument image (panda_abi::args) holds `argc` pointers at
        // `argv`, each to a NUL-terminated UTF-8 string in the same image, above the
        // initial stack pointer: nothing else writes there, and it lives as long as the
        // process.
        let s = unsafe {
            let ptr = self.argv.add(self.next).read() as *const u8;
            let mut len = 0;
            while ptr.add(len).read() != 0 {
                len += 1;
            }
            core::str::from_utf8_unchecked(core::slice::from_raw_parts(ptr, len))
        };
        self.next += 1;
        Some(s)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.argc.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Args {}

/// A line-buffered console writer on the stack (no allocation): output goes out per
/// line, or every 512 bytes.
pub struct Console {
    buf: [u8; 512],
    len: usize,
}

impl Console {
    pub const fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    pub fn flush(&mut self) {
        if self.len > 0 {
            let _ = sys::log(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

/// Formats `args` and writes them with one log call, so lines from concurrent
/// threads or processes never interleave (the kernel writes one call as one piece).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let text = alloc::fmt::format(args);
    let _ = sys::log(text.as_bytes());
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::print_fmt(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::print_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Through the stack buffer: the heap may be what failed.
    let mut console = Console::new();
    let _ = writeln!(console, "panic in pid {}: {}", sys::pid(), info);
    console.flush();
    sys::exit(101)
}

/// Bytes of the heap region the runtime's allocator owns (demand-zero: only what it
/// touches costs frames).
pub const RUNTIME_HEAP_SIZE: usize = 64 << 30;

/// Where the program's break starts (`sys::brk`): right above the allocator's range.
pub const PROGRAM_BREAK_BASE: usize = abi::HEAP_BASE + RUNTIME_HEAP_SIZE;

/// Moves the kernel's break to at least `PROGRAM_BREAK_BASE` once, so the allocator's
/// range is valid heap. Returns whether it is.
pub(crate) fn reserve_runtime_heap() -> bool {
    static RESERVED: spin::Once<bool> = spin::Once::new();
    *RESERVED.call_once(|| {
        let now = sys::raw(abi::syscall::OP_PROCESS_BRK, 0, 0, 0, 0);
        now >= PROGRAM_BREAK_BASE as isize
            || sys::raw(
                abi::syscall::OP_PROCESS_BRK,
                PROGRAM_BREAK_BASE as u64,
                0,
                0,
                0,
            ) >= 0
    })
}

mod heap {
    use core::alloc::{GlobalAlloc, Layout};
    use core::ptr::NonNull;

    use linked_list_allocator::Heap;

    /// A linked-list heap over `[HEAP_BASE, PROGRAM_BREAK_BASE)`, set up on first use.
    pub struct RuntimeHeap(spin::Mutex<Option<Heap>>);

    // SAFETY: allocations come from `linked_list_allocator`'s heap, serialised by the
    // lock, over a range nothing else in the program is given (`sys::brk` refuses it).
    unsafe impl GlobalAlloc for RuntimeHeap {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let mut heap = self.0.lock();
            if heap.is_none() {
                if !crate::reserve_runtime_heap() {
                    return core::ptr::null_mut();
                }
                // SAFETY: `[HEAP_BASE, PROGRAM_BREAK_BASE)` is below the kernel's break
                // (just reserved): valid, writable, demand-zero memory that only this
                // allocator uses.
                *heap = Some(unsafe {
                    Heap::new(crate::abi::HEAP_BASE as *mut u8, crate::RUNTIME_HEAP_SIZE)
                });
            }
            match heap.as_mut().map(|h| h.allocate_first_fit(layout)) {
                Some(Ok(p)) => p.as_ptr(),
                _ => core::ptr::null_mut(),
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if let (Some(h), Some(p)) = (self.0.lock().as_mut(), NonNull::new(ptr)) {
                // SAFETY: the caller passes a pointer this allocator returned, with
                // its layout (GlobalAlloc's contract).
                unsafe { h.deallocate(p, layout) };
            }
        }
    }

    #[global_allocator]
    static HEAP: RuntimeHeap = RuntimeHeap(spin::Mutex::new(None));
}
