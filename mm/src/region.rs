//! The user address space's regions, as bookkeeping: which addresses are valid, with
//! what rights, and what a fault at an address means. No page tables here: the kernel
//! applies the decisions (map a zeroed frame, unmap, end the process).
//!
//! Regions come from `panda-abi`: ELF segments in `[ELF_LOAD_BASE, HEAP_BASE)`, the heap
//! `[HEAP_BASE, break)` with the break movable within `[HEAP_BASE, HEAP_LIMIT]`, buffers
//! allocated page by page inside the buffer region, and the stack
//! `[STACK_BASE, STACK_BASE + STACK_MAX_SIZE)` with an unmapped guard page below it.
//!
//! A range that shrinking the heap or freeing a buffer takes out of the layout is
//! *retiring* until the kernel has unmapped it and every CPU has flushed its
//! translations: invalid for faults at once, but not handed out again (no buffer there,
//! no heap growth over it) until the caller passes its `Retiring` back to
//! `Regions::retired`. So the kernel need not hold a lock across the shootdown's wait
//! to keep a new mapping out of a range whose old one is still being torn down.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use panda_abi::{
    page_ceil, page_floor, BUFFER_BASE, BUFFER_MAX_SIZE, ELF_LOAD_BASE, HEAP_BASE, HEAP_LIMIT,
    STACK_BASE, STACK_GUARD, STACK_MAX_SIZE,
};

use crate::MmError;

/// Access rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rights {
    pub write: bool,
    pub execute: bool,
}

/// What a fault asked for (the ABI's one `Access`, from trap decoding to this check).
pub use panda_abi::Access;

/// What the fault path must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultDecision {
    /// A valid, not yet backed page of a demand-zero region: map a zeroed frame with
    /// these rights.
    DemandZero(Rights),
    /// The address is valid but the access is not allowed (write to read-only,
    /// execute of non-executable).
    ProtectionViolation,
    /// The stack's guard page: the stack grew past 16 MiB.
    StackOverflow,
    /// No region contains the address.
    OutsideRegions,
}

/// An ELF segment as mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    pub rights: Rights,
}

/// A range taken out of the layout whose old pages may still be mapped or cached:
/// the kernel unmaps `[start, end)`, shoots it down, then hands this back to
/// `Regions::retired`. Until then nothing new is placed there.
#[must_use = "a retiring range is never reused until it is passed to `Regions::retired`"]
#[derive(Debug, PartialEq, Eq)]
pub struct Retiring {
    start: u64,
    end: u64,
    buffer: bool,
}

impl Retiring {
    /// The page range to unmap, `[start, end)`.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

/// A buffer's bookkeeping: its end, and whether it is live (or retiring).
#[derive(Clone, Copy, Debug)]
struct Buffer {
    end: u64,
    live: bool,
}

/// A user address space's regions.
pub struct Regions {
    segments: Vec<Segment>,
    brk: u64,
    /// Heap ranges released by shrinking and not yet retired.
    heap_retiring: Vec<(u64, u64)>,
    /// Buffers, live and retiring: start -> end.
    buffers: BTreeMap<u64, Buffer>,
    /// No page below this address in the buffer region is free: the first-fit search
    /// starts here, so allocating buffer after buffer is not quadratic.
    packed_below: u64,
}

/// Most buffers (live or retiring) one address space may have.
pub const MAX_BUFFERS: usize = 65536;

impl Default for Regions {
    fn default() -> Self {
        Self::new()
    }
}

impl Regions {
    /// No segments, an empty heap, no buffers, the stack region.
    pub fn new() -> Self {
        Self {
            segments: Vec::new(),
            brk: HEAP_BASE as u64,
            heap_retiring: Vec::new(),
            buffers: BTreeMap::new(),
            packed_below: BUFFER_BASE as u64,
        }
    }

    /// Adds an ELF segment `[start, end)` (page-rounded outward). Refused: outside the
    /// ELF region, overlapping another segment, writable and executable.
    pub fn add_segment(
        &mut self,
        start: u64,
        end: u64,
        rights: Rights,
    ) -> Result<Segment, MmError> {
        if rights.write && rights.execute {
            return Err(MmError::Invalid);
        }
        let (start, end) = (page_floor(start), page_ceil(end));
        if start >= end || start < ELF_LOAD_BASE as u64 || end > HEAP_BASE as u64 {
            return Err(MmError::Invalid);
        }
        if self.segments.iter().any(|s| start < s.end && s.start < end) {
            return Err(MmError::Invalid);
        }
        let segment = Segment { start, end, rights };
        self.segments.push(segment);
        Ok(segment)
    }

    /// Changes the rights of the segment starting at `start` (never to W+X). Returns
    /// its range, whose mapped pages the caller updates and shoots down.
    pub fn protect_segment(&mut self, start: u64, rights: Rights) -> Result<(u64, u64), MmError> {
        if rights.write && rights.execute {
            return Err(MmError::Invalid);
        }
        let segment = self
            .segments
            .iter_mut()
            .find(|s| s.start == start)
            .ok_or(MmError::NotAllocated)?;
        segment.rights = rights;
        Ok((segment.start, segment.end))
    }

    /// The current break.
    pub fn brk(&self) -> u64 {
        self.brk
    }

    /// Moves the break to `new` (any byte address in `[HEAP_BASE, HEAP_LIMIT]`). Returns
    /// the page range that shrinking released (to unmap, shoot down and retire): only
    /// pages wholly above the new break, so the page holding it keeps its data. An
    /// out-of-range request leaves the break unchanged; growing over a range that is
    /// still retiring is `Busy` (try again once it is retired).
    pub fn set_brk(&mut self, new: u64) -> Result<Option<Retiring>, MmError> {
        if new < HEAP_BASE as u64 || new > HEAP_LIMIT as u64 {
            return Err(MmError::Invalid);
        }
        let (new_end, old_end) = (page_ceil(new), page_ceil(self.brk));
        if self
            .heap_retiring
            .iter()
            .any(|&(s, e)| old_end < e && s < new_end)
        {
            return Err(MmError::Busy);
        }
        self.brk = new;
        if new_end >= old_end {
            return Ok(None);
        }
        self.heap_retiring.push((new_end, old_end));
        Ok(Some(Retiring {
            start: new_end,
            end: old_end,
            buffer: false,
        }))
    }

    /// The range of `retiring` is unmapped and flushed everywhere: it may be handed
    /// out again.
    pub fn retired(&mut self, retiring: Retiring) {
        let Retiring { start, end, buffer } = retiring;
        if buffer {
            if self.buffers.get(&start).is_some_and(|b| !b.live) {
                self.buffers.remove(&start);
                self.packed_below = self.packed_below.min(start);
            }
        } else if let Some(i) = self.heap_retiring.iter().position(|&r| r == (start, end)) {
            self.heap_retiring.swap_remove(i);
        }
    }

    /// Allocates a buffer of `size` bytes (page-rounded) in the buffer region, first
    /// fit. Returns its start. At most `MAX_BUFFERS` live buffers (their bookkeeping is
    /// kernel memory): past that, `OutOfMemory`.
    pub fn alloc_buffer(&mut self, size: u64) -> Result<u64, MmError> {
        if size == 0 || size > BUFFER_MAX_SIZE as u64 {
            return Err(MmError::Invalid);
        }
        if self.buffers.len() >= MAX_BUFFERS {
            return Err(MmError::OutOfMemory);
        }
        let size = page_ceil(size);
        let limit = (BUFFER_BASE + BUFFER_MAX_SIZE) as u64;
        // Every buffer below `packed_below` ends at or below it (they are packed).
        let mut cursor = self.packed_below;
        let mut packed = true;
        for (&start, b) in self.buffers.range(self.packed_below..) {
            if start - cursor >= size {
                break;
            }
            // A gap too small for this buffer stays free below the new one.
            packed &= start == cursor;
            cursor = b.end;
        }
        if limit - cursor < size {
            return Err(MmError::OutOfMemory);
        }
        self.buffers.insert(
            cursor,
            Buffer {
                end: cursor + size,
                live: true,
            },
        );
        if packed {
            self.packed_below = cursor + size;
        }
        Ok(cursor)
    }

    /// Frees the buffer starting at `start`: it is invalid at once and retiring (its
    /// range is returned to unmap, shoot down and retire). Anything but the start of a
    /// live buffer is an error (so no double free).
    pub fn free_buffer(&mut self, start: u64) -> Result<Retiring, MmError> {
        let b = self
            .buffers
            .get_mut(&start)
            .filter(|b| b.live)
            .ok_or(MmError::NotAllocated)?;
        b.live = false;
        Ok(Retiring {
            start,
            end: b.end,
            buffer: true,
        })
    }

    /// Live buffers.
    pub fn buffers(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buffers
            .iter()
            .filter(|(_, b)| b.live)
            .map(|(&s, b)| (s, b.end))
    }

    /// What a fault at `addr` with `access` means.
    pub fn classify(&self, addr: u64, access: Access) -> FaultDecision {
        let allowed = |r: Rights| match access {
            Access::Read => true,
            Access::Write => r.write,
            Access::Execute => r.execute,
        };
        let data = Rights {
            write: true,
            execute: false,
        };
        let region = if let Some(s) = self
            .segments
            .iter()
            .find(|s| s.start <= addr && addr < s.end)
        {
            Some(s.rights)
        } else if (HEAP_BASE as u64..page_ceil(self.brk)).contains(&addr)
            || self
                .buffers
                .range(..=addr)
                .next_back()
                .is_some_and(|(_, b)| b.live && addr < b.end)
            || (STACK_BASE as u64..(STACK_BASE + STACK_MAX_SIZE) as u64).contains(&addr)
        {
            Some(data)
        } else {
            None
        };
        match region {
            Some(rights) if allowed(rights) => FaultDecision::DemandZero(rights),
            Some(_) => FaultDecision::ProtectionViolation,
            None if (STACK_GUARD.start as u64..STACK_GUARD.end as u64).contains(&addr) => {
                FaultDecision::StackOverflow
            }
            None => FaultDecision::OutsideRegions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = panda_abi::PAGE_SIZE as u64;

    const RX: Rights = Rights {
        write: false,
        execute: true,
    };
    const RW: Rights = Rights {
        write: true,
        execute: false,
    };

    /// The range a brk call released, if any (left retiring).
    fn released(r: Result<Option<Retiring>, MmError>) -> Result<Option<(u64, u64)>, MmError> {
        r.map(|x| x.map(|x| x.range()))
    }

    /// Frees a buffer and retires it at once (as after an instant shootdown).
    fn free(r: &mut Regions, start: u64) -> Result<(u64, u64), MmError> {
        let retiring = r.free_buffer(start)?;
        let range = retiring.range();
        r.retired(retiring);
        Ok(range)
    }

    #[test]
    fn buffer_first_fit_matches_a_plain_scan_under_random_churn() {
        // The reference: first fit by scanning every buffer from the region's start.
        fn reference(live: &BTreeMap<u64, u64>, size: u64) -> Option<u64> {
            let mut cursor = BUFFER_BASE as u64;
            for (&s, &e) in live {
                if s - cursor >= size {
                    break;
                }
                cursor = e;
            }
            ((BUFFER_BASE + BUFFER_MAX_SIZE) as u64 - cursor >= size).then_some(cursor)
        }
        let mut r = Regions::new();
        let mut model = BTreeMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) && !model.is_empty() {
                let k = *model.keys().nth((x >> 8) as usize % model.len()).unwrap();
                model.remove(&k);
                free(&mut r, k).unwrap();
            } else {
                let size = ((x >> 20) % 8 + 1) * 4096;
                let want = reference(&model, size);
                assert_eq!(r.alloc_buffer(size).ok(), want);
                if let Some(at) = want {
                    model.insert(at, at + size);
                }
            }
        }
    }

    #[test]
    fn buffers_are_limited_in_number_not_only_in_space() {
        let mut r = Regions::new();
        for _ in 0..MAX_BUFFERS {
            r.alloc_buffer(4096).unwrap();
        }
        assert_eq!(r.alloc_buffer(4096), Err(MmError::OutOfMemory));
        let first = r.buffers().next().unwrap().0;
        free(&mut r, first).unwrap();
        assert_eq!(r.alloc_buffer(4096), Ok(first));
    }

    #[test]
    fn segments_are_checked() {
        let mut r = Regions::new();
        let base = ELF_LOAD_BASE as u64;
        assert!(r.add_segment(base, base + 0x1800, RX).is_ok());
        assert_eq!(
            r.add_segment(base + 0x1000, base + 0x3000, RW),
            Err(MmError::Invalid),
            "overlap"
        );
        assert_eq!(
            r.add_segment(
                base + 0x4000,
                base + 0x5000,
                Rights {
                    write: true,
                    execute: true
                }
            ),
            Err(MmError::Invalid),
            "W+X"
        );
        assert_eq!(
            r.add_segment(0x1000, 0x2000, RW),
            Err(MmError::Invalid),
            "below the ELF region"
        );
        assert_eq!(
            r.add_segment(HEAP_BASE as u64 - 0x1000, HEAP_BASE as u64 + 0x1000, RW),
            Err(MmError::Invalid)
        );
        assert!(r.add_segment(base + 0x2000, base + 0x3000, RW).is_ok());
    }

    #[test]
    fn protecting_a_segment_changes_its_verdicts_and_refuses_w_x() {
        let mut r = Regions::new();
        let base = ELF_LOAD_BASE as u64;
        r.add_segment(base, base + 0x2000, RW).unwrap();
        assert_eq!(
            r.protect_segment(
                base,
                Rights {
                    write: true,
                    execute: true
                }
            ),
            Err(MmError::Invalid)
        );
        assert_eq!(
            r.protect_segment(base + 0x1000, RX),
            Err(MmError::NotAllocated),
            "not a segment start"
        );
        assert_eq!(r.protect_segment(base, RX), Ok((base, base + 0x2000)));
        assert_eq!(
            r.classify(base, Access::Write),
            FaultDecision::ProtectionViolation
        );
        assert_eq!(
            r.classify(base, Access::Execute),
            FaultDecision::DemandZero(RX)
        );
    }

    #[test]
    fn brk_limits_leave_the_break_unchanged() {
        let mut r = Regions::new();
        assert_eq!(
            released(r.set_brk(HEAP_BASE as u64 - 1)),
            Err(MmError::Invalid)
        );
        assert_eq!(
            released(r.set_brk(HEAP_LIMIT as u64 + 1)),
            Err(MmError::Invalid)
        );
        assert_eq!(
            released(r.set_brk(BUFFER_BASE as u64 + 0x1000)),
            Err(MmError::Invalid),
            "into the buffer region"
        );
        assert_eq!(r.brk(), HEAP_BASE as u64);
        assert_eq!(
            released(r.set_brk(HEAP_LIMIT as u64)),
            Ok(None),
            "the full 1020 GiB is allowed"
        );
    }

    #[test]
    fn shrinking_releases_only_whole_pages_above_the_break() {
        let mut r = Regions::new();
        let h = HEAP_BASE as u64;
        assert_eq!(released(r.set_brk(h + 0x5000)), Ok(None));
        // Unaligned shrink: the page holding the new break stays.
        assert_eq!(
            released(r.set_brk(h + 0x1800)),
            Ok(Some((h + 0x2000, h + 0x5000)))
        );
        assert_eq!(
            r.classify(h + 0x1fff, Access::Write),
            FaultDecision::DemandZero(RW)
        );
        assert_eq!(
            r.classify(h + 0x2000, Access::Read),
            FaultDecision::OutsideRegions
        );
        assert_eq!(
            released(r.set_brk(h + 0x1900)),
            Ok(None),
            "growing within a page releases nothing"
        );
        assert_eq!(released(r.set_brk(h)), Ok(Some((h, h + 0x2000))));
    }

    /// A shrink's range stays out of use until it is retired: the heap cannot grow over
    /// it (`Busy`, break unchanged), only up to it; faults there are outside.
    #[test]
    fn a_retiring_heap_range_is_not_reused_until_retired() {
        let mut r = Regions::new();
        let h = HEAP_BASE as u64;
        r.set_brk(h + 0x8000).unwrap();
        let top = r.set_brk(h + 0x6000).unwrap().unwrap();
        let low = r.set_brk(h + 0x2000).unwrap().unwrap();
        assert_eq!(
            (low.range(), top.range()),
            ((h + 0x2000, h + 0x6000), (h + 0x6000, h + 0x8000))
        );
        assert_eq!(
            r.classify(h + 0x2000, Access::Read),
            FaultDecision::OutsideRegions
        );
        assert_eq!(
            r.set_brk(h + 0x2001),
            Err(MmError::Busy),
            "over the lower range"
        );
        assert_eq!(r.brk(), h + 0x2000, "a refused grow leaves the break");
        assert_eq!(
            released(r.set_brk(h + 0x1800)),
            Ok(None),
            "within the kept page"
        );
        r.retired(low);
        assert_eq!(
            released(r.set_brk(h + 0x6000)),
            Ok(None),
            "up to the upper range"
        );
        assert_eq!(
            r.set_brk(h + 0x6001),
            Err(MmError::Busy),
            "over the upper range"
        );
        r.retired(top);
        assert_eq!(released(r.set_brk(h + 0x9000)), Ok(None));
        assert_eq!(
            r.classify(h + 0x8fff, Access::Write),
            FaultDecision::DemandZero(RW)
        );
    }

    /// A freed buffer is invalid at once, cannot be freed twice, and its space is not
    /// handed out again until it is retired.
    #[test]
    fn a_retiring_buffer_is_not_reused_until_retired() {
        let mut r = Regions::new();
        let a = r.alloc_buffer(PAGE).unwrap();
        let b = r.alloc_buffer(PAGE).unwrap();
        let retiring = r.free_buffer(a).unwrap();
        assert_eq!(retiring.range(), (a, a + PAGE));
        assert_eq!(r.classify(a, Access::Read), FaultDecision::OutsideRegions);
        assert_eq!(r.free_buffer(a), Err(MmError::NotAllocated), "double free");
        assert_eq!(r.buffers().collect::<Vec<_>>(), vec![(b, b + PAGE)]);
        let c = r.alloc_buffer(PAGE).unwrap();
        assert!(c != a && c != b, "a retiring buffer's space was reused");
        r.retired(retiring);
        assert_eq!(r.alloc_buffer(PAGE), Ok(a), "reused once retired");
    }

    #[test]
    fn buffers_never_overlap_and_reuse_freed_space() {
        let mut r = Regions::new();
        let a = r.alloc_buffer(1).unwrap();
        let b = r.alloc_buffer(3 * PAGE).unwrap();
        let c = r.alloc_buffer(PAGE + 1).unwrap();
        assert_eq!(a, BUFFER_BASE as u64);
        assert_eq!(b, a + PAGE);
        assert_eq!(c, b + 3 * PAGE);
        assert_eq!(free(&mut r, b), Ok((b, b + 3 * PAGE)));
        assert_eq!(r.free_buffer(b), Err(MmError::NotAllocated), "double free");
        assert_eq!(
            free(&mut r, a + 1),
            Err(MmError::NotAllocated),
            "not a start"
        );
        // First fit: a 2-page buffer reuses b's hole.
        assert_eq!(r.alloc_buffer(2 * PAGE), Ok(b));
        let spans: Vec<_> = r.buffers().collect();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "buffers overlap: {spans:?}");
        }
    }

    #[test]
    fn the_buffer_region_fills_up_and_says_so() {
        let mut r = Regions::new();
        assert_eq!(r.alloc_buffer(0), Err(MmError::Invalid));
        assert_eq!(
            r.alloc_buffer(BUFFER_MAX_SIZE as u64 + 1),
            Err(MmError::Invalid)
        );
        let all = r.alloc_buffer(BUFFER_MAX_SIZE as u64).unwrap();
        assert_eq!(r.alloc_buffer(PAGE), Err(MmError::OutOfMemory));
        free(&mut r, all).unwrap();
        assert!(r.alloc_buffer(PAGE).is_ok());
    }

    #[test]
    fn classify_regions() {
        let mut r = Regions::new();
        let base = ELF_LOAD_BASE as u64;
        r.add_segment(base, base + 0x1000, RX).unwrap();
        r.add_segment(base + 0x1000, base + 0x2000, RW).unwrap();
        r.set_brk(HEAP_BASE as u64 + 10).unwrap();
        let buf = r.alloc_buffer(PAGE).unwrap();
        let top = (STACK_BASE + STACK_MAX_SIZE) as u64;
        use FaultDecision::*;
        assert_eq!(r.classify(base, Access::Execute), DemandZero(RX));
        assert_eq!(r.classify(base, Access::Write), ProtectionViolation);
        assert_eq!(
            r.classify(base + 0x1000, Access::Execute),
            ProtectionViolation
        );
        assert_eq!(r.classify(HEAP_BASE as u64, Access::Write), DemandZero(RW));
        assert_eq!(
            r.classify(HEAP_BASE as u64, Access::Execute),
            ProtectionViolation,
            "jumping into the heap"
        );
        assert_eq!(r.classify(buf, Access::Write), DemandZero(RW));
        assert_eq!(r.classify(buf + PAGE, Access::Read), OutsideRegions);
        assert_eq!(r.classify(top - 8, Access::Write), DemandZero(RW));
        assert_eq!(
            r.classify(STACK_BASE as u64, Access::Write),
            DemandZero(RW),
            "the 16th MiB"
        );
        assert_eq!(
            r.classify(STACK_BASE as u64 - 8, Access::Write),
            StackOverflow
        );
        assert_eq!(r.classify(0, Access::Read), OutsideRegions, "null");
        assert_eq!(
            r.classify(0x0000_8000_0000_0000, Access::Read),
            OutsideRegions,
            "non-canonical"
        );
    }

    /// Segments are rounded outward to pages, may touch each other and both ends of
    /// the ELF region, and are refused when they would share a page, from either side.
    #[test]
    fn segment_edges() {
        let mut r = Regions::new();
        let base = ELF_LOAD_BASE as u64;
        let heap = HEAP_BASE as u64;
        assert_eq!(
            r.add_segment(base + 0x3123, base + 0x4456, RX),
            Ok(Segment {
                start: base + 0x3000,
                end: base + 0x5000,
                rights: RX
            })
        );
        // Ending exactly where another starts, and starting exactly where it ends.
        assert!(r.add_segment(base + 0x2000, base + 0x3000, RW).is_ok());
        assert!(r.add_segment(base + 0x5000, base + 0x6000, RW).is_ok());
        assert_eq!(
            r.add_segment(base + 0x1800, base + 0x2001, RW),
            Err(MmError::Invalid)
        );
        assert_eq!(
            r.add_segment(base + 0x5fff, base + 0x7000, RW),
            Err(MmError::Invalid)
        );
        // The region's very ends.
        assert!(r.add_segment(base, base + 0x1000, RW).is_ok());
        assert!(r.add_segment(heap - 0x1000, heap, RW).is_ok());
        assert_eq!(
            r.add_segment(base - 1, base + 0x10, RW),
            Err(MmError::Invalid)
        );
        assert_eq!(
            r.add_segment(heap - 0x2000, heap + 1, RW),
            Err(MmError::Invalid)
        );
        // Empty, and inverted.
        assert_eq!(
            r.add_segment(base + 0x9000, base + 0x9000, RW),
            Err(MmError::Invalid)
        );
        assert_eq!(
            r.add_segment(base + 0xa000, base + 0x9000, RW),
            Err(MmError::Invalid)
        );
        // Write-only and execute-only rights are fine; only both at once is refused.
        assert!(r.protect_segment(base, RW).is_ok());
        assert!(r.protect_segment(base, RX).is_ok());
        assert_eq!(
            r.classify(base + 0xfff, Access::Execute),
            FaultDecision::DemandZero(RX)
        );
        assert_eq!(
            r.classify(base + 0x6000, Access::Read),
            FaultDecision::OutsideRegions
        );
        assert_eq!(
            r.classify(base + 0x5fff, Access::Read),
            FaultDecision::DemandZero(RW)
        );
        assert_eq!(
            r.classify(base - 1, Access::Read),
            FaultDecision::OutsideRegions
        );
    }

    /// The heap ends at the page holding the break; the stack region's top is not in it.
    #[test]
    fn heap_and_stack_edges() {
        let mut r = Regions::new();
        let h = HEAP_BASE as u64;
        assert_eq!(
            r.classify(h, Access::Read),
            FaultDecision::OutsideRegions,
            "empty heap"
        );
        r.set_brk(h + 1).unwrap();
        assert_eq!(r.brk(), h + 1);
        assert_eq!(
            r.classify(h + 0xfff, Access::Read),
            FaultDecision::DemandZero(RW)
        );
        assert_eq!(
            r.classify(h + 0x1000, Access::Read),
            FaultDecision::OutsideRegions
        );
        assert_eq!(
            r.classify(h - 1, Access::Read),
            FaultDecision::OutsideRegions
        );
        let top = (STACK_BASE + STACK_MAX_SIZE) as u64;
        assert_eq!(
            r.classify(top, Access::Write),
            FaultDecision::OutsideRegions
        );
        assert_eq!(
            r.classify(top - 1, Access::Read),
            FaultDecision::DemandZero(RW)
        );
        assert_eq!(
            r.classify(STACK_GUARD.start as u64, Access::Read),
            FaultDecision::StackOverflow
        );
        assert_eq!(
            r.classify(STACK_GUARD.start as u64 - 1, Access::Read),
            FaultDecision::OutsideRegions
        );
        assert_eq!(
            r.classify(top - 1, Access::Execute),
            FaultDecision::ProtectionViolation
        );
    }

    /// A buffer's last page is in it, the page after is not; a buffer exactly as big
    /// as what is left fits; a freed buffer's space is found again even below the
    /// packed part.
    #[test]
    fn buffer_edges() {
        let mut r = Regions::new();
        let base = BUFFER_BASE as u64;
        let end = (BUFFER_BASE + BUFFER_MAX_SIZE) as u64;
        let a = r.alloc_buffer(PAGE).unwrap();
        let b = r.alloc_buffer(end - base - 2 * PAGE).unwrap();
        assert_eq!((a, b), (base, base + PAGE));
        assert_eq!(
            r.classify(b + (end - base - 2 * PAGE) - 1, Access::Write),
            FaultDecision::DemandZero(RW)
        );
        assert_eq!(
            r.classify(end - PAGE, Access::Read),
            FaultDecision::OutsideRegions
        );
        let c = r.alloc_buffer(PAGE).unwrap();
        assert_eq!(c, end - PAGE, "exactly the last page");
        assert_eq!(r.alloc_buffer(1), Err(MmError::OutOfMemory));
        assert_eq!(free(&mut r, a), Ok((a, a + PAGE)));
        assert_eq!(r.classify(a, Access::Read), FaultDecision::OutsideRegions);
        assert_eq!(
            r.alloc_buffer(2 * PAGE),
            Err(MmError::OutOfMemory),
            "a one-page hole"
        );
        assert_eq!(r.alloc_buffer(PAGE), Ok(a));
        assert_eq!(
            r.buffers().collect::<Vec<_>>(),
            vec![(a, a + PAGE), (b, end - PAGE), (c, end)]
        );
    }
}
