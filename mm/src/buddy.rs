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

use alloc::collections::{BTreeMap, BTreeSet};

use crate::{MmError, PhysFrame, FRAME_SIZE};

/// Largest run: 2^10 frames = 4 MiB.
pub const MAX_ORDER: usize = 10;

/// The global frame allocator.
pub struct BuddyAllocator {
    free: [BTreeSet<u64>; MAX_ORDER + 1],
    /// Allocated runs: start -> order.
    allocated: BTreeMap<u64, u8>,
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
        self.allocated.insert(start, order as u8);
        Ok(PhysFrame(start))
    }

    /// Frees a run `alloc` returned, merging it with free buddies.
    pub fn free(&mut self, frame: PhysFrame) -> Result<(), MmError> {
        let order = self
            .allocated
            .remove(&frame.addr())
            .ok_or(MmError::NotAllocated)? as usize;
        self.free_frames += 1 << order;
        let range = self
            .ranges
            .iter()
            .copied()
            .find(|&(s, e)| s <= frame.addr() && frame.addr() < e)
            .ok_or(MmError::NotAllocated)?;
        let mut start = frame.addr();
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
}
