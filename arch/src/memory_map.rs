//! The physical memory map: a sorted list of non-overlapping ranges, each with a kind.
//!
//! Both front-ends fill it from their protocol's map, then carve out what is in use
//! (kernel image, modules, boot data, early page tables) with `claim`, which splits
//! usable ranges so that no usable range ever overlaps something in use. Capacity is
//! fixed because there is no heap while it is built.
//!
//! Two types: `MemoryMap` is the data structure, which anyone may build and edit (the
//! in-kernel tests do); `BootMemoryMap` is *the* map of this machine, the authority on
//! which physical memory is free. Only this crate makes one (once per boot, in the
//! front-end), and outside this crate it can be read and have usable memory taken out
//! of it, but nothing can be added to it, and it cannot be cloned or forged: so the
//! code here that hands its free ranges out (page-table frames, stacks, the frame
//! allocator's memory) relies on no caller for their being free.

use core::fmt;
use core::ops::Deref;

use crate::{page_ceil, page_floor, PAGE_SIZE};

/// What a physical range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Free RAM.
    Usable,
    /// Firmware-reserved or unknown: never touched.
    Reserved,
    /// ACPI tables; reclaimable once parsed.
    AcpiReclaimable,
    /// ACPI non-volatile storage: never touched.
    AcpiNvs,
    /// Defective RAM.
    BadMemory,
    /// Bootloader data (boot structures, Limine's page tables); reclaimable after boot.
    BootloaderReclaimable,
    /// The kernel image and boot modules.
    KernelAndModules,
    /// Page tables and other frames the kernel allocated before its frame allocator.
    KernelEarly,
    /// A framebuffer.
    Framebuffer,
}

impl MemoryKind {
    /// Whether the range is RAM (as opposed to MMIO or holes), i.e. belongs in the HHDM.
    pub fn is_ram(self) -> bool {
        !matches!(
            self,
            MemoryKind::Reserved | MemoryKind::BadMemory | MemoryKind::Framebuffer
        )
    }

    /// Whether the range is free memory (to be given to the frame allocator): usable
    /// RAM, and bootloader data once the kernel no longer needs it.
    pub fn is_free(self) -> bool {
        matches!(self, MemoryKind::Usable | MemoryKind::BootloaderReclaimable)
    }

    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Usable => "usable",
            MemoryKind::Reserved => "reserved",
            MemoryKind::AcpiReclaimable => "acpi-reclaimable",
            MemoryKind::AcpiNvs => "acpi-nvs",
            MemoryKind::BadMemory => "bad",
            MemoryKind::BootloaderReclaimable => "bootloader-reclaimable",
            MemoryKind::KernelAndModules => "kernel+modules",
            MemoryKind::KernelEarly => "kernel-early",
            MemoryKind::Framebuffer => "framebuffer",
        }
    }
}

/// A half-open physical range `[start, end)` of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub kind: MemoryKind,
}

impl Region {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Why the memory map could not take a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    Full,
}

/// Most entries kept; firmware maps rarely exceed a few dozen.
pub const CAPACITY: usize = 128;

/// The physical memory map.
#[derive(Clone)]
pub struct MemoryMap {
    entries: [Region; CAPACITY],
    len: usize,
}

impl Default for MemoryMap {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMap {
    pub const fn new() -> Self {
        Self {
            entries: [Region {
                start: 0,
                end: 0,
                kind: MemoryKind::Reserved,
            }; CAPACITY],
            len: 0,
        }
    }

    pub fn regions(&self) -> &[Region] {
        &self.entries[..self.len]
    }

    fn insert_at(&mut self, at: usize, region: Region) -> Result<(), MapError> {
        if self.len == CAPACITY {
            return Err(MapError::Full);
        }
        self.entries.copy_within(at..self.len, at + 1);
        self.entries[at] = region;
        self.len += 1;
        Ok(())
    }

    fn remove_at(&mut self, at: usize) {
        self.entries.copy_within(at + 1..self.len, at);
        self.len -= 1;
    }

    /// Adds a range as the firmware reported it. Ranges are page-rounded (usable ones
    /// inward, others outward); where they overlap what is already there, the more
    /// restrictive kind wins, so a usable range never covers a reserved one.
    pub fn add(&mut self, start: u64, end: u64, kind: MemoryKind) -> Result<(), MapError> {
        let (start, end) = if kind == MemoryKind::Usable {
            (page_ceil(start), page_floor(end))
        } else {
            (page_floor(start), page_ceil(end))
        };
        if start >= end {
            return Ok(());
        }
        if kind == MemoryKind::Usable {
            // Insert only the parts not already covered by anything.
            let mut cursor = start;
            let mut i = 0;
            while cursor < end {
                let next = self.regions().get(i).copied();
                match next {
                    Some(r) if r.end <= cursor => i += 1,
                    Some(r) if r.start < end => {
                        if r.start > cursor {
                            self.insert_sorted(Region {
                                start: cursor,
                                end: r.start,
                                kind,
                            })?;
                        }
                        cursor = cursor.max(r.end);
                        i = 0;
                    }
                    _ => {
                        self.insert_sorted(Region {
                            start: cursor,
                            end,
                            kind,
                        })?;
                        cursor = end;
                    }
                }
            }
            self.merge();
            Ok(())
        } else {
            self.claim(start, end, kind)
        }
    }

    fn insert_sorted(&mut self, region: Region) -> Result<(), MapError> {
        let at = self
            .regions()
            .iter()
            .position(|r| r.start >= region.end)
            .unwrap_or(self.len);
        self.insert_at(at, region)
    }

    /// Marks `[start, end)` (page-rounded outward) as `kind`, splitting whatever it
    /// overlaps. The result stays sorted and non-overlapping.
    pub fn claim(&mut self, start: u64, end: u64, kind: MemoryKind) -> Result<(), MapError> {
        let (start, end) = (page_floor(start), page_ceil(end));
        if start >= end {
            return Ok(());
        }
        let mut i = 0;
        while i < self.len {
            let r = self.entries[i];
            if r.end <= start || r.start >= end {
                i += 1;
                continue;
            }
            // r overlaps [start, end): keep its parts outside.
            self.remove_at(i);
            if r.end > end {
                self.insert_at(
                    i,
                    Region {
                        start: end,
                        end: r.end,
                        kind: r.kind,
                    },
                )?;
            }
            if r.start < start {
                self.insert_at(
                    i,
                    Region {
                        start: r.start,
                        end: start,
                        kind: r.kind,
                    },
                )?;
                i += 1;
            }
        }
        self.insert_sorted(Region { start, end, kind })?;
        self.merge();
        Ok(())
    }

    /// Takes `len` bytes (page-rounded) of usable memory at or above `min` and below
    /// `max`, marks them `kind`, and returns their physical start. For boot-time
    /// allocations made before the frame allocator exists.
    pub fn take(&mut self, len: u64, min: u64, max: u64, kind: MemoryKind) -> Option<u64> {
        let len = page_ceil(len);
        let start = self
            .regions()
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .map(|r| (r.start.max(min), r.end.min(max)))
            .find(|(s, e)| s < e && e - s >= len)?
            .0;
        self.claim(start, start + len, kind).ok()?;
        Some(start)
    }

    /// Joins adjacent ranges of the same kind.
    fn merge(&mut self) {
        let mut i = 1;
        while i < self.len {
            let (a, b) = (self.entries[i - 1], self.entries[i]);
            if a.kind == b.kind && a.end == b.start {
                self.entries[i - 1].end = b.end;
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }

    /// Bytes of the given kind.
    pub fn total(&self, kind: MemoryKind) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == kind)
            .map(Region::len)
            .sum()
    }

    /// Bytes of RAM of any kind.
    pub fn total_ram(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind.is_ram())
            .map(Region::len)
            .sum()
    }

    /// Checks the invariants: sorted, non-empty, non-overlapping, page-aligned.
    pub fn check(&self) -> Result<(), &'static str> {
        for r in self.regions() {
            if r.is_empty() {
                return Err("empty region");
            }
            if !r.start.is_multiple_of(PAGE_SIZE) || !r.end.is_multiple_of(PAGE_SIZE) {
                return Err("region not page-aligned");
            }
        }
        for w in self.regions().windows(2) {
            if w[0].end > w[1].start {
                return Err("regions overlap or are unsorted");
            }
        }
        Ok(())
    }
}

impl fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.regions()).finish()
    }
}

/// The machine's memory map, as the boot front-end built it: the authority on which
/// physical memory is free.
///
/// Invariants, which code in this crate relies on and nothing outside can break:
/// - a `Usable` range is RAM that nothing uses: the kernel image, boot modules, boot
///   data and everything taken since were claimed out of the usable ranges first;
/// - a `BootloaderReclaimable` range holds only bootloader data (its page tables,
///   stacks and responses, PVH's start info), which nothing needs once the kernel runs
///   on its own page tables (`kernel_tables::build_and_switch`);
/// - `KernelAndModules` ranges are never given away: boot modules are handed out as
///   `&'static [u8]` (`Module::bytes`).
///
/// There is one per boot, made by the boot front-end; it is not `Clone`, so no stale
/// copy can bring back ranges taken since. Reading goes through `Deref` to `MemoryMap`.
pub struct BootMemoryMap {
    map: MemoryMap,
    /// Set once the free ranges went to their manager (`hand_over_free`): from then on
    /// the map is a record and nothing more can be taken.
    handed_over: bool,
    /// Set by `kernel_tables::build_and_switch` once the kernel runs on its own page
    /// tables (`tables_switched`): from then on bootloader data is no longer needed.
    tables_switched: bool,
}

impl BootMemoryMap {
    /// Only the boot front-ends make one.
    pub(crate) fn new(map: MemoryMap) -> Self {
        Self {
            map,
            handed_over: false,
            tables_switched: false,
        }
    }

    /// Records that the kernel now runs on its own page tables, built from this map
    /// (`kernel_tables::build_and_switch` calls it, once they are loaded for good).
    pub(crate) fn tables_switched(&mut self) {
        self.tables_switched = true;
    }

    /// Marks `[start, end)` as `kind` (page-rounded outward). For the front-ends and
    /// this crate's boot-time allocations; never to make anything free.
    pub(crate) fn claim(&mut self, start: u64, end: u64, kind: MemoryKind) -> Result<(), MapError> {
        debug_assert!(!kind.is_free());
        self.map.claim(start, end, kind)
    }

    /// Takes `len` bytes (page-rounded) of usable memory at or above `min` and below
    /// `max`, marks them `kind`, and returns their physical start: the range is the
    /// caller's from now on. For boot-time allocations made before the frame allocator
    /// exists. `None` if nothing fits, if `kind` is a free kind (`Usable`,
    /// `BootloaderReclaimable`: taking must make memory used), or once the free ranges
    /// were handed over.
    pub fn take(&mut self, len: u64, min: u64, max: u64, kind: MemoryKind) -> Option<u64> {
        if kind.is_free() || self.handed_over {
            return None;
        }
        self.map.take(len, min, max, kind)
    }

    /// Hands every free range over, once: `Usable` ranges, and `BootloaderReclaimable`
    /// ones (bootloader data, no longer needed once the kernel's own page tables are
    /// active). `None` before the kernel's page tables are active, and on every call
    /// after the first; `take` gives nothing afterwards either, so the ranges have one
    /// owner, the frame allocator they are meant for.
    pub fn hand_over_free(&mut self) -> Option<FreeRanges> {
        if self.handed_over || !self.tables_switched {
            return None;
        }
        self.handed_over = true;
        let mut ranges = FreeRanges {
            ranges: [(0, 0); CAPACITY],
            len: 0,
            next: 0,
        };
        for r in self.map.regions().iter().filter(|r| r.kind.is_free()) {
            ranges.ranges[ranges.len] = (r.start, r.end);
            ranges.len += 1;
        }
        Some(ranges)
    }

    /// Whether `hand_over_free` has run.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }
}

impl Deref for BootMemoryMap {
    type Target = MemoryMap;

    fn deref(&self) -> &MemoryMap {
        &self.map
    }
}

impl fmt::Debug for BootMemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.map, f)
    }
}

/// The free physical ranges `[start, end)` of the boot memory map, handed over once
/// (`BootMemoryMap::hand_over_free`); whoever holds this owns them. Not `Clone`.
pub struct FreeRanges {
    ranges: [(u64, u64); CAPACITY],
    len: usize,
    next: usize,
}

impl FreeRanges {
    /// The lowest start and highest end of the ranges not yet taken (None if none).
    pub fn span(&self) -> Option<(u64, u64)> {
        let rest = &self.ranges[self.next.min(self.len)..self.len];
        let start = rest.iter().map(|r| r.0).min()?;
        let end = rest.iter().map(|r| r.1).max()?;
        Some((start, end))
    }
}

impl Iterator for FreeRanges {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let r = self.ranges[..self.len].get(self.next).copied()?;
        self.next += 1;
        Some(r)
    }
}
