//! Thread-local storage over the kernel's per-thread FS base (`OP_THREAD_SET_FS_BASE`).
//!
//! Stable Rust has no `#[thread_local]` in `no_std`, so `ThreadLocal<T>` does the job:
//!
//! ```ignore
//! static COUNTER: ThreadLocal<Cell<u64>> = ThreadLocal::new(|| Cell::new(0));
//! COUNTER.with(|c| c.set(c.get() + 1));
//! ```
//!
//! Every thread the runtime starts (the main thread, and each `thread::spawn`) gets a
//! `Block`: a table of per-thread values whose first word points at the block itself,
//! and FS points at it, so `fs:[0]` finds the calling thread's block in one load. Each
//! `ThreadLocal` takes a slot number the first time any thread uses it; a thread's value
//! is created by the `ThreadLocal`'s initialiser on that thread's first use and dropped
//! when the thread ends (the main thread's when the process exits: never).
//!
//! Threads started with the raw `sys::thread_spawn` have no block (FS base 0): using a
//! `ThreadLocal` there faults. At most `SLOTS` thread-locals per program.

use alloc::boxed::Box;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::sys;

/// Thread-locals one program may define.
pub const SLOTS: usize = 64;

/// One thread's values. `me` must stay the first field: `fs:[0]` reads it.
#[repr(C)]
pub(crate) struct Block {
    me: *mut Block,
    values: [*mut u8; SLOTS],
    drops: [Option<unsafe fn(*mut u8)>; SLOTS],
}

impl Block {
    const EMPTY: Block = Block {
        me: core::ptr::null_mut(),
        values: [core::ptr::null_mut(); SLOTS],
        drops: [None; SLOTS],
    };

    /// Gives the calling (new) thread a block; dropping the returned box at the end of
    /// the thread drops its values.
    pub(crate) fn start_thread() -> Box<Block> {
        let mut block = Box::new(Block::EMPTY);
        let me: *mut Block = &mut *block;
        block.me = me;
        // Cannot fail: a heap address is a canonical lower-half address.
        let _ = sys::set_fs_base(me as usize);
        block
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        for (value, drop_fn) in self.values.iter().zip(self.drops.iter()) {
            if let (false, Some(drop_fn)) = (value.is_null(), drop_fn) {
                // SAFETY: `value` was made by `Box::into_raw` of the type `drop_fn`
                // was instantiated for (`ThreadLocal::with` stores them together), and
                // this block is the only owner.
                unsafe { drop_fn(*value) };
            }
        }
        // The thread is ending: nothing reads FS after this.
        let _ = sys::set_fs_base(0);
    }
}

/// The main thread's block (static: the main thread starts before the heap is used).
struct MainBlock(UnsafeCell<Block>);

// SAFETY: only the main thread touches it (through its own FS base).
unsafe impl Sync for MainBlock {}

static MAIN: MainBlock = MainBlock(UnsafeCell::new(Block::EMPTY));

/// Points the main thread's FS base at its block: `_start` does it before `main`; a
/// main thread that set its FS base itself calls it to use `ThreadLocal`s again.
pub fn start_main() {
    let me = MAIN.0.get();
    // SAFETY: only the main thread uses the main block, and it is here (not inside a
    // `with`, which does not call this).
    unsafe { (*me).me = me };
    let _ = sys::set_fs_base(me as usize);
}

fn current() -> *mut Block {
    let block: *mut Block;
    // SAFETY: every thread the runtime started has FS pointing at its block, whose
    // first word is the block's address; reading it touches nothing else.
    unsafe {
        core::arch::asm!("mov {}, fs:[0]", out(reg) block, options(nostack, readonly, preserves_flags))
    };
    block
}

/// Slots handed out so far (slot 0 means "none yet" in a `ThreadLocal`).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(1);

/// A value of which each thread has its own (see the module doc).
pub struct ThreadLocal<T: 'static> {
    slot: AtomicUsize,
    init: fn() -> T,
}

impl<T: 'static> ThreadLocal<T> {
    pub const fn new(init: fn() -> T) -> Self {
        Self {
            slot: AtomicUsize::new(0),
            init,
        }
    }

    fn slot(&self) -> usize {
        let slot = self.slot.load(Ordering::Acquire);
        if slot != 0 {
            return slot - 1;
        }
        let fresh = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        assert!(fresh <= SLOTS, "more than {SLOTS} thread-locals");
        match self
            .slot
            .compare_exchange(0, fresh, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => fresh - 1,
            // Another thread gave it a slot first (this one's number goes unused).
            Err(theirs) => theirs - 1,
        }
    }

    /// Runs `f` on the calling thread's value, creating it on first use.
    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        let slot = self.slot();
        let block = current();
        // SAFETY: `block` is the calling thread's own block (no other thread reads or
        // writes it), alive for the whole thread; `values[slot]` is null or a
        // `Box<T>` this `ThreadLocal` stored (slots are never shared between two
        // `ThreadLocal`s).
        let value = unsafe {
            if (*block).values[slot].is_null() {
                (*block).values[slot] = Box::into_raw(Box::new((self.init)())) as *mut u8;
                (*block).drops[slot] = Some(drop_value::<T>);
            }
            (*block).values[slot] as *const T
        };
        // SAFETY: `value` is this thread's `Box<T>`, dropped only when the thread ends.
        f(unsafe { &*value })
    }
}

/// Drops a `Box<T>` made by `ThreadLocal::with`.
///
/// # Safety
/// `value` must come from `Box::<T>::into_raw` and not be used afterwards.
unsafe fn drop_value<T>(value: *mut u8) {
    // SAFETY: the caller's contract.
    drop(unsafe { Box::from_raw(value as *mut T) });
}
