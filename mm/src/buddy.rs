//! The buddy allocator: free runs of 2^order frames, `MAX_ORDER` at most.
//!
//! Free runs are kept per order in ordered sets of their start addresses. Allocation
//! takes the smallest free run that fits and splits it; freeing merges a run with its
//! buddy (the run its address differs from in bit `order + 12`) while that buddy is
//! free, inside the same source range. Invariants, checked by the tests: no frame is
//! handed out twice, the free count always equals the frames in the free sets, and a
//! workload that frees what it took returns the allocator to its initial state.
//!
//! Metadata lives on the kernel heap (one set entry per free run), not in the frames,
//! so this layer needs no unsafe code; allocated runs are tracked to reject a free of
//! something that was not allocated.
//!
//! `alloc_split` serves the per-CPU caches: one aligned run whose frames are then
//! freed one by one (on any CPU, in any order). It is recorded as one entry with a
//! bitmap of the frames still out, so a cache refill of 32 frames costs one run
//! allocation instead of 32, and each single free a lookup and a bit; the run merges
//! back when its last frame returns.

use alloc::collections::{BTreeMap, BTreeSet};

use crate::{MmError, PhysFrame, FRAME_SIZE};

/// Largest run: 2^10 frames = 4 MiB.
pub const MAX_ORDER: usize = 10;

/// Largest order `alloc_split` serves (its frames are tracked in a u64 bitmap).
pub const MAX_SPLIT_ORDER: usize = 6;

/// An allocated run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Allocated {
    /// Handed out whole; freed whole.
    Run(u8),
    /// Handed out as single frames (`alloc_split`): bit i set while frame i is out.
    Split { order: u8, out: u64 },
}

/// The global frame allocator.
pub struct BuddyAllocator {
    free: [BTreeSet<u64>; MAX_ORDER + 1],
    /// Allocated runs by start.
    allocated: BTreeMap<u64, Allocated>,
    /// The source ranges; buddies never merge across their edges.
    ranges: alloc::vec::Vec<(u64, u64)>,
    free_frames: u64,
    total_frames: u64,
}

impl Default for BuddyAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl BuddyAllocator {
    pub const fn new() -> Self {
        Self {
            free: [const { BTreeSet::new() }; MAX_ORDER + 1],
            allocated: BTreeMap::new(),
            ranges: alloc::vec::Vec::new(),
            free_frames: 0,
            total_frames: 0,
        }
    }

    /// Adds the free physical range `[start, end)` (rounded inward to frames).
    pub fn add_range(&mut self, start: u64, end: u64) {
        let start = start.div_ceil(FRAME_SIZE) * FRAME_SIZE;
        let end = end / FRAME_SIZE * FRAME_SIZE;
        if start >= end {
            return;
        }
        self.ranges.push((start, end));
        let mut at = start;
        while at < end {
            // The largest aligned run that starts at `at` and fits.
            let mut order = MAX_ORDER;
            loop {
                let size = FRAME_SIZE << order;
                if at.is_multiple_of(size) && at + size <= end {
                    break;
                }
                order -= 1;
            }
            self.free[order].insert(at);
            let frames = 1u64 << order;
            self.free_frames += frames;
            self.total_frames += frames;
            at += FRAME_SIZE << order;
        }
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free_frames
    }

    /// Frames ever added.
    pub fn total_frames(&self) -> u64 {
        self.total_frames
    }

    /// A run of 2^order physically contiguous frames, aligned to its size.
    pub fn alloc(&mut self, order: usize) -> Result<PhysFrame, MmError> {
        if order > MAX_ORDER {
            return Err(MmError::Invalid);
        }
        let from = (order..=MAX_ORDER)
            .find(|&o| !self.free[o].is_empty())
            .ok_or(MmError::OutOfMemory)?;
        let start = self.free[from].pop_first().ok_or(MmError::OutOfMemory)?;
        // Split down to the order asked for; the upper halves stay free.
        for o in (order..from).rev() {
            self.free[o].insert(start + (FRAME_SIZE << o));
        }
        self.free_frames -= 1 << order;
        self.allocated.insert(start, Allocated::Run(order as u8));
        Ok(PhysFrame(start))
    }

    /// A run of 2^order frames (order <= `MAX_SPLIT_ORDER`) whose frames the caller
    /// frees one at a time with `free`. Returns the first frame; the others follow.
    pub fn alloc_split(&mut self, order: usize) -> Result<PhysFrame, MmError> {
        if order > MAX_SPLIT_ORDER {
            return Err(MmError::Invalid);
        }
        let start = self.alloc(order)?;
        let out = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        self.allocated.insert(
            start.addr(),
            Allocated::Split {
                order: order as u8,
                out,
            },
        );
        Ok(start)
    }

    /// Frees a run `alloc` returned, or one frame of a run `alloc_split` returned,
    /// merging free runs with free buddies.
    pub fn free(&mut self, frame: PhysFrame) -> Result<(), MmError> {
        let addr = frame.addr();
        let (&start, entry) = self
            .allocated
            .range_mut(..=addr)
            .next_back()
            .ok_or(MmError::NotAllocated)?;
        let order = match *entry {
            Allocated::Run(order) if start == addr => {
                self.allocated.remove(&start);
                self.free_frames += 1 << order;
                order as usize
            }
            Allocated::Split { order, out } if addr < start + (FRAME_SIZE << order) => {
                let bit = 1u64 << ((addr - start) / FRAME_SIZE);
                if out & bit == 0 {
                    return Err(MmError::NotAllocated);
                }
                self.free_frames += 1;
                let out = out & !bit;
                if out != 0 {
                    // Updated in place: one tree search per single free.
                    *entry = Allocated::Split { order, out };
                    return Ok(());
                }
                // The last frame of the run is back: the run merges as a whole.
                self.allocated.remove(&start);
                order as usize
            }
            _ => return Err(MmError::NotAllocated),
        };
        self.merge(start, order)
    }

    /// Frees many frames at once (e.g. a heap shrink's): the same result as `free` on
    /// each, but frames of one split run cost one tree lookup together, not one each.
    /// Frames that were not allocated are skipped and counted; returns that count.
    pub fn free_many(&mut self, frames: &mut [u64]) -> usize {
        frames.sort_unstable();
        let mut rejected = 0;
        let mut i = 0;
        while i < frames.len() {
            let addr = frames[i];
            let entry = self
                .allocated
                .range(..=addr)
                .next_back()
                .map(|(&start, &entry)| (start, entry));
            match entry {
                Some((start, Allocated::Split { order, mut out }))
                    if addr < start + (FRAME_SIZE << order) =>
                {
                    // Every following frame of the same run, in one go.
                    let end = start + (FRAME_SIZE << order);
                    while i < frames.len() && frames[i] < end {
                        let bit = 1u64 << ((frames[i] - start) / FRAME_SIZE);
                        if out & bit == 0 || (i > 0 && frames[i - 1] == frames[i]) {
                            rejected += 1;
                        } else {
                            out &= !bit;
                            self.free_frames += 1;
                        }
                        i += 1;
                    }
                    if out != 0 {
                        self.allocated
                            .insert(start, Allocated::Split { order, out });
                    } else {
                        self.allocated.remove(&start);
                        if self.merge(start, order as usize).is_err() {
                            rejected += 1;
                        }
                    }
                }
                _ => {
                    if self.free(PhysFrame(addr)).is_err() {
                        rejected += 1;
                    }
                    i += 1;
                }
            }
        }
        rejected
    }

    /// Puts the free run `[start, start + 2^order frames)` back, merged with free buddies.
    fn merge(&mut self, start: u64, order: usize) -> Result<(), MmError> {
        let range = self
            .ranges
            .iter()
            .copied()
            .find(|&(s, e)| s <= start && start < e)
            .ok_or(MmError::NotAllocated)?;
        let mut start = start;
        let mut order = order;
        while order < MAX_ORDER {
            let size = FRAME_SIZE << order;
            let buddy = start ^ size;
            if buddy < range.0 || buddy + size > range.1 || !self.free[order].remove(&buddy) {
                break;
            }
            start = start.min(buddy);
            order += 1;
        }
        self.free[order].insert(start);
        Ok(())
    }

    /// The order of the run `alloc` handed out at `addr` (None if there is none: not
    /// allocated, or a frame of a split run).
    pub fn run_order(&self, addr: u64) -> Option<usize> {
        match self.allocated.get(&addr) {
            Some(&Allocated::Run(order)) => Some(order as usize),
            _ => None,
        }
    }

    /// Whether the frame at `addr` is handed out (inside an allocated run, or an
    /// out frame of a split run).
    pub fn is_allocated(&self, addr: u64) -> bool {
        match self.allocated.range(..=addr).next_back() {
            Some((&start, &Allocated::Run(order))) => addr < start + (FRAME_SIZE << order),
            Some((&start, &Allocated::Split { order, out })) => {
                addr < start + (FRAME_SIZE << order)
                    && out & (1u64 << ((addr - start) / FRAME_SIZE)) != 0
            }
            None => false,
        }
    }

    /// Entries of the bookkeeping on the kernel heap: free runs plus allocated runs.
    /// It grows with fragmentation (frames parked in caches, pools and slabs keep
    /// their runs split), which leak checks must tell from a leak.
    pub fn bookkeeping_entries(&self) -> usize {
        self.free.iter().map(BTreeSet::len).sum::<usize>() + self.allocated.len()
    }

    /// Free runs per order (for tests and statistics).
    pub fn free_runs(&self, order: usize) -> usize {
        self.free.get(order).map_or(0, BTreeSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn hands_out_every_frame_once_then_reports_exhaustion() {
        let mut b = BuddyAllocator::new();
        b.add_range(0x10_0000, 0x10_0000 + 300 * FRAME_SIZE);
        assert_eq!(b.free_frames(), 300);
        let mut seen = HashSet::new();
        for _ in 0..300 {
            let f = b.alloc(0).expect("frames left");
            assert!(seen.insert(f), "{f:?} handed out twice");
            assert!(f.addr() >= 0x10_0000 && f.addr() < 0x10_0000 + 300 * FRAME_SIZE);
        }
        assert_eq!(b.alloc(0), Err(MmError::OutOfMemory));
        assert_eq!(b.free_frames(), 0);
        for f in seen {
            b.free(f).unwrap();
        }
        assert_eq!(b.free_frames(), 300);
    }

    #[test]
    fn contiguous_runs_are_aligned_and_disjoint() {
        let mut b = BuddyAllocator::new();
        b.add_range(0, 64 << 20);
        let mut runs = Vec::new();
        for order in [0, 3, 5, 10, 1, 9] {
            let f = b.alloc(order).unwrap();
            let size = FRAME_SIZE << order;
            assert_eq!(f.addr() % size, 0, "order {order} run misaligned");
            for &(s, len) in &runs {
                assert!(f.addr() + size <= s || s + len <= f.addr(), "runs overlap");
            }
            runs.push((f.addr(), size));
        }
        assert_eq!(b.alloc(MAX_ORDER + 1), Err(MmError::Invalid));
    }

    #[test]
    fn freeing_everything_coalesces_back_to_the_initial_runs() {
        let mut b = BuddyAllocator::new();
        b.add_range(0x20_0000, 0x20_0000 + (8 << 20));
        let before: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        let mut frames: Vec<_> = (0..2048).map(|_| b.alloc(0).unwrap()).collect();
        // Free in an interleaved order so merges happen late.
        frames.sort_by_key(|f| (f.addr() / FRAME_SIZE) % 7);
        for f in frames {
            b.free(f).unwrap();
        }
        let after: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        assert_eq!(before, after, "free runs did not coalesce");
    }

    #[test]
    fn double_free_and_foreign_frames_are_rejected() {
        let mut b = BuddyAllocator::new();
        b.add_range(0, 1 << 20);
        let f = b.alloc(0).unwrap();
        b.free(f).unwrap();
        assert_eq!(b.free(f), Err(MmError::NotAllocated));
        assert_eq!(
            b.free(PhysFrame::from_addr(0x4000_0000).unwrap()),
            Err(MmError::NotAllocated)
        );
        assert_eq!(b.free_frames(), 256);
    }

    #[test]
    fn split_runs_come_back_frame_by_frame() {
        let mut b = BuddyAllocator::new();
        b.add_range(0x40_0000, 0x40_0000 + (4 << 20));
        let before: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        let total = b.free_frames();
        let runs: Vec<_> = (0..8).map(|_| b.alloc_split(5).unwrap()).collect();
        assert_eq!(b.free_frames(), total - 8 * 32);
        let mut frames: Vec<u64> = runs
            .iter()
            .flat_map(|r| (0..32).map(move |i| r.addr() + i * FRAME_SIZE))
            .collect();
        frames.sort_by_key(|a| (a / FRAME_SIZE) % 5);
        let (last, rest) = frames.split_last().unwrap();
        for &a in rest {
            b.free(PhysFrame(a)).unwrap();
        }
        // A frame of the run still partly out (the one `last` belongs to), again.
        let run_of_last = *last & !(32 * FRAME_SIZE - 1);
        let sibling = *rest
            .iter()
            .find(|&&a| a & !(32 * FRAME_SIZE - 1) == run_of_last)
            .unwrap();
        assert_eq!(
            b.free(PhysFrame(sibling)),
            Err(MmError::NotAllocated),
            "a split frame was freed twice"
        );
        b.free(PhysFrame(*last)).unwrap();
        assert_eq!(b.free_frames(), total);
        let after: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        assert_eq!(before, after, "split runs did not merge back");
        // A whole run cannot be freed by a frame inside it, nor a split run by a
        // frame past its end.
        let run = b.alloc(3).unwrap();
        assert_eq!(
            b.free(PhysFrame(run.addr() + FRAME_SIZE)),
            Err(MmError::NotAllocated)
        );
        let split = b.alloc_split(1).unwrap();
        assert_eq!(
            b.free(PhysFrame(split.addr() + 2 * FRAME_SIZE)),
            Err(MmError::NotAllocated)
        );
        assert_eq!(b.alloc_split(MAX_SPLIT_ORDER + 1), Err(MmError::Invalid));
    }

    #[test]
    fn free_many_is_free_of_each() {
        let mut a = BuddyAllocator::new();
        a.add_range(0x40_0000, 0x40_0000 + (4 << 20));
        let before: Vec<usize> = (0..=MAX_ORDER).map(|o| a.free_runs(o)).collect();
        let total = a.free_frames();
        let runs: Vec<_> = (0..6).map(|_| a.alloc_split(5).unwrap()).collect();
        let single = a.alloc(0).unwrap();
        let whole = a.alloc(2).unwrap();
        // Everything of four runs plus half of a fifth, the single frame, a duplicate,
        // and one frame never handed out.
        let mut frames: Vec<u64> = runs[..4]
            .iter()
            .flat_map(|r| (0..32).map(move |i| r.addr() + i * FRAME_SIZE))
            .chain((0..16).map(|i| runs[4].addr() + i * FRAME_SIZE))
            .chain([single.addr(), single.addr(), whole.addr() + FRAME_SIZE])
            .collect();
        frames.reverse();
        let rejected = a.free_many(&mut frames);
        assert_eq!(rejected, 2, "the duplicate and the foreign frame");
        assert_eq!(a.free_frames(), total - (16 + 32 + 4));
        // The rest, one by one: back to the start.
        for i in 16..32 {
            a.free(PhysFrame(runs[4].addr() + i * FRAME_SIZE)).unwrap();
        }
        for i in 0..32 {
            a.free(PhysFrame(runs[5].addr() + i * FRAME_SIZE)).unwrap();
        }
        assert_eq!(
            a.free(PhysFrame(runs[0].addr())),
            Err(MmError::NotAllocated)
        );
        a.free(whole).unwrap();
        assert_eq!(a.free_frames(), total);
        let after: Vec<usize> = (0..=MAX_ORDER).map(|o| a.free_runs(o)).collect();
        assert_eq!(before, after, "runs freed in bulk did not merge back");
    }

    #[test]
    fn buddies_never_merge_across_range_edges() {
        let mut b = BuddyAllocator::new();
        // Two adjacent-looking ranges with a hole: 0..1 MiB and 1 MiB + 4 KiB .. 2 MiB.
        b.add_range(0, 1 << 20);
        b.add_range((1 << 20) + FRAME_SIZE, 2 << 20);
        let total = b.free_frames();
        let frames: Vec<_> = (0..total).map(|_| b.alloc(0).unwrap()).collect();
        assert!(
            frames.iter().all(|f| f.addr() != 1 << 20),
            "the hole was handed out"
        );
        for f in frames {
            b.free(f).unwrap();
        }
        assert_eq!(b.free_frames(), total);
        // Nothing of order 9 (2 MiB) may exist: no aligned 2 MiB run is wholly free.
        assert_eq!(b.free_runs(9), 0);
    }

    /// Ranges are rounded inward to whole frames; empty and inverted ones add nothing.
    #[test]
    fn ranges_are_rounded_inward_and_counted() {
        let mut b = BuddyAllocator::new();
        b.add_range(0x5000, 0x5000);
        b.add_range(0x9000, 0x8000);
        b.add_range(0x1001, 0x1fff);
        assert_eq!((b.total_frames(), b.free_frames()), (0, 0));
        b.add_range(0x1001, 0x5fff);
        assert_eq!((b.total_frames(), b.free_frames()), (3, 3));
        let frames: Vec<u64> = (0..3).map(|_| b.alloc(0).unwrap().addr()).collect();
        assert_eq!(frames.iter().min(), Some(&0x2000));
        assert_eq!(frames.iter().max(), Some(&0x4000));
        assert_eq!((b.total_frames(), b.free_frames()), (3, 0));
        assert_eq!(b.alloc(0), Err(MmError::OutOfMemory));
    }

    /// The largest split run (64 frames, a full bitmap) comes back frame by frame, and
    /// frames just past a split run are not taken for its own.
    #[test]
    fn the_largest_split_run_and_frames_past_split_runs() {
        let mut b = BuddyAllocator::new();
        b.add_range(0, 4 << 20);
        let total = b.free_frames();
        let run = b.alloc_split(MAX_SPLIT_ORDER).unwrap().addr();
        assert_eq!(run % (64 * FRAME_SIZE), 0);
        assert_eq!(b.free_frames(), total - 64);
        for i in 0..64 {
            assert!(b.is_allocated(run + i * FRAME_SIZE), "frame {i} of the run");
        }
        for past in [64, 65, 100, 1000] {
            let addr = run + past * FRAME_SIZE;
            assert!(!b.is_allocated(addr));
            assert_eq!(b.free(PhysFrame(addr)), Err(MmError::NotAllocated));
            let mut one = [addr];
            assert_eq!(b.free_many(&mut one), 1);
        }
        for i in (0..64).rev() {
            b.free(PhysFrame(run + i * FRAME_SIZE)).unwrap();
            assert!(!b.is_allocated(run + i * FRAME_SIZE));
        }
        assert_eq!(b.free_frames(), total);
        assert_eq!(b.free_runs(MAX_ORDER), 1, "the run merged back whole");
        assert_eq!(b.bookkeeping_entries(), 1);
    }

    /// The allocator against a plain model (a map of every frame's owner) under a long
    /// random workload of `alloc`, `alloc_split`, `free` and `free_many`, on two ranges
    /// with unaligned ends and a one-frame hole between them. After every step: the
    /// counts, `is_allocated` of every frame, the bookkeeping, and the buddy promise
    /// that a request fails only if no aligned block of that size is free.
    #[test]
    fn a_random_workload_matches_a_plain_model() {
        const BASE: u64 = 0x100_0000;
        let ranges = [
            (BASE + 3 * FRAME_SIZE, BASE + 700 * FRAME_SIZE),
            (BASE + 701 * FRAME_SIZE, BASE + 1100 * FRAME_SIZE),
        ];
        let mut b = BuddyAllocator::new();
        for (s, e) in ranges {
            b.add_range(s, e);
        }
        let total = 697 + 399;
        assert_eq!((b.total_frames(), b.free_frames()), (total, total));
        let initial: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        // Whole runs: start -> frames. Split runs: start -> frames still out.
        let mut whole: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut split: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> =
            Default::default();
        let frame_of = |i: u64| BASE + i * FRAME_SIZE;
        let in_use = |whole: &std::collections::BTreeMap<u64, u64>,
                      split: &std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>>,
                      a: u64| {
            whole
                .range(..=a)
                .next_back()
                .is_some_and(|(&s, &n)| a < s + n * FRAME_SIZE)
                || split.values().any(|out| out.contains(&a))
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..3000 {
            match next() % 8 {
                0..=2 => {
                    let split_it = next() % 2 == 0;
                    let order = (next() % if split_it { 8 } else { 12 }) as usize;
                    let got = if split_it {
                        b.alloc_split(order)
                    } else {
                        b.alloc(order)
                    };
                    let limit = if split_it { MAX_SPLIT_ORDER } else { MAX_ORDER };
                    if order > limit {
                        assert_eq!(got, Err(MmError::Invalid), "step {step}");
                        continue;
                    }
                    let frames = 1u64 << order;
                    let size = frames * FRAME_SIZE;
                    // Whether some aligned block of this size is wholly free.
                    let fits = ranges.iter().any(|&(s, e)| {
                        (s.div_ceil(size) * size..e)
                            .step_by(size as usize)
                            .any(|at| {
                                at + size <= e
                                    && (0..frames)
                                        .all(|i| !in_use(&whole, &split, at + i * FRAME_SIZE))
                            })
                    });
                    match got {
                        Ok(f) => {
                            let at = f.addr();
                            assert_eq!(at % size, 0, "step {step}: misaligned");
                            assert!(ranges.iter().any(|&(s, e)| s <= at && at + size <= e));
                            for i in 0..frames {
                                assert!(
                                    !in_use(&whole, &split, at + i * FRAME_SIZE),
                                    "step {step}: handed out twice"
                                );
                            }
                            if split_it {
                                split
                                    .insert(at, (0..frames).map(|i| at + i * FRAME_SIZE).collect());
                            } else {
                                whole.insert(at, frames);
                            }
                        }
                        Err(e) => {
                            assert_eq!(e, MmError::OutOfMemory);
                            assert!(
                                !fits,
                                "step {step}: order {order} refused with a free block"
                            );
                        }
                    }
                }
                3..=5 => {
                    // Free something handed out (or, one time in four, anything).
                    let addr = if next() % 4 == 0 || (whole.is_empty() && split.is_empty()) {
                        frame_of(next() % 1104)
                    } else if next() % 2 == 0 && !whole.is_empty() {
                        *whole
                            .keys()
                            .nth((next() % whole.len() as u64) as usize)
                            .unwrap()
                    } else if let Some(out) = split
                        .values()
                        .nth((next() % split.len().max(1) as u64) as usize)
                    {
                        *out.iter()
                            .nth((next() % out.len() as u64) as usize)
                            .unwrap()
                    } else {
                        frame_of(next() % 1104)
                    };
                    let valid =
                        whole.contains_key(&addr) || split.values().any(|o| o.contains(&addr));
                    let got = b.free(PhysFrame(addr));
                    assert_eq!(got.is_ok(), valid, "step {step}: free {addr:#x}");
                    whole.remove(&addr);
                    split.retain(|_, out| {
                        out.remove(&addr);
                        !out.is_empty()
                    });
                }
                _ => {
                    // A batch: split frames, whole runs, duplicates and strangers.
                    let mut batch = Vec::new();
                    for _ in 0..next() % 40 {
                        let pick = next();
                        let addr = match pick % 5 {
                            0 => frame_of(next() % 1104),
                            1 if !whole.is_empty() => *whole
                                .keys()
                                .nth((next() % whole.len() as u64) as usize)
                                .unwrap(),
                            _ if !split.is_empty() => {
                                let out = split
                                    .values()
                                    .nth((next() % split.len() as u64) as usize)
                                    .unwrap();
                                *out.iter()
                                    .nth((next() % out.len() as u64) as usize)
                                    .unwrap()
                            }
                            _ => frame_of(next() % 1104),
                        };
                        batch.push(addr);
                        if pick % 7 == 0 {
                            batch.push(addr);
                        }
                    }
                    let mut distinct = batch.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    let valid = distinct
                        .iter()
                        .filter(|a| whole.contains_key(a) || split.values().any(|o| o.contains(a)))
                        .count();
                    let rejected = b.free_many(&mut batch);
                    assert_eq!(rejected, batch.len() - valid, "step {step}: free_many");
                    for a in distinct {
                        whole.remove(&a);
                        split.retain(|_, out| {
                            out.remove(&a);
                            !out.is_empty()
                        });
                    }
                }
            }
            let out: u64 =
                whole.values().sum::<u64>() + split.values().map(|o| o.len() as u64).sum::<u64>();
            assert_eq!(b.free_frames(), total - out, "step {step}: free count");
            assert_eq!(b.total_frames(), total);
            let runs: usize = (0..=MAX_ORDER).map(|o| b.free_runs(o)).sum();
            assert_eq!(
                b.bookkeeping_entries(),
                runs + whole.len() + split.len(),
                "step {step}: bookkeeping"
            );
            if step % 50 == 0 {
                for i in 0..1104 {
                    let a = frame_of(i);
                    assert_eq!(
                        b.is_allocated(a),
                        in_use(&whole, &split, a),
                        "step {step}: frame {i}"
                    );
                }
            }
        }
        for (&s, _) in whole.iter() {
            b.free(PhysFrame(s)).unwrap();
        }
        for out in split.values() {
            for &a in out {
                b.free(PhysFrame(a)).unwrap();
            }
        }
        assert_eq!(b.free_frames(), total);
        let after: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        assert_eq!(after, initial, "everything freed, but not merged back");
        assert_eq!(b.free_runs(MAX_ORDER + 1), 0);
    }

    /// Two ranges that touch stay two: a run of one never merges with its buddy in the
    /// other, even when both are free.
    #[test]
    fn touching_ranges_never_merge() {
        let mut b = BuddyAllocator::new();
        // [0, 12 KiB) is an 8 KiB run and a 4 KiB one; [12 KiB, 16 KiB) one 4 KiB run
        // whose buddy (8 KiB) lies in the first range.
        b.add_range(0, 3 * FRAME_SIZE);
        b.add_range(3 * FRAME_SIZE, 4 * FRAME_SIZE);
        let before: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        assert_eq!(before[..3], [2, 1, 0]);
        let frames: Vec<_> = (0..4).map(|_| b.alloc(0).unwrap()).collect();
        for f in frames {
            b.free(f).unwrap();
        }
        let after: Vec<usize> = (0..=MAX_ORDER).map(|o| b.free_runs(o)).collect();
        assert_eq!(after, before, "runs merged across the ranges' common edge");
        assert_eq!(b.alloc(2), Err(MmError::OutOfMemory));
    }
}
