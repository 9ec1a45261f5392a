//! `panda-abi`: the contract between Panda's kernel and its user programs.
//!
//! This crate owns the per-process address-space layout of
//! docs/VIRTUAL_ADDRESS_SPACE.md: the original design's constants, exactly as it
//! gives them, and the effective regions the kernel enforces, and (`syscall`) the
//! operation numbers and error codes. It is `no_std`, has no dependencies and no
//! unsafe code, so the kernel and every user program can use it.
//!
//! Invariants (checked at compile time below and by the unit tests):
//! - every effective region is page-aligned, non-empty, above the null page and inside
//!   the lower canonical half;
//! - the effective regions do not overlap each other or the stack's guard page.
//!
//! The original design's nominal heap range `[HEAP_BASE, HEAP_BASE + HEAP_MAX_SIZE)` ends at
//! `0x101_0000_0000`, which is also `BUFFER_BASE + BUFFER_MAX_SIZE`: the 4 GiB buffer
//! region is the last 4 GiB of the heap's nominal 1 TiB. The constants stay exact; the
//! heap's effective limit is `HEAP_LIMIT = BUFFER_BASE`, so the break can grow to
//! 1020 GiB and never into the buffer region.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod args;
pub mod syscall;

/// Size of a page (the unit of every region). The kernel's page size is this one
/// (`panda_arch::PAGE_SIZE` is the same value as a `u64`).
pub const PAGE_SIZE: usize = 0x1000;

const _: () = assert!(PAGE_SIZE.is_power_of_two());

/// The offset-in-page bits of an address, as the `u64` addresses are computed in.
const PAGE_MASK: u64 = PAGE_SIZE as u64 - 1;

/// The start of the page holding `addr`.
pub const fn page_floor(addr: u64) -> u64 {
    addr & !PAGE_MASK
}

/// `addr` rounded up to a page boundary. An address in the last page of the address
/// space has no boundary above it and rounds down to that page's start.
pub const fn page_ceil(addr: u64) -> u64 {
    page_floor(addr.saturating_add(PAGE_MASK))
}

/// `addr`'s offset within its page.
pub const fn page_offset(addr: u64) -> u64 {
    addr & PAGE_MASK
}

/// The kind of memory access a fault made: decoded from the page-fault error code
/// (`panda_arch::user::Exit::PageFault`), checked against a region's rights
/// (`panda_mm::region`), and named in a fault's report. One type from the trap to the
/// check, so no layer maps one kind onto another by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    /// An instruction fetch.
    Execute,
}

/// Lowest user address. The first page stays unmapped so null pointers fault.
pub const USER_SPACE_START: usize = 0x0000_0000_0000_1000;
/// End (exclusive) of the lower canonical half: user space is below it.
pub const USER_SPACE_END: usize = 0x0000_8000_0000_0000;
/// Start of the higher canonical half, where the kernel lives.
pub const KERNEL_SPACE_START: usize = 0xffff_8000_0000_0000;

/// Where user ELF executables are linked and loaded.
pub const ELF_LOAD_BASE: usize = 0x0000_0000_0040_0000;

/// Seed: the heap's base, grown by `OP_PROCESS_BRK`.
pub const HEAP_BASE: usize = 0x0000_0001_0000_0000;
/// Seed: the heap's nominal maximum size (1 TiB). Its end overlaps the buffer region;
/// see `HEAP_LIMIT`.
pub const HEAP_MAX_SIZE: usize = 0x100_0000_0000;

/// Seed: the zero-copy buffer region's base (`OP_BUFFER_ALLOC` / `OP_BUFFER_FREE`).
pub const BUFFER_BASE: usize = 0x0000_0100_0000_0000;
/// Seed: the buffer region's size (4 GiB).
pub const BUFFER_MAX_SIZE: usize = 0x1_0000_0000;

/// Seed: the stack region's base (its lowest address).
pub const STACK_BASE: usize = 0x0000_7fff_fef0_0000;
/// Seed: the stack region's size (16 MiB), demand-paged downward from the top.
pub const STACK_MAX_SIZE: usize = 0x100_0000;

/// The heap's effective end (exclusive): the break may grow up to here and no
/// further, because the original design's nominal heap range ends inside the buffer
/// region.
pub const HEAP_LIMIT: usize = BUFFER_BASE;

/// The top of the stack region: the kernel puts the program's arguments just below it
/// (`args`), and the first thread's stack pointer below them.
pub const INITIAL_STACK_POINTER: usize = STACK_BASE + STACK_MAX_SIZE;

/// A half-open range of user addresses `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub end: usize,
}

impl Region {
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// Length in bytes.
    pub const fn len(&self) -> usize {
        self.end - self.start
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `addr` lies inside.
    pub const fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether the two ranges share an address.
    pub const fn overlaps(&self, other: &Region) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether both ends are page-aligned.
    pub const fn is_page_aligned(&self) -> bool {
        self.start.is_multiple_of(PAGE_SIZE) && self.end.is_multiple_of(PAGE_SIZE)
    }
}

/// ELF segments: from the load base up to the heap.
pub const ELF_REGION: Region = Region::new(ELF_LOAD_BASE, HEAP_BASE);
/// The heap as enforced: `[HEAP_BASE, HEAP_LIMIT)`, 1020 GiB.
pub const HEAP_REGION: Region = Region::new(HEAP_BASE, HEAP_LIMIT);
/// The buffer region: `[BUFFER_BASE, BUFFER_BASE + BUFFER_MAX_SIZE)`.
pub const BUFFER_REGION: Region = Region::new(BUFFER_BASE, BUFFER_BASE + BUFFER_MAX_SIZE);
/// The stack region: `[STACK_BASE, STACK_BASE + STACK_MAX_SIZE)`.
pub const STACK_REGION: Region = Region::new(STACK_BASE, STACK_BASE + STACK_MAX_SIZE);
/// The page below the stack, never mapped: touching it is a stack overflow.
pub const STACK_GUARD: Region = Region::new(STACK_BASE - PAGE_SIZE, STACK_BASE);

/// The effective user regions, by name.
pub const USER_REGIONS: [(&str, Region); 4] = [
    ("elf", ELF_REGION),
    ("heap", HEAP_REGION),
    ("buffer", BUFFER_REGION),
    ("stack", STACK_REGION),
];

/// Whether `regions` obey the invariants above: each page-aligned, non-empty and inside
/// `[USER_SPACE_START, USER_SPACE_END)`, none covering `guard`, no two overlapping.
const fn layout_is_sound(regions: &[(&str, Region)], guard: Region) -> bool {
    let mut i = 0;
    while i < regions.len() {
        let r = regions[i].1;
        if r.is_empty()
            || !r.is_page_aligned()
            || r.start < USER_SPACE_START
            || r.end > USER_SPACE_END
        {
            return false;
        }
        if r.overlaps(&guard) {
            return false;
        }
        let mut j = i + 1;
        while j < regions.len() {
            if r.overlaps(&regions[j].1) {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

const _: () = assert!(
    layout_is_sound(&USER_REGIONS, STACK_GUARD),
    "panda-abi: user regions overlap or leave user space"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_seeds() {
        assert_eq!(BUFFER_BASE, 0x0000_0100_0000_0000);
        assert_eq!(BUFFER_MAX_SIZE, 0x1_0000_0000);
        assert_eq!(STACK_BASE, 0x0000_7fff_fef0_0000);
        assert_eq!(STACK_MAX_SIZE, 0x100_0000);
        assert_eq!(HEAP_BASE, 0x0000_0001_0000_0000);
        assert_eq!(HEAP_MAX_SIZE, 0x100_0000_0000);
        assert_eq!(ELF_LOAD_BASE, 0x40_0000);
    }

    #[test]
    fn page_rounding() {
        assert_eq!(page_floor(0x1fff), 0x1000);
        assert_eq!(page_floor(0x2000), 0x2000);
        assert_eq!(page_ceil(0), 0);
        assert_eq!(page_ceil(0x1001), 0x2000);
        assert_eq!(page_ceil(0x2000), 0x2000);
        assert_eq!(page_ceil(u64::MAX), 0xffff_ffff_ffff_f000, "saturates");
        assert_eq!(page_offset(0x1234), 0x234);
    }

    #[test]
    fn canonical_boundaries() {
        assert_eq!(USER_SPACE_END, 1 << 47);
        assert_eq!(KERNEL_SPACE_START, !((1usize << 47) - 1));
        assert_eq!(
            USER_SPACE_START, PAGE_SIZE,
            "only the null page stays below user space"
        );
    }

    #[test]
    fn regions_are_aligned_nonempty_and_in_the_lower_half() {
        for (name, r) in USER_REGIONS {
            assert!(!r.is_empty(), "{name} is empty");
            assert!(r.is_page_aligned(), "{name} is not page-aligned: {r:?}");
            assert!(
                r.start >= USER_SPACE_START,
                "{name} starts in the null page"
            );
            assert!(
                r.end <= USER_SPACE_END,
                "{name} leaves the lower canonical half"
            );
        }
    }

    #[test]
    fn regions_do_not_overlap() {
        for (i, (a, ra)) in USER_REGIONS.iter().enumerate() {
            for (b, rb) in &USER_REGIONS[i + 1..] {
                assert!(!ra.overlaps(rb), "{a} {ra:?} overlaps {b} {rb:?}");
            }
        }
    }

    #[test]
    fn original_heap_overlaps_buffer_and_the_limit_resolves_it() {
        let nominal = Region::new(HEAP_BASE, HEAP_BASE + HEAP_MAX_SIZE);
        assert_eq!(HEAP_BASE + HEAP_MAX_SIZE, 0x101_0000_0000);
        assert_eq!(HEAP_BASE + HEAP_MAX_SIZE, BUFFER_BASE + BUFFER_MAX_SIZE);
        assert!(
            nominal.overlaps(&BUFFER_REGION),
            "the original design's overlap is documented; if it is gone, update the docs"
        );
        assert_eq!(HEAP_LIMIT, BUFFER_BASE);
        assert!(!HEAP_REGION.overlaps(&BUFFER_REGION));
        assert_eq!(HEAP_REGION.len(), 1020 << 30, "effective heap is 1020 GiB");
    }

    #[test]
    fn stack_top_and_guard() {
        assert_eq!(INITIAL_STACK_POINTER, 0x0000_7fff_fff0_0000);
        assert_eq!(STACK_GUARD.end, STACK_BASE);
        assert_eq!(STACK_GUARD.len(), PAGE_SIZE);
        for (name, r) in USER_REGIONS {
            assert!(
                !r.overlaps(&STACK_GUARD),
                "{name} covers the stack guard page"
            );
        }
    }

    #[test]
    fn region_predicates() {
        assert!(Region::new(0x2000, 0x2000).is_empty());
        assert!(
            Region::new(0x3000, 0x2000).is_empty(),
            "an inverted range is empty"
        );
        assert!(!Region::new(0x2000, 0x3000).is_empty());
        let r = Region::new(0x1000, 0x3000);
        assert!(r.contains(0x1000) && r.contains(0x2fff) && !r.contains(0x3000));
        assert!(r.overlaps(&Region::new(0x2000, 0x4000)));
        assert!(!r.overlaps(&Region::new(0x3000, 0x4000)));
        assert!(!Region::new(0x1001, 0x2000).is_page_aligned());
    }

    /// The layout check behind the compile-time assertion refuses each kind of broken
    /// layout on its own, and accepts regions that touch the limits exactly.
    #[test]
    fn the_layout_check_refuses_every_broken_layout() {
        let ok = |regions: &[Region]| {
            let named: Vec<(&str, Region)> = regions.iter().map(|&r| ("r", r)).collect();
            layout_is_sound(&named, STACK_GUARD)
        };
        assert!(ok(&USER_REGIONS.map(|(_, r)| r)));
        assert!(ok(&[]));
        // Touching both ends of user space, and each other, is fine.
        assert!(ok(&[
            Region::new(USER_SPACE_START, 2 * PAGE_SIZE),
            Region::new(2 * PAGE_SIZE, 3 * PAGE_SIZE),
            Region::new(USER_SPACE_END - PAGE_SIZE, USER_SPACE_END),
        ]));
        let page = Region::new(0x10_0000, 0x10_1000);
        for (why, bad) in [
            ("empty", Region::new(0x10_0000, 0x10_0000)),
            ("unaligned start", Region::new(0x10_0008, 0x10_1000)),
            ("unaligned end", Region::new(0x10_0000, 0x10_0ff8)),
            ("the null page", Region::new(0, PAGE_SIZE)),
            (
                "past user space",
                Region::new(USER_SPACE_END - PAGE_SIZE, USER_SPACE_END + PAGE_SIZE),
            ),
            ("the stack guard", STACK_GUARD),
            ("an overlap", Region::new(0x10_0000, 0x10_2000)),
        ] {
            assert!(!ok(&[page, bad]), "{why} accepted (second)");
            assert!(!ok(&[bad, page]), "{why} accepted (first)");
        }
        // The overlap is found between any two, not only neighbours.
        assert!(!ok(&[
            page,
            Region::new(0x20_0000, 0x20_1000),
            Region::new(0x10_0000, 0x10_1000),
        ]));
    }
}
