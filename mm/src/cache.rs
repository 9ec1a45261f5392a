//! Per-CPU frame caches in front of the buddy allocator.
//!
//! Each CPU owns a cache of up to `CACHE_CAPACITY` single frames on its own cache line.
//! Allocation pops from the caller's cache; an empty cache refills `BATCH` frames from
//! the global allocator under its lock. Freeing pushes to the caller's cache; a full
//! cache drains `BATCH` frames back. So the common path touches only the caller's
//! cache: its lock is only ever contended by statistics readers.
//!
//! With a span (`with_span`), the allocator also keeps one bit per frame saying whether
//! it is out (handed to a caller) or free (in the buddy or a cache), changed only at
//! this API: a frame freed twice — even into another CPU's cache, where the cache's own
//! check cannot see it — is refused and counted instead of being handed out twice
//! later, and a frame the lists would hand out while it is still out is skipped and
//! counted. Both counts must stay 0 (`misuse`); the kernel reports any as a failure.
//!
//! The caller passes its CPU index and must stay on that CPU for the call (the kernel
//! holds interrupts off, see `panda_arch::percpu::CpuGuard`). Frames are fungible, so
//! a frame allocated on one CPU and freed on another simply joins the second CPU's
//! cache; `total_free` counts global and cached frames, so tests can prove a workload
//! returned everything it took.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::buddy::BuddyAllocator;
use crate::{CpuId, MmError, PhysFrame, MAX_CPUS};

/// Frames one CPU's cache holds at most.
pub const CACHE_CAPACITY: usize = 64;
/// Frames moved per refill or drain.
pub const BATCH: usize = 32;
const _: () = assert!(
    BATCH.is_power_of_two() && BATCH.trailing_zeros() as usize <= crate::buddy::MAX_SPLIT_ORDER
);

struct FrameCache {
    frames: [u64; CACHE_CAPACITY],
    len: usize,
}

/// Statistics of one CPU's cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub cached: usize,
    pub hits: u64,
    pub refills: u64,
    pub drains: u64,
}

struct CpuCache {
    cache: spin::Mutex<FrameCache>,
    hits: AtomicU64,
    refills: AtomicU64,
    drains: AtomicU64,
}

/// One bit per frame of a physical span, each changed atomically: the allocator's
/// ownership bits, and the kernel's record of which free frames hold its poison fill.
pub struct FrameBits {
    base: u64,
    bits: Vec<AtomicU64>,
}

impl FrameBits {
    /// Clear bits for every frame of `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        let base = start / crate::FRAME_SIZE * crate::FRAME_SIZE;
        let frames = end.saturating_sub(base).div_ceil(crate::FRAME_SIZE);
        Self {
            base,
            bits: (0..frames.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// The first and one past the last address covered.
    pub fn span(&self) -> (u64, u64) {
        let frames = self.bits.len() as u64 * 64;
        (self.base, self.base + frames * crate::FRAME_SIZE)
    }

    /// The word and bit of the frame at `addr`, if the span covers it.
    fn slot(&self, addr: u64) -> Option<(&AtomicU64, u64)> {
        let index = addr.checked_sub(self.base)? / crate::FRAME_SIZE;
        let word = self.bits.get((index / 64) as usize)?;
        Some((word, 1u64 << (index % 64)))
    }

    /// Sets the frame's bit; its previous value (None outside the span).
    pub fn set(&self, addr: u64) -> Option<bool> {
        self.slot(addr)
            .map(|(word, bit)| word.fetch_or(bit, Ordering::AcqRel) & bit != 0)
    }

    /// Clears the frame's bit; its previous value (None outside the span).
    pub fn clear(&self, addr: u64) -> Option<bool> {
        self.slot(addr)
            .map(|(word, bit)| word.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// The frame's bit (None outside the span).
    pub fn get(&self, addr: u64) -> Option<bool> {
        self.slot(addr)
            .map(|(word, bit)| word.load(Ordering::Acquire) & bit != 0)
    }
}

/// Misuse the ownership bits caught (`Frames::misuse`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Misuse {
    /// Frees of a frame that was not out (refused).
    pub double_frees: u64,
    /// Frames the free lists held while they were out (skipped, never handed out).
    pub double_allocs: u64,
}

/// The frame allocator the kernel uses: global buddy plus per-CPU caches.
pub struct Frames {
    /// Which frames are out (`with_span`); `None`: not tracked.
    owned: Option<FrameBits>,
    double_frees: AtomicU64,
    double_allocs: AtomicU64,
    global: spin::Mutex<BuddyAllocator>,
    /// The global allocator's free count as of its last unlock: read without the lock
    /// by hot paths that only need an estimate (the kernel's memory reserve check).
    global_free_hint: CachePadded<AtomicU64>,
    cpus: Vec<CachePadded<CpuCache>>,
}

/// The global allocator, locked; publishes its free count when unlocked.
struct Global<'a> {
    buddy: spin::MutexGuard<'a, BuddyAllocator>,
    hint: &'a AtomicU64,
}

impl core::ops::Deref for Global<'_> {
    type Target = BuddyAllocator;
    fn deref(&self) -> &BuddyAllocator {
        &self.buddy
    }
}

impl core::ops::DerefMut for Global<'_> {
    fn deref_mut(&mut self) -> &mut BuddyAllocator {
        &mut self.buddy
    }
}

impl Drop for Global<'_> {
    fn drop(&mut self) {
        self.hint.store(self.buddy.free_frames(), Ordering::Relaxed);
    }
}

impl Frames {
    /// An empty allocator for CPUs `0..cpus`, without ownership bits.
    pub fn new(cpus: usize) -> Self {
        Self::build(cpus, None)
    }

    /// An empty allocator for CPUs `0..cpus` that keeps an ownership bit for every
    /// frame in `[start, end)` (where every range it will be given lies): a bit per
    /// frame of the span, on the heap.
    pub fn with_span(cpus: usize, start: u64, end: u64) -> Self {
        Self::build(cpus, Some(FrameBits::new(start, end)))
    }

    fn build(cpus: usize, owned: Option<FrameBits>) -> Self {
        Self {
            owned,
            double_frees: AtomicU64::new(0),
            double_allocs: AtomicU64::new(0),
            global: spin::Mutex::new(BuddyAllocator::new()),
            global_free_hint: CachePadded::new(AtomicU64::new(0)),
            cpus: (0..cpus.clamp(1, MAX_CPUS))
                .map(|_| {
                    CachePadded::new(CpuCache {
                        cache: spin::Mutex::new(FrameCache {
                            frames: [0; CACHE_CAPACITY],
                            len: 0,
                        }),
                        hits: AtomicU64::new(0),
                        refills: AtomicU64::new(0),
                        drains: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    fn global(&self) -> Global<'_> {
        Global {
            buddy: self.global.lock(),
            hint: &self.global_free_hint,
        }
    }

    fn try_global(&self) -> Option<Global<'_>> {
        Some(Global {
            buddy: self.global.try_lock()?,
            hint: &self.global_free_hint,
        })
    }

    /// Frames free in the global allocator as of its last change, without taking its
    /// lock (frames in per-CPU caches are not counted: a low estimate).
    pub fn global_free_estimate(&self) -> u64 {
        self.global_free_hint.load(Ordering::Relaxed)
    }

    /// Adds a free physical range.
    pub fn add_range(&self, start: u64, end: u64) {
        self.global().add_range(start, end);
    }

    /// CPU `cpu`'s cache. The kernel builds the caches for every CPU it runs, so an
    /// index past them is a kernel bug: it panics (indexing), never borrows another
    /// CPU's cache.
    fn cpu(&self, cpu: CpuId) -> &CpuCache {
        &self.cpus[cpu.index()]
    }

    /// Marks a frame the lists gave up as out; false (counted) if it already was.
    fn hand_out(&self, addr: u64) -> bool {
        // Outside the span (or untracked): nothing to check.
        let fine = self.owned.as_ref().and_then(|o| o.set(addr)) != Some(true);
        if !fine {
            self.double_allocs.fetch_add(1, Ordering::Relaxed);
        }
        fine
    }

    /// Marks a frame coming back as free; false (counted) if it was not out.
    fn take_back(&self, addr: u64) -> bool {
        let fine = self.owned.as_ref().and_then(|o| o.clear(addr)) != Some(false);
        if !fine {
            self.double_frees.fetch_add(1, Ordering::Relaxed);
        }
        fine
    }

    /// Frees refused and frames skipped because the ownership bits said so (always 0
    /// without a span, and in a correct kernel).
    pub fn misuse(&self) -> Misuse {
        Misuse {
            double_frees: self.double_frees.load(Ordering::Relaxed),
            double_allocs: self.double_allocs.load(Ordering::Relaxed),
        }
    }

    /// Whether the ownership bits say the frame at `addr` is out (None: not tracked).
    pub fn is_out(&self, addr: u64) -> Option<bool> {
        self.owned.as_ref()?.get(addr)
    }

    /// The physical span the ownership bits cover (None: not tracked).
    pub fn span(&self) -> Option<(u64, u64)> {
        self.owned.as_ref().map(FrameBits::span)
    }

    /// One frame, from CPU `cpu`'s cache (refilled from the global allocator if empty).
    /// A frame the lists hold while it is out (a bug the ownership bits catch) is
    /// skipped: it stays with whoever has it.
    pub fn alloc(&self, cpu: CpuId) -> Result<PhysFrame, MmError> {
        loop {
            let frame = self.alloc_listed(cpu)?;
            if self.hand_out(frame.0) {
                return Ok(frame);
            }
        }
    }

    fn alloc_listed(&self, cpu: CpuId) -> Result<PhysFrame, MmError> {
        let c = self.cpu(cpu);
        let mut cache = c.cache.lock();
        if cache.len == 0 {
            let mut global = self.global();
            // One aligned run of BATCH frames when there is one (a single allocation);
            // frame by frame from a fragmented allocator otherwise.
            if let Ok(run) = global.alloc_split(BATCH.trailing_zeros() as usize) {
                for i in 0..BATCH as u64 {
                    cache.frames[i as usize] = run.addr() + i * crate::FRAME_SIZE;
                }
                cache.len = BATCH;
            }
            while cache.len < BATCH {
                match global.alloc(0) {
                    Ok(f) => {
                        let at = cache.len;
                        cache.frames[at] = f.addr();
                        cache.len += 1;
                    }
                    Err(_) => break,
                }
            }
            drop(global);
            if cache.len == 0 {
                return Err(MmError::OutOfMemory);
            }
            c.refills.fetch_add(1, Ordering::Relaxed);
        } else {
            c.hits.fetch_add(1, Ordering::Relaxed);
        }
        cache.len -= 1;
        let addr = cache.frames[cache.len];
        Ok(PhysFrame(addr))
    }

    /// Like `alloc`, but never waits for a lock: it fails instead when the cache or
    /// the global allocator is busy — including busy with this very CPU further up
    /// the stack. For callers that may run inside the allocator (the kernel heap's
    /// slab refill, reached from allocations the allocator itself makes).
    pub fn try_alloc(&self, cpu: CpuId) -> Result<PhysFrame, MmError> {
        loop {
            let frame = self.try_alloc_listed(cpu)?;
            if self.hand_out(frame.0) {
                return Ok(frame);
            }
        }
    }

    fn try_alloc_listed(&self, cpu: CpuId) -> Result<PhysFrame, MmError> {
        let c = self.cpu(cpu);
        let mut cache = c.cache.try_lock().ok_or(MmError::OutOfMemory)?;
        if cache.len == 0 {
            let mut global = self.try_global().ok_or(MmError::OutOfMemory)?;
            let frame = global.alloc(0)?;
            return Ok(frame);
        }
        c.hits.fetch_add(1, Ordering::Relaxed);
        cache.len -= 1;
        Ok(PhysFrame(cache.frames[cache.len]))
    }

    /// Returns a frame to CPU `cpu`'s cache (draining a batch to the global allocator if
    /// full). A frame that is not out (a double free, with ownership bits; without
    /// them, one already in this cache) is rejected.
    pub fn free(&self, cpu: CpuId, frame: PhysFrame) -> Result<(), MmError> {
        if !self.take_back(frame.addr()) {
            return Err(MmError::NotAllocated);
        }
        let c = self.cpu(cpu);
        let mut cache = c.cache.lock();
        let len = cache.len;
        if self.owned.is_none() && cache.frames[..len].contains(&frame.addr()) {
            return Err(MmError::NotAllocated);
        }
        if cache.len == CACHE_CAPACITY {
            let mut global = self.global();
            for _ in 0..BATCH {
                cache.len -= 1;
                let addr = cache.frames[cache.len];
                global.free(PhysFrame(addr))?;
            }
            c.drains.fetch_add(1, Ordering::Relaxed);
        }
        let at = cache.len;
        cache.frames[at] = frame.addr();
        cache.len += 1;
        Ok(())
    }

    /// Frees many frames straight to the global allocator under one lock hold (a
    /// heap shrink's or a buffer's), bypassing the caches. Returns how many were
    /// rejected (not allocated), which is a caller's bug.
    pub fn free_many(&self, frames: &mut [u64]) -> usize {
        let mut refused = 0;
        let mut kept = 0;
        for i in 0..frames.len() {
            if self.take_back(frames[i]) {
                frames[kept] = frames[i];
                kept += 1;
            } else {
                refused += 1;
            }
        }
        refused + self.global().free_many(&mut frames[..kept])
    }

    /// 2^order contiguous frames, straight from the global allocator.
    pub fn alloc_contiguous(&self, order: usize) -> Result<PhysFrame, MmError> {
        let run = self.global().alloc(order)?;
        for i in 0..1u64 << order {
            self.hand_out(run.0 + i * crate::FRAME_SIZE);
        }
        Ok(run)
    }

    /// Frees a run from `alloc_contiguous`.
    pub fn free_contiguous(&self, frame: PhysFrame) -> Result<(), MmError> {
        let mut global = self.global();
        let order = global.run_order(frame.0).ok_or(MmError::NotAllocated)?;
        for i in 0..1u64 << order {
            self.take_back(frame.0 + i * crate::FRAME_SIZE);
        }
        global.free(frame)
    }

    /// Frames free in the global allocator.
    pub fn global_free(&self) -> u64 {
        self.global().free_frames()
    }

    /// Frames free anywhere: global plus every CPU's cache.
    pub fn total_free(&self) -> u64 {
        self.global_free()
            + self
                .cpus
                .iter()
                .map(|c| c.cache.lock().len as u64)
                .sum::<u64>()
    }

    /// Whether `frame` is in use by someone: handed out by the global allocator and
    /// not sitting in a CPU's cache. (For tests that prove a frame is not reused early;
    /// takes every lock, so not for hot paths.)
    pub fn is_in_use(&self, frame: PhysFrame) -> bool {
        let cached = self.cpus.iter().any(|c| {
            let cache = c.cache.lock();
            cache.frames[..cache.len].contains(&frame.0)
        });
        !cached && self.global().is_allocated(frame.0)
    }

    /// The global allocator's bookkeeping entries (see `BuddyAllocator`).
    pub fn bookkeeping_entries(&self) -> usize {
        self.global().bookkeeping_entries()
    }

    /// Frames ever added.
    pub fn total_frames(&self) -> u64 {
        self.global().total_frames()
    }

    /// CPU `cpu`'s cache statistics.
    pub fn stats(&self, cpu: CpuId) -> CacheStats {
        let c = self.cpu(cpu);
        CacheStats {
            cached: c.cache.lock().len,
            hits: c.hits.load(Ordering::Relaxed),
            refills: c.refills.load(Ordering::Relaxed),
            drains: c.drains.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_id(i: usize) -> CpuId {
        CpuId::new(i).unwrap()
    }
    use std::collections::HashSet;
    use std::sync::Arc;

    fn frames(cpus: usize, n: u64) -> Frames {
        let f = Frames::with_span(cpus, 0x100_0000, 0x100_0000 + n * 4096);
        f.add_range(0x100_0000, 0x100_0000 + n * 4096);
        f
    }

    #[test]
    fn the_lock_free_estimate_follows_the_global_allocator() {
        let f = frames(2, 256);
        assert_eq!(f.global_free_estimate(), 256);
        let a = f.alloc(cpu_id(0)).unwrap(); // refills CPU 0's cache with a batch
        assert_eq!(f.global_free_estimate(), f.global_free());
        assert!(f.global_free_estimate() < 256);
        let big = f.alloc_contiguous(4).unwrap();
        assert_eq!(f.global_free_estimate(), f.global_free());
        f.free_contiguous(big).unwrap();
        f.free(cpu_id(0), a).unwrap();
        assert_eq!(f.global_free_estimate(), f.global_free());
    }

    #[test]
    fn in_use_means_handed_out_and_not_cached() {
        let f = frames(2, 256);
        let a = f.alloc(cpu_id(0)).unwrap();
        let b = f.alloc_contiguous(2).unwrap();
        assert!(f.is_in_use(a));
        assert!(f.is_in_use(b) && f.is_in_use(PhysFrame(b.0 + 3 * 4096)));
        f.free(cpu_id(1), a).unwrap(); // into CPU 1's cache: free, though the buddy lends it out
        assert!(!f.is_in_use(a));
        f.free_contiguous(b).unwrap();
        assert!(!f.is_in_use(b));
        // Of every frame, exactly the one handed out is in use: those still in CPU 0's
        // cache after its refill are not.
        let c = f.alloc(cpu_id(0)).unwrap();
        let in_use: Vec<u64> = (0..256)
            .map(|i| 0x100_0000 + i * 4096)
            .filter(|&a| f.is_in_use(PhysFrame(a)))
            .collect();
        assert_eq!(in_use, vec![c.0]);
    }

    #[test]
    fn refills_and_drains_in_batches() {
        let f = frames(1, 1000);
        let a = f.alloc(cpu_id(0)).unwrap();
        // The first allocation refilled one batch and took one frame of it.
        assert_eq!(f.stats(cpu_id(0)).refills, 1);
        assert_eq!(f.stats(cpu_id(0)).cached, BATCH - 1);
        assert_eq!(f.global_free(), 1000 - BATCH as u64);
        let mut taken = vec![a];
        for _ in 0..BATCH - 1 {
            taken.push(f.alloc(cpu_id(0)).unwrap());
        }
        assert_eq!(
            f.stats(cpu_id(0)).hits,
            BATCH as u64 - 1,
            "served from the cache"
        );
        assert_eq!(f.stats(cpu_id(0)).refills, 1);
        // Free more than the capacity: one drain of BATCH frames.
        for _ in 0..CACHE_CAPACITY - BATCH + 1 {
            taken.push(f.alloc(cpu_id(0)).unwrap());
        }
        for t in taken {
            f.free(cpu_id(0), t).unwrap();
        }
        assert_eq!(f.stats(cpu_id(0)).drains, 1);
        assert_eq!(f.total_free(), 1000);
    }

    #[test]
    fn try_alloc_fails_instead_of_waiting_for_a_held_lock() {
        let f = frames(1, 100);
        let a = f.alloc(cpu_id(0)).unwrap();
        {
            let _held = f.cpus[0].cache.lock();
            assert_eq!(f.try_alloc(cpu_id(0)), Err(MmError::OutOfMemory));
        }
        let b = f.try_alloc(cpu_id(0)).unwrap();
        assert_ne!(a, b);
        f.free(cpu_id(0), a).unwrap();
        f.free(cpu_id(0), b).unwrap();
        assert_eq!(f.total_free(), 100);
    }

    #[test]
    fn a_double_free_into_the_cache_is_rejected() {
        for f in [frames(1, 100), untracked(1, 100)] {
            let a = f.alloc(cpu_id(0)).unwrap();
            f.free(cpu_id(0), a).unwrap();
            assert_eq!(f.free(cpu_id(0), a), Err(MmError::NotAllocated));
            assert_eq!(f.total_free(), 100);
        }
    }

    fn untracked(cpus: usize, n: u64) -> Frames {
        let f = Frames::new(cpus);
        f.add_range(0x100_0000, 0x100_0000 + n * 4096);
        f
    }

    /// The case the cache's own check cannot see: the second free goes to another
    /// CPU's cache (or the global allocator) while the first copy sits in a cache.
    /// Accepted, the frame would be handed out twice; the ownership bits refuse it.
    #[test]
    fn a_double_free_into_another_cpus_cache_is_refused_and_counted() {
        let f = frames(2, 200);
        let a = f.alloc(cpu_id(0)).unwrap();
        f.free(cpu_id(0), a).unwrap();
        assert_eq!(f.free(cpu_id(1), a), Err(MmError::NotAllocated));
        let mut many = [a.0];
        assert_eq!(f.free_many(&mut many), 1);
        assert_eq!(f.misuse().double_frees, 2);
        // Every frame is handed out exactly once, whoever asks.
        let mut seen = HashSet::new();
        while let Ok(fr) = f.alloc(cpu_id(seen.len() % 2)) {
            assert!(seen.insert(fr), "{fr:?} handed out twice");
            assert_eq!(f.is_out(fr.0), Some(true));
        }
        assert_eq!(f.misuse().double_allocs, 0);
        for (i, fr) in seen.into_iter().enumerate() {
            f.free(cpu_id(i % 2), fr).unwrap();
        }
        assert_eq!(f.total_free(), 200);
        assert_eq!(f.is_out(a.0), Some(false));
    }

    #[test]
    fn runs_are_out_frame_by_frame_until_freed_whole() {
        let f = frames(1, 64);
        let run = f.alloc_contiguous(3).unwrap();
        for i in 0..8 {
            assert_eq!(f.is_out(run.0 + i * 4096), Some(true));
        }
        // A frame of the run freed on its own is not a run: refused by the buddy, and
        // the run stays out.
        f.free_contiguous(run).unwrap();
        assert_eq!(f.free_contiguous(run), Err(MmError::NotAllocated));
        for i in 0..8 {
            assert_eq!(f.is_out(run.0 + i * 4096), Some(false));
        }
        assert_eq!(f.misuse(), Misuse::default());
        assert_eq!(f.total_free(), 64);
    }

    #[test]
    fn exhaustion_is_an_error_and_everything_returns() {
        let f = frames(2, 100);
        let mut taken = HashSet::new();
        loop {
            match f.alloc(cpu_id(taken.len() % 2)) {
                Ok(fr) => assert!(taken.insert(fr), "handed out twice"),
                Err(e) => {
                    assert_eq!(e, MmError::OutOfMemory);
                    break;
                }
            }
        }
        // Frames may sit in the other CPU's cache; at most a batch short.
        assert!(taken.len() as u64 >= 100 - BATCH as u64);
        for (i, fr) in taken.into_iter().enumerate() {
            f.free(cpu_id(i % 2), fr).unwrap();
        }
        assert_eq!(f.total_free(), 100);
    }

    #[test]
    fn frames_freed_on_another_cpu_come_back_and_threads_never_share_a_frame() {
        let f = Arc::new(frames(4, 4096));
        let handles: Vec<_> = (0..4)
            .map(|cpu| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for round in 0..200 {
                        for _ in 0..7 {
                            mine.push(f.alloc(cpu_id(cpu)).unwrap());
                        }
                        if round % 3 == 0 {
                            for fr in mine.drain(..) {
                                // Free on the "next" CPU: cross-CPU frees.
                                f.free(cpu_id((cpu + 1) % 4), fr).unwrap();
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut all = HashSet::new();
        let mut held = Vec::new();
        for h in handles {
            for fr in h.join().unwrap() {
                assert!(all.insert(fr), "two CPUs hold {fr:?}");
                held.push(fr);
            }
        }
        for fr in held {
            f.free(cpu_id(0), fr).unwrap();
        }
        assert_eq!(f.total_free(), 4096);
    }

    #[test]
    fn contiguous_runs_come_from_the_global_allocator() {
        let f = frames(1, 2048);
        let run = f.alloc_contiguous(4).unwrap();
        assert_eq!(run.addr() % (16 * 4096), 0);
        assert_eq!(f.total_free(), 2048 - 16);
        f.free_contiguous(run).unwrap();
        assert_eq!(f.total_free(), 2048);
    }

    /// Each CPU uses its own cache; a CPU number past the last is a kernel bug and
    /// panics (it used to be folded onto the last CPU's cache, hiding the bug).
    #[test]
    fn each_cpu_has_its_own_cache() {
        let f = frames(2, 256);
        let a = f.alloc(cpu_id(1)).unwrap();
        assert_eq!(f.stats(cpu_id(1)).refills, 1);
        assert_eq!(f.stats(cpu_id(0)).refills, 0);
        let b = f.try_alloc(cpu_id(1)).unwrap();
        f.free(cpu_id(1), a).unwrap();
        f.free(cpu_id(1), b).unwrap();
        assert_eq!(f.stats(cpu_id(1)).cached, BATCH);
        assert_eq!(f.stats(cpu_id(0)).cached, 0);
        assert_eq!(f.total_free(), 256);
    }

    #[test]
    #[should_panic]
    fn a_cpu_number_past_the_last_panics() {
        let _ = frames(2, 256).alloc(cpu_id(2));
    }

    /// With an empty cache, `try_alloc` takes one frame from the global allocator (no
    /// refill), and fails while the global allocator's lock is held.
    #[test]
    fn try_alloc_with_an_empty_cache_goes_to_the_global_allocator() {
        let f = frames(1, 100);
        {
            let _held = f.global.lock();
            assert_eq!(f.try_alloc(cpu_id(0)), Err(MmError::OutOfMemory));
        }
        let a = f.try_alloc(cpu_id(0)).unwrap();
        assert!(f.is_in_use(a));
        assert_eq!(
            f.stats(cpu_id(0)),
            CacheStats::default(),
            "no refill, no hit"
        );
        assert_eq!(f.global_free(), 99);
        // From a cache with frames: a hit, the last frame cached first.
        f.free(cpu_id(0), a).unwrap();
        assert_eq!(f.try_alloc(cpu_id(0)), Ok(a));
        assert_eq!((f.stats(cpu_id(0)).hits, f.stats(cpu_id(0)).cached), (1, 0));
        f.free(cpu_id(0), a).unwrap();
        assert_eq!(f.total_free(), 100);
    }

    /// When no aligned batch is left, a refill takes single frames, as many as there are.
    #[test]
    fn a_fragmented_allocator_refills_frame_by_frame() {
        let f = frames(1, 40);
        // Keep every other frame of the first 32-frame run out.
        let mut held = Vec::new();
        let mut all = Vec::new();
        for _ in 0..40 {
            all.push(f.alloc_contiguous(0).unwrap());
        }
        for (i, fr) in all.into_iter().enumerate() {
            if i % 2 == 0 {
                held.push(fr);
            } else {
                f.free_contiguous(fr).unwrap();
            }
        }
        assert_eq!(f.global_free(), 20);
        let first = f.alloc(cpu_id(0)).unwrap();
        assert_eq!(f.stats(cpu_id(0)).refills, 1);
        assert_eq!(
            f.stats(cpu_id(0)).cached,
            19,
            "all 20 single frames, one handed out"
        );
        assert_eq!(f.global_free(), 0);
        let mut got = vec![first];
        for _ in 0..19 {
            got.push(f.alloc(cpu_id(0)).unwrap());
        }
        assert_eq!(f.alloc(cpu_id(0)), Err(MmError::OutOfMemory));
        let distinct: HashSet<_> = got.iter().chain(&held).collect();
        assert_eq!(distinct.len(), 40);
        for fr in got.into_iter().chain(held) {
            f.free(cpu_id(0), fr).unwrap();
        }
        assert_eq!(f.total_free(), 40);
    }

    #[test]
    fn totals_bookkeeping_and_bulk_frees() {
        let f = frames(2, 256);
        assert_eq!(f.total_frames(), 256);
        assert_eq!(f.bookkeeping_entries(), 1, "one free run of 256 frames");
        let run = f.alloc_contiguous(3).unwrap();
        let entries = f.bookkeeping_entries();
        assert!(entries > 1, "split runs and one allocated run: {entries}");
        let mut frames: Vec<u64> = (0..8).map(|i| run.addr() + i * 4096).collect();
        frames.push(0x4000_0000);
        // Only the run's first frame frees it; the rest and the stranger are rejected.
        assert_eq!(f.free_many(&mut frames), 8);
        assert_eq!(f.total_free(), 256);
        assert_eq!(f.bookkeeping_entries(), 1);
        assert_eq!(f.total_frames(), 256);
    }
}
