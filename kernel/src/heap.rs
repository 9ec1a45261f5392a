//! The kernel heap, for `alloc` (the executor's tasks and queues).
//!
//! A first-fit free-list heap (`linked_list_allocator`) over one physically contiguous
//! range taken from the memory map at boot and reached through the HHDM, behind a spin
//! lock taken with interrupts off (so an interrupt on a CPU that holds the lock cannot
//! deadlock it; interrupt handlers do not allocate anyway). This is the early heap: the
//! memory issue replaces it with a per-CPU, size-classed allocator that grows from
//! frames. Allocation failure returns null, which `alloc` turns into its OOM handler.
#![allow(unsafe_code)] // GlobalAlloc is an unsafe trait; the heap range is raw memory.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;

use linked_list_allocator::Heap;
use x86_64::instructions::interrupts;

use crate::boot::{BootInfo, MemoryKind};

struct KernelHeap {
    heap: spin::Mutex<Heap>,
}

// SAFETY: every access to the inner heap goes through the lock with interrupts off.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        interrupts::without_interrupts(|| {
            self.heap
                .lock()
                .allocate_first_fit(layout)
                .map_or(core::ptr::null_mut(), NonNull::as_ptr)
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            // SAFETY: `ptr` came from `alloc` with this layout (GlobalAlloc's contract).
            interrupts::without_interrupts(|| unsafe { self.heap.lock().deallocate(ptr, layout) });
        }
    }
}

#[global_allocator]
static HEAP: KernelHeap = KernelHeap {
    heap: spin::Mutex::new(Heap::empty()),
};

/// Takes `bytes` of usable memory for the heap. Returns the size, or 0 if none fit.
pub fn init(boot: &mut BootInfo, bytes: u64) -> u64 {
    let Some(phys) = boot
        .memory_map
        .take(bytes, 0x10_0000, u64::MAX, MemoryKind::KernelEarly)
    else {
        return 0;
    };
    let start = (boot.hhdm_offset + phys) as *mut u8;
    // SAFETY: the range was usable RAM, is now claimed for the heap alone, and is mapped
    // writable through the HHDM; `init` runs once, before any allocation.
    interrupts::without_interrupts(|| unsafe { HEAP.heap.lock().init(start, bytes as usize) });
    bytes
}

/// (bytes in use, bytes free).
pub fn usage() -> (usize, usize) {
    interrupts::without_interrupts(|| {
        let heap = HEAP.heap.lock();
        (heap.used(), heap.free())
    })
}
