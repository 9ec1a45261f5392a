//! Threads: each runs a closure on its own stack, a buffer (demand-zero, so only the
//! pages it touches cost frames), and ends with the closure's value as exit code.

use alloc::boxed::Box;

use crate::sys;
use crate::Error;

/// Bytes of stack per thread.
pub const STACK_SIZE: usize = 256 * 1024;

/// A running thread; `join` it to get its exit code and free its stack.
pub struct Thread {
    tid: u64,
    stack: usize,
}

type Main = Box<dyn FnOnce() -> u64 + Send + 'static>;

core::arch::global_asm!(
    r#"
    .text
    .global panda_rt_thread_entry
    panda_rt_thread_entry:
    xor ebp, ebp
    and rsp, -16
    call {start}
    ud2
    "#,
    start = sym thread_start,
);

extern "C" {
    fn panda_rt_thread_entry();
}

extern "C" fn thread_start(arg: u64) -> ! {
    // SAFETY: `spawn` passes a pointer from `Box::into_raw` of a `Main`, and only
    // this thread takes it back.
    let main = unsafe { Box::from_raw(arg as *mut Main) };
    let locals = crate::tls::Block::start_thread();
    let code = main();
    drop(locals);
    sys::thread_exit(code)
}

/// Starts `f` on a new thread of this process.
pub fn spawn(f: impl FnOnce() -> u64 + Send + 'static) -> Result<Thread, Error> {
    spawn_with_stack(STACK_SIZE, f)
}

/// Starts `f` on a new thread with a `stack_size`-byte stack (a buffer: demand-zero,
/// so untouched stack costs nothing).
pub fn spawn_with_stack(
    stack_size: usize,
    f: impl FnOnce() -> u64 + Send + 'static,
) -> Result<Thread, Error> {
    let stack = sys::buffer_alloc(stack_size)?;
    let main: Box<Main> = Box::new(Box::new(f));
    let arg = Box::into_raw(main);
    match sys::thread_spawn(
        panda_rt_thread_entry as *const () as usize,
        stack + stack_size,
        arg as u64,
    ) {
        Ok(tid) => Ok(Thread {
            tid: tid as u64,
            stack,
        }),
        Err(e) => {
            // SAFETY: the thread did not start, so the box is still ours.
            drop(unsafe { Box::from_raw(arg) });
            let _ = sys::buffer_free(stack);
            Err(e)
        }
    }
}

impl Thread {
    pub fn id(&self) -> u64 {
        self.tid
    }

    /// Waits for the thread; its exit code.
    pub fn join(self) -> Result<u64, Error> {
        let code = sys::thread_join(self.tid)?;
        let _ = sys::buffer_free(self.stack);
        Ok(code as u64)
    }
}
