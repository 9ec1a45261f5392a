//! The kernel heap, for `alloc`.
//!
//! Two layers behind one `GlobalAlloc`:
//! - **per-CPU slabs** (`panda_mm::slab`): objects up to 2 KiB in power-of-two classes,
//!   from per-CPU free lists that need no lock; slab pages are frames taken from the
//!   frame allocator through the HHDM, so the heap grows with use. Larger blocks are
//!   contiguous frame runs from the buddy allocator.
//! - **the early heap**: a first-fit free list (`linked_list_allocator`) over one range
//!   taken from the memory map at boot, locked with interrupts off. It serves everything
//!   before the frame allocator exists, and afterwards whatever the frame allocator
//!   cannot give without waiting: the slab refill asks for frames with `try_alloc`, which
//!   fails instead of waiting on a lock — in particular on a lock this very CPU holds
//!   further up the stack, when the frame allocator's own bookkeeping allocates. A
//!   pointer inside the early range is always freed back there.
//!
//! Per-CPU lists are used with interrupts off on their CPU; interrupt handlers do not
//! allocate. Allocation failure returns null, which `alloc` turns into its OOM handler.
//! The kernel crate gives the early heap its range (`kernel/src/heap.rs`) and reads the
//! counters; everything that touches heap memory is here.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use linked_list_allocator::Heap;
use panda_arch::PAGE_SIZE;
use panda_mm::slab::{class_of, PageSource, SlabHeap};
use x86_64::instructions::interrupts;

/// Slab pages: frames from the calling CPU's cache, never waiting for a lock.
struct FramePages;

impl PageSource for FramePages {
    fn page(&self) -> Option<*mut u8> {
        crate::frame::try_alloc_heap_page()
    }
}

/// Bytes handed out and not yet freed, per CPU (a block freed on another CPU than the
/// one that allocated it makes one counter go down and another up; the sum is exact).
static LIVE_BYTES: [crossbeam_utils::CachePadded<core::sync::atomic::AtomicI64>;
    panda_arch::percpu::MAX_CPUS] =
    [const { crossbeam_utils::CachePadded::new(core::sync::atomic::AtomicI64::new(0)) };
        panda_arch::percpu::MAX_CPUS];

fn count_bytes(delta: i64) {
    if let Some(c) = LIVE_BYTES.get(panda_arch::percpu::current_index()) {
        c.fetch_add(delta, Ordering::Relaxed);
    }
}

/// Bytes of kernel heap in use (allocated, not yet freed), over every CPU: what leak
/// checks compare with a baseline (slab pages kept for reuse are not counted).
pub fn live_bytes() -> u64 {
    LIVE_BYTES
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum::<i64>()
        .max(0) as u64
}

struct KernelHeap {
    early: spin::Mutex<Heap>,
    early_range: (AtomicU64, AtomicU64),
    slabs: SlabHeap<FramePages>,
    slabs_on: AtomicBool,
}

impl KernelHeap {
    fn in_early(&self, ptr: *mut u8) -> bool {
        let p = ptr as u64;
        p >= self.early_range.0.load(Ordering::Relaxed)
            && p < self.early_range.1.load(Ordering::Relaxed)
    }

    fn early_alloc(&self, layout: Layout) -> *mut u8 {
        self.early
            .lock()
            .allocate_first_fit(layout)
            .map_or(core::ptr::null_mut(), NonNull::as_ptr)
    }

    /// Order of the frame run that holds `layout`, for blocks too big for the slabs.
    fn large_order(layout: Layout) -> usize {
        let pages = layout
            .size()
            .max(layout.align())
            .div_ceil(PAGE_SIZE as usize);
        pages.next_power_of_two().trailing_zeros() as usize
    }
}

// SAFETY: the early heap is only touched under its lock with interrupts off; per-CPU
// slab lists only by their CPU with interrupts off; frame runs are owned by the block
// they back until freed with the same layout.
unsafe impl GlobalAlloc for KernelHeap {
    // The contract of both methods is `GlobalAlloc`'s; each passes it on unchanged.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let ptr = unsafe { self.alloc_inner(layout) };
        if !ptr.is_null() {
            count_bytes(layout.size() as i64);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_bytes(-(layout.size() as i64));
        // SAFETY: the caller's contract for `dealloc` is passed on unchanged.
        unsafe { self.dealloc_inner(ptr, layout) }
    }
}

impl KernelHeap {
    /// `GlobalAlloc::alloc` without the byte count.
    ///
    /// # Safety
    /// As `GlobalAlloc::alloc`.
    unsafe fn alloc_inner(&self, layout: Layout) -> *mut u8 {
        interrupts::without_interrupts(|| {
            if self.slabs_on.load(Ordering::Acquire) {
                let cpu = panda_arch::percpu::current_index();
                match class_of(layout.size(), layout.align()) {
                    Some(class) => {
                        // SAFETY: interrupts are off and we are CPU `cpu`: its lists
                        // are ours for the call.
                        if let Some(ptr) = unsafe { self.slabs.alloc(cpu, class) } {
                            return ptr;
                        }
                    }
                    None => {
                        let order = Self::large_order(layout);
                        if let Some(run) = crate::frame::alloc_heap_run(order) {
                            LARGE_FRAMES.fetch_add(1 << order, Ordering::Relaxed);
                            return run;
                        }
                    }
                }
            }
            self.early_alloc(layout)
        })
    }

    /// `GlobalAlloc::dealloc` without the byte count.
    ///
    /// # Safety
    /// As `GlobalAlloc::dealloc`.
    unsafe fn dealloc_inner(&self, ptr: *mut u8, layout: Layout) {
        interrupts::without_interrupts(|| {
            if self.in_early(ptr) {
                if let Some(ptr) = NonNull::new(ptr) {
                    // SAFETY: `ptr` came from the early heap with this layout.
                    unsafe { self.early.lock().deallocate(ptr, layout) };
                }
                return;
            }
            match class_of(layout.size(), layout.align()) {
                Some(class) => {
                    let cpu = panda_arch::percpu::current_index();
                    // SAFETY: `ptr` came from the slabs with this class (same layout);
                    // interrupts are off on CPU `cpu`.
                    unsafe { self.slabs.free(cpu, class, ptr) };
                }
                None => {
                    // SAFETY: a block too big for the slabs and not in the early heap
                    // came from `alloc_heap_run` with this layout; the caller gives it up.
                    if unsafe { crate::frame::free_heap_run(ptr) } {
                        LARGE_FRAMES.fetch_sub(1 << Self::large_order(layout), Ordering::Relaxed);
                    }
                }
            }
        })
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap {
    early: spin::Mutex::new(Heap::empty()),
    early_range: (AtomicU64::new(0), AtomicU64::new(0)),
    slabs: SlabHeap::new(FramePages),
    slabs_on: AtomicBool::new(false),
};

/// Takes `bytes` of usable memory above 1 MiB from the boot memory map (claimed there
/// for the heap alone) and makes it the early heap. Returns the size, or 0 if none fit
/// or the early heap exists already.
pub fn init_early(map: &mut panda_arch::boot::BootMemoryMap, bytes: u64) -> u64 {
    if HEAP.early_range.1.load(Ordering::Relaxed) != 0 {
        return 0;
    }
    let Some(phys) = map.take(
        bytes,
        0x10_0000,
        u64::MAX,
        panda_arch::boot::MemoryKind::KernelEarly,
    ) else {
        return 0;
    };
    let start = panda_arch::HHDM_BASE + phys;
    HEAP.early_range.0.store(start, Ordering::Relaxed);
    HEAP.early_range.1.store(start + bytes, Ordering::Relaxed);
    // SAFETY: the range was usable RAM and `take` claimed it for the heap alone (the map
    // hands a range out once); the HHDM maps all RAM writable; the check above makes
    // this the only initialisation.
    interrupts::without_interrupts(|| unsafe {
        HEAP.early.lock().init(start as *mut u8, bytes as usize)
    });
    bytes
}

/// Switches allocations to the per-CPU slabs (once the frame allocator runs).
pub fn enable_slabs() {
    HEAP.slabs_on.store(true, Ordering::Release);
}

/// Early heap (bytes in use, bytes free).
pub fn usage() -> (usize, usize) {
    interrupts::without_interrupts(|| {
        let heap = HEAP.early.lock();
        (heap.used(), heap.free())
    })
}

/// Frames in frame runs backing large heap blocks now.
static LARGE_FRAMES: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Frames backing large heap blocks (too big for the slabs) now.
pub fn large_frames() -> usize {
    LARGE_FRAMES.load(Ordering::Relaxed)
}

/// Pages the slabs have taken from the frame allocator.
pub fn slab_pages() -> usize {
    HEAP.slabs.pages()
}
