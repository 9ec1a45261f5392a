//! Size-classed, per-CPU object caches for the kernel heap: the lowest layer of `mm`,
//! where raw memory is handed out (hence this module's unsafe code).
//!
//! Objects of up to `MAX_SMALL` bytes come from slabs: pages carved into equal objects
//! of one size class (16 to 2048 bytes, powers of two, each aligned to its size). Free
//! objects form intrusive singly-linked lists (the first word of a free object points
//! at the next). Each CPU has its own free list per class; a CPU that frees more than
//! `2 * BATCH` objects of a class moves `BATCH` of them to a global list, and a CPU whose
//! list is empty takes `BATCH` from there before it carves a new slab. So the common
//! allocation and free touch only the calling CPU's lists, without a lock.
//!
//! Slabs come from a `PageSource` (the kernel: frames through the HHDM). Slabs are not
//! returned to the page source: heap memory is reused, not shrunk.
//!
//! Contract: the caller passes its CPU index and keeps the CPU's lists to itself for the
//! duration of the call (the kernel runs these with interrupts off on that CPU).
#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::ptr;

/// Largest object served by the slabs.
pub const MAX_SMALL: usize = 2048;
/// Size classes: 16 << i.
pub const CLASSES: usize = 8;
/// Objects moved between a CPU and the global list at once.
pub const BATCH: usize = 32;
/// CPUs served (`crate::MAX_CPUS`).
pub use crate::MAX_CPUS;
use crate::{CpuId, PerCpu};

const PAGE: usize = panda_abi::PAGE_SIZE;

/// Where slab pages come from.
pub trait PageSource {
    /// A 4 KiB, 4 KiB-aligned page the heap may keep forever, or None.
    fn page(&self) -> Option<*mut u8>;
}

/// The class serving `size` bytes at `align`, if small.
pub fn class_of(size: usize, align: usize) -> Option<usize> {
    let need = size.max(align).max(16).next_power_of_two();
    if need > MAX_SMALL {
        return None;
    }
    Some(need.trailing_zeros() as usize - 4)
}

/// Bytes of class `class`.
pub const fn class_size(class: usize) -> usize {
    16 << class
}

#[derive(Clone, Copy)]
struct FreeList {
    head: *mut u8,
    len: usize,
}

impl FreeList {
    const EMPTY: FreeList = FreeList {
        head: ptr::null_mut(),
        len: 0,
    };

    /// # Safety
    /// `obj` is a free object of this list's class, owned by the caller, at least 8
    /// bytes and 8-aligned.
    unsafe fn push(&mut self, obj: *mut u8) {
        // SAFETY: per the contract, the object's first word is ours to write.
        unsafe { (obj as *mut *mut u8).write(self.head) };
        self.head = obj;
        self.len += 1;
    }

    /// Moves the first object of `self` to `to` (both lists of one class). Returns
    /// false when `self` is empty.
    fn move_one(&mut self, to: &mut FreeList) -> bool {
        // SAFETY: lists only ever hold free objects pushed by `push`, and both lists
        // belong to the same class, so the object may be linked into `to`.
        unsafe {
            match self.pop() {
                Some(obj) => {
                    to.push(obj);
                    true
                }
                None => false,
            }
        }
    }

    /// # Safety
    /// Every object in the list is a free object written by `push`.
    unsafe fn pop(&mut self) -> Option<*mut u8> {
        if self.head.is_null() {
            return None;
        }
        let obj = self.head;
        // SAFETY: `obj` was pushed, so its first word holds the next pointer.
        self.head = unsafe { (obj as *const *mut u8).read() };
        self.len -= 1;
        Some(obj)
    }
}

struct CpuLists(UnsafeCell<[FreeList; CLASSES]>);

// SAFETY: each CPU's lists are only touched by that CPU (the module contract).
unsafe impl Sync for CpuLists {}

struct GlobalList(spin::Mutex<FreeList>);

// SAFETY: the raw pointers inside are free objects that only move under the lock.
unsafe impl Send for FreeList {}

/// The slab heap.
pub struct SlabHeap<S: PageSource> {
    source: S,
    cpus: PerCpu<CpuLists>,
    global: [GlobalList; CLASSES],
    pages: core::sync::atomic::AtomicUsize,
}

impl<S: PageSource> SlabHeap<S> {
    pub const fn new(source: S) -> Self {
        Self {
            source,
            cpus: PerCpu::new(
                [const { CpuLists(UnsafeCell::new([FreeList::EMPTY; CLASSES])) }; MAX_CPUS],
            ),
            global: [const { GlobalList(spin::Mutex::new(FreeList::EMPTY)) }; CLASSES],
            pages: core::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Pages taken for slabs so far.
    pub fn pages(&self) -> usize {
        self.pages.load(core::sync::atomic::Ordering::Relaxed)
    }

    /// An object of class `class` for CPU `cpu`, or None if no page could be had.
    ///
    /// # Safety
    /// The caller is CPU `cpu` and nothing else uses `cpu`'s lists during the call.
    pub unsafe fn alloc(&self, cpu: CpuId, class: usize) -> Option<*mut u8> {
        // SAFETY: the caller has CPU `cpu`'s lists to itself.
        let lists = unsafe { &mut *self.cpus[cpu].0.get() };
        // SAFETY: objects in the list were pushed by `free`/`refill`.
        if let Some(obj) = unsafe { lists[class].pop() } {
            return Some(obj);
        }
        // Take a batch from the global list, else carve a new slab. The local list is
        // not borrowed across `refill`, which calls out to the page source.
        let mut got = self.take_global(class);
        if got.len == 0 {
            got = self.carve(class)?;
        }
        // SAFETY: as above; `got` is a list of free objects of this class.
        let lists = unsafe { &mut *self.cpus[cpu].0.get() };
        while got.move_one(&mut lists[class]) {}
        // SAFETY: as above.
        unsafe { lists[class].pop() }
    }

    /// Returns an object of class `class` to CPU `cpu`'s list.
    ///
    /// # Safety
    /// `obj` came from `alloc` with the same class and is not used any more; the caller
    /// is CPU `cpu` with its lists to itself.
    pub unsafe fn free(&self, cpu: CpuId, class: usize, obj: *mut u8) {
        // SAFETY: the caller has CPU `cpu`'s lists to itself.
        let lists = unsafe { &mut *self.cpus[cpu].0.get() };
        // SAFETY: `obj` is a free object of this class (the contract).
        unsafe { lists[class].push(obj) };
        if lists[class].len > 2 * BATCH {
            let mut global = self.global[class].0.lock();
            for _ in 0..BATCH {
                lists[class].move_one(&mut global);
            }
        }
    }

    fn take_global(&self, class: usize) -> FreeList {
        let mut global = self.global[class].0.lock();
        let mut got = FreeList::EMPTY;
        for _ in 0..BATCH {
            if !global.move_one(&mut got) {
                break;
            }
        }
        got
    }

    /// A new page carved into free objects of `class`.
    fn carve(&self, class: usize) -> Option<FreeList> {
        let page = self.source.page()?;
        self.pages
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let size = class_size(class);
        let mut list = FreeList::EMPTY;
        for i in (0..PAGE / size).rev() {
            // SAFETY: the page is ours for good (PageSource contract); each object lies
            // inside it, is `size`-aligned (so 8-aligned) and at least 16 bytes.
            unsafe { list.push(page.add(i * size)) };
        }
        Some(list)
    }
}

// Test code calls the unsafe API exactly as its contracts say (each thread is one CPU,
// objects are freed with the class they were allocated with).
#[cfg(test)]
#[allow(clippy::undocumented_unsafe_blocks)]
mod tests {
    use super::*;

    fn cpu_id(i: usize) -> CpuId {
        CpuId::new(i).unwrap()
    }
    use std::alloc::{alloc, Layout};
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Pages {
        limit: usize,
        given: AtomicUsize,
    }
    impl PageSource for Pages {
        fn page(&self) -> Option<*mut u8> {
            if self.given.fetch_add(1, Ordering::SeqCst) >= self.limit {
                return None;
            }
            // SAFETY (test): a fresh, leaked, page-aligned allocation.
            Some(unsafe { alloc(Layout::from_size_align(PAGE, PAGE).unwrap()) })
        }
    }

    fn heap(limit: usize) -> SlabHeap<Pages> {
        SlabHeap::new(Pages {
            limit,
            given: AtomicUsize::new(0),
        })
    }

    #[test]
    fn classes_fit_size_and_alignment() {
        assert_eq!(class_of(1, 1), Some(0));
        assert_eq!(class_of(17, 8), Some(1));
        assert_eq!(class_of(8, 64), Some(2), "alignment picks the class");
        assert_eq!(class_of(2048, 8), Some(7));
        assert_eq!(class_of(2049, 8), None);
        assert_eq!(class_of(16, 4096), None, "page alignment is not small");
    }

    #[test]
    fn objects_are_distinct_aligned_and_reused() {
        let h = heap(100);
        let mut seen = HashSet::new();
        let mut objs = Vec::new();
        for _ in 0..1000 {
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            let o = unsafe { h.alloc(cpu_id(0), 2) }.unwrap();
            assert_eq!(o as usize % 64, 0);
            assert!(seen.insert(o as usize), "object handed out twice");
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            unsafe { o.write_bytes(0xab, 64) };
            objs.push(o);
        }
        let pages = h.pages();
        for o in objs.drain(..) {
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            unsafe { h.free(cpu_id(0), 2, o) };
        }
        for _ in 0..1000 {
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            objs.push(unsafe { h.alloc(cpu_id(0), 2) }.unwrap());
        }
        assert_eq!(h.pages(), pages, "freed objects were not reused");
    }

    #[test]
    fn running_out_of_pages_is_none() {
        let h = heap(1);
        let per_page = PAGE / class_size(7);
        for _ in 0..per_page {
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            assert!(unsafe { h.alloc(cpu_id(0), 7) }.is_some());
        }
        // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
        assert!(unsafe { h.alloc(cpu_id(0), 7) }.is_none());
    }

    #[test]
    fn objects_move_between_cpus_through_the_global_list() {
        let h = Arc::new(heap(1000));
        // CPU 0 allocates, CPU 1 frees (overflowing to global), CPU 2 reuses them.
        let objs: Vec<usize> = (0..200)
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            .map(|_| unsafe { h.alloc(cpu_id(0), 3) }.unwrap() as usize)
            .collect();
        let pages = h.pages();
        for &o in &objs {
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            unsafe { h.free(cpu_id(1), 3, o as *mut u8) };
        }
        let reused: HashSet<usize> = (0..100)
            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
            .map(|_| unsafe { h.alloc(cpu_id(2), 3) }.unwrap() as usize)
            .collect();
        assert_eq!(
            h.pages(),
            pages,
            "CPU 2 carved new slabs instead of reusing freed objects"
        );
        assert!(reused.iter().all(|o| objs.contains(o)));
    }

    #[test]
    fn threads_as_cpus_never_share_an_object() {
        let h: &'static SlabHeap<Pages> = Box::leak(Box::new(heap(10_000)));
        let handles: Vec<_> = (0..4)
            .map(|cpu| {
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for round in 0..2000 {
                        // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
                        let o = unsafe { h.alloc(cpu_id(cpu), round % CLASSES) }.unwrap();
                        unsafe { o.write_bytes(cpu as u8, class_size(round % CLASSES)) };
                        mine.push((o as usize, round % CLASSES));
                        if round % 3 == 0 {
                            let (o, c) = mine.swap_remove(0);
                            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
                            unsafe { h.free(cpu_id(cpu), c, o as *mut u8) };
                        }
                    }
                    for &(o, c) in &mine {
                        let bytes =
                            // SAFETY: test code on one CPU index per thread, freeing with the class it allocated.
                            unsafe { std::slice::from_raw_parts(o as *const u8, class_size(c)) };
                        assert!(
                            bytes.iter().all(|&b| b == cpu as u8),
                            "another CPU wrote my object"
                        );
                    }
                    mine
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for (o, _) in h.join().unwrap() {
                assert!(all.insert(o), "two CPUs hold one object");
            }
        }
    }

    /// Objects go to the global list only when a CPU holds more than `2 * BATCH` of a
    /// class, `BATCH` at a time, and a CPU with an empty list takes a whole batch from
    /// there: the page count shows which CPU had to carve a new slab.
    #[test]
    fn the_global_list_moves_whole_batches_past_twice_a_batch() {
        let h = heap(100);
        let class = 3; // 128 bytes: 32 objects per page
        let per_page = PAGE / class_size(class);
        assert_eq!(per_page, 32);
        // SAFETY: `h` is this test's own heap and `class` one of its size classes; the
        // objects are only counted, never dereferenced.
        let objs: Vec<*mut u8> = (0..2 * BATCH + 1)
            .map(|_| unsafe { h.alloc(cpu_id(0), class) }.unwrap())
            .collect();
        assert_eq!(h.pages(), (2 * BATCH + 1).div_ceil(per_page));
        let pages = h.pages();
        for &o in &objs[..2 * BATCH] {
            // SAFETY: `o` came from `h.alloc` with this `class` and is freed once.
            unsafe { h.free(cpu_id(1), class, o) };
        }
        // CPU 1 holds exactly 2 * BATCH: none went global, so CPU 2 carves.
        // SAFETY: this test's heap and size class; the object is never dereferenced.
        let _ = unsafe { h.alloc(cpu_id(2), class) }.unwrap();
        assert_eq!(h.pages(), pages + 1, "objects went global at 2 * BATCH");
        // One more: BATCH of them go global, and CPU 3 takes them all at once ...
        // SAFETY: the last of `objs`, allocated with `class` and not yet freed.
        unsafe { h.free(cpu_id(1), class, objs[2 * BATCH]) };
        // SAFETY: this test's heap and size class; `o` is only compared, never read.
        let o = unsafe { h.alloc(cpu_id(3), class) }.unwrap();
        assert!(objs.contains(&o), "CPU 3 did not reuse a freed object");
        assert_eq!(h.pages(), pages + 1);
        // ... so CPU 4 finds the global list empty and carves.
        // SAFETY: this test's heap and size class; the object is never dereferenced.
        let _ = unsafe { h.alloc(cpu_id(4), class) }.unwrap();
        assert_eq!(h.pages(), pages + 2, "CPU 3 took fewer than a batch");
        // CPU 3 has the rest of the batch locally: BATCH - 1 more without a page.
        for _ in 0..BATCH - 1 {
            // SAFETY: this test's heap and size class; the object is only compared.
            assert!(objs.contains(&unsafe { h.alloc(cpu_id(3), class) }.unwrap()));
        }
        assert_eq!(h.pages(), pages + 2);
    }

    #[test]
    fn class_sizes_double_from_16_bytes() {
        let sizes: Vec<usize> = (0..CLASSES).map(class_size).collect();
        assert_eq!(sizes, [16, 32, 64, 128, 256, 512, 1024, 2048]);
        for (class, &size) in sizes.iter().enumerate() {
            assert_eq!(class_of(size, 1), Some(class), "{size} bytes");
            assert_eq!(class_of(1, size), Some(class), "{size}-byte alignment");
            if size > 16 {
                assert_eq!(
                    class_of(size / 2 + 1, 1),
                    Some(class),
                    "{} bytes",
                    size / 2 + 1
                );
            }
        }
    }
}
