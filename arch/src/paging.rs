//! Page-table entries, a table builder, and CR3.
//!
//! 4-level paging. Tables are reached through the HHDM, so building tables needs the
//! physical frames they live in to be mapped there already (true for the boot tables of
//! both entry paths below 4 GiB, and for the kernel's own tables afterwards). The frame
//! source is a trait so the boot allocator and the kernel's frame allocator can both
//! supply frames. This is the lowest layer of memory management: user address spaces
//! (kernel/src/aspace.rs) are built on it.

use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use crate::{page_ceil, page_floor, PAGE_SIZE, USER_END};

/// Entry bits.
pub mod flags {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const WRITE_THROUGH: u64 = 1 << 3;
    pub const NO_CACHE: u64 = 1 << 4;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    pub const HUGE: u64 = 1 << 7;
    pub const GLOBAL: u64 = 1 << 8;
    pub const NO_EXECUTE: u64 = 1 << 63;
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// `flags::NO_EXECUTE` if EFER.NXE is on (where it is not, the bit is reserved and
/// setting it would fault), else 0.
#[inline]
pub fn nx_bit() -> u64 {
    if crate::cpu::nx_enabled() {
        flags::NO_EXECUTE
    } else {
        0
    }
}

/// Page sizes a leaf entry can map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Size4K,
    Size2M,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => 2 * 1024 * 1024,
        }
    }
}

/// Where page-table frames come from.
///
/// # Safety
/// `zeroed_frame` must return only the physical address of a 4 KiB frame of RAM that
/// is zeroed, mapped writable at `HHDM_BASE + phys`, and nobody else's from then on:
/// the hierarchy it is given to reads and writes it as a page table for as long as it
/// lives (a `TableBuilder` writes wherever these addresses point).
pub unsafe trait FrameSource {
    /// A zeroed 4 KiB frame's physical address, reachable through the HHDM.
    fn zeroed_frame(&mut self) -> Option<u64>;
}

/// Hands out zeroed frames from a list of free physical ranges, in order, and
/// remembers what it handed out so the caller can mark it used. For the kernel's first
/// page tables, before the frame allocator exists.
pub struct EarlyFrames {
    ranges: [(u64, u64); 16],
    count: usize,
    current: usize,
    next: u64,
    used: [(u64, u64); 16],
}

impl EarlyFrames {
    /// # Safety
    /// Every range must be free RAM that nothing else uses while the frames are in use,
    /// mapped writable at `HHDM_BASE + phys`.
    pub unsafe fn new(free: impl Iterator<Item = (u64, u64)>) -> Self {
        let mut ranges = [(0, 0); 16];
        let mut count = 0;
        for (slot, (start, end)) in ranges.iter_mut().zip(free) {
            *slot = (page_ceil(start), page_floor(end));
            count += 1;
        }
        Self {
            ranges,
            count,
            current: 0,
            next: ranges[0].0,
            used: [(0, 0); 16],
        }
    }

    /// The ranges handed out, one (start, end) per source range (empty ones are (0, 0)).
    pub fn used(&self) -> [(u64, u64); 16] {
        self.used
    }

    /// Bytes handed out so far.
    pub fn used_bytes(&self) -> u64 {
        self.used.iter().map(|(s, e)| e - s).sum()
    }
}

// SAFETY: the frames come from the ranges `new`'s caller vouched for (free RAM, mapped
// writable through the HHDM, which is `HHDM_BASE` wherever tables are built), each
// handed out once and zeroed first.
unsafe impl FrameSource for EarlyFrames {
    fn zeroed_frame(&mut self) -> Option<u64> {
        while self.current < self.count {
            let (start, end) = self.ranges[self.current];
            self.next = self.next.max(start);
            if self.next + PAGE_SIZE <= end {
                let frame = self.next;
                self.next += PAGE_SIZE;
                let used = &mut self.used[self.current];
                if used.0 == used.1 {
                    *used = (frame, frame);
                }
                used.1 = frame + PAGE_SIZE;
                let page = (crate::HHDM_BASE + frame) as *mut u64;
                // SAFETY: the frame is free RAM mapped writable through the HHDM (the
                // contract of `new`), and handed out once.
                unsafe { core::ptr::write_bytes(page, 0, 512) };
                return Some(frame);
            }
            self.current += 1;
            if self.current < self.count {
                self.next = self.ranges[self.current].0;
            }
        }
        None
    }
}

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    OutOfFrames,
    AlreadyMapped { virt: u64 },
    Misaligned { virt: u64, phys: u64 },
}

/// A 4-level hierarchy being built, rooted at a PML4 frame.
///
/// Only this crate makes one (`kernel_tables` builds the kernel's, and hands out user
/// hierarchies through `kernel_tables::user_tables`): its root and every table under
/// it come from a `FrameSource`, so every table it reads or writes is one it owns.
pub struct TableBuilder {
    root: u64,
    /// A user hierarchy (`kernel_tables::user_tables`): `map` and `protect` stay in
    /// the user half, whose tables are its own (the kernel half's are shared).
    user_only: bool,
}

impl TableBuilder {
    /// Starts a hierarchy with a fresh, zeroed PML4.
    pub(crate) fn new(frames: &mut dyn FrameSource) -> Result<Self, MapError> {
        let root = frames.zeroed_frame().ok_or(MapError::OutOfFrames)?;
        Ok(Self {
            root,
            user_only: false,
        })
    }

    /// Keeps `map` and `protect` to the user half from now on.
    pub(crate) fn confine_to_user_half(&mut self) {
        self.user_only = true;
    }

    /// Physical address of the PML4.
    pub fn root(&self) -> u64 {
        self.root
    }

    fn table(&self, phys: u64) -> *mut u64 {
        (crate::HHDM_BASE + phys) as *mut u64
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` is a page-table frame this builder allocated (or the root),
        // mapped through the HHDM, and index < 512.
        unsafe { self.table(table).add(index).read_volatile() }
    }

    fn write(&self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `read`; the hierarchy is not loaded in CR3 while being built, or
        // the write only fills an empty slot, so no live translation changes under us.
        unsafe { self.table(table).add(index).write_volatile(value) }
    }

    /// The next-level table under `table[index]`, created when empty. `user` marks the
    /// entry user-accessible (on paths to user pages).
    fn next(
        &self,
        table: u64,
        index: usize,
        user: bool,
        frames: &mut dyn FrameSource,
    ) -> Result<u64, MapError> {
        let entry = self.read(table, index);
        let user_bit = if user { flags::USER } else { 0 };
        if entry & flags::PRESENT != 0 {
            if entry & flags::HUGE != 0 {
                return Err(MapError::AlreadyMapped { virt: 0 });
            }
            if entry & user_bit != user_bit {
                self.write(table, index, entry | user_bit);
            }
            return Ok(entry & ADDR_MASK);
        }
        let frame = frames.zeroed_frame().ok_or(MapError::OutOfFrames)?;
        // Intermediate entries are permissive; leaves decide the access rights.
        self.write(
            table,
            index,
            frame | flags::PRESENT | flags::WRITABLE | user_bit,
        );
        Ok(frame)
    }

    /// Copies PML4 entries 256..511 (the kernel half) from the hierarchy `from`, so
    /// this one shares every kernel mapping.
    pub(crate) fn share_kernel_half(&mut self, from: &TableBuilder) {
        for index in 256..512 {
            self.write(self.root, index, from.read(from.root, index));
        }
    }

    /// Entry `index` (0..512) of the PML4; 0 for an index past the table.
    pub fn root_entry(&self, index: usize) -> u64 {
        if index < 512 {
            self.read(self.root, index)
        } else {
            0
        }
    }

    /// Makes sure PML4 slot `index` points at a table (for sharing the kernel half).
    pub(crate) fn ensure_pml4_slot(
        &mut self,
        index: usize,
        frames: &mut dyn FrameSource,
    ) -> Result<(), MapError> {
        self.next(self.root, index, false, frames).map(|_| ())
    }

    /// Maps one page. In a user hierarchy, `virt` must lie in the user half
    /// (`Misaligned` otherwise). Address bits in `leaf_flags` are ignored.
    ///
    /// # Safety
    /// `[phys, phys + size)` must be memory that whoever the mapping serves may access
    /// with `leaf_flags`' rights: a frame the caller owns and gives to this hierarchy
    /// (or, for the kernel's tables, RAM or device registers the kernel uses through
    /// this mapping), never memory Rust code owns elsewhere.
    pub unsafe fn map(
        &mut self,
        virt: u64,
        phys: u64,
        size: PageSize,
        leaf_flags: u64,
        frames: &mut dyn FrameSource,
    ) -> Result<(), MapError> {
        if !virt.is_multiple_of(size.bytes())
            || !phys.is_multiple_of(size.bytes())
            || phys & !ADDR_MASK != 0
            || (self.user_only && virt >= USER_END)
        {
            return Err(MapError::Misaligned { virt, phys });
        }
        let leaf_flags = leaf_flags & !ADDR_MASK;
        let idx = |level: u32| ((virt >> (12 + 9 * level)) & 0x1ff) as usize;
        let user = leaf_flags & flags::USER != 0;
        let pdpt = self.next(self.root, idx(3), user, frames)?;
        let pd = self.next(pdpt, idx(2), user, frames)?;
        let (table, index, bits) = match size {
            PageSize::Size2M => (pd, idx(1), leaf_flags | flags::HUGE),
            PageSize::Size4K => (self.next(pd, idx(1), user, frames)?, idx(0), leaf_flags),
        };
        if self.read(table, index) & flags::PRESENT != 0 {
            return Err(MapError::AlreadyMapped { virt });
        }
        self.write(table, index, phys | bits | flags::PRESENT);
        Ok(())
    }

    /// Maps `[virt, virt + len)` to `[phys, ...)` with the largest pages alignment allows.
    ///
    /// # Safety
    /// As for `map`, for the whole range.
    pub(crate) unsafe fn map_range(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        leaf_flags: u64,
        frames: &mut dyn FrameSource,
    ) -> Result<(), MapError> {
        let big = PageSize::Size2M.bytes();
        let mut off = 0;
        while off < len {
            let (v, p) = (virt + off, phys + off);
            let size = if v % big == 0 && p % big == 0 && len - off >= big {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            // SAFETY: the caller vouches for the whole range.
            unsafe { self.map(v, p, size, leaf_flags, frames)? };
            off += size.bytes();
        }
        Ok(())
    }

    /// Walks the hierarchy: the physical address and leaf flags `virt` maps to.
    pub fn translate(&self, virt: u64) -> Option<(u64, u64)> {
        let mut table = self.root;
        for level in (0..4u32).rev() {
            let index = ((virt >> (12 + 9 * level)) & 0x1ff) as usize;
            let entry = self.read(table, index);
            if entry & flags::PRESENT == 0 {
                return None;
            }
            let leaf = level == 0 || (level <= 2 && entry & flags::HUGE != 0);
            if leaf {
                let page = 1u64 << (12 + 9 * level);
                let base = entry & ADDR_MASK & !(page - 1);
                return Some((base + (virt & (page - 1)), entry & !ADDR_MASK));
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// The tables on the path to `virt`'s 4 KiB leaf: (PML4, PDPT, PD, PT) frames, as
    /// far as they exist.
    pub fn path(&self, virt: u64) -> [Option<u64>; 4] {
        let mut path = [Some(self.root), None, None, None];
        for level in 0..3 {
            let Some(table) = path[level] else { break };
            let index = ((virt >> (39 - 9 * level)) & 0x1ff) as usize;
            let entry = self.read(table, index);
            if entry & flags::PRESENT == 0 || entry & flags::HUGE != 0 {
                break;
            }
            path[level + 1] = Some(entry & ADDR_MASK);
        }
        path
    }

    /// Removes the 4 KiB mappings in `[from, to)` (user half) in one walk of the tree,
    /// stopping after `budget` page slots of the last level were looked at (mapped or
    /// not): each removed leaf goes to `on_leaf(virt, frame)`, and every table the walk
    /// leaves empty is unlinked and handed to `free_table` (never the PML4). Absent
    /// upper-level entries are skipped whole, so a sparse range costs no more than its
    /// tables. Returns `None` when the whole range is done, or the address to continue
    /// from. Each table is scanned for emptiness once, after its part of the range, so
    /// the cost is linear in the range — unmapping page by page rescans a table per
    /// page. The caller flushes TLBs before reusing the frames and tables.
    pub fn unmap_range(
        &mut self,
        from: u64,
        to: u64,
        budget: usize,
        on_leaf: &mut dyn FnMut(u64, u64),
        free_table: &mut dyn FnMut(u64),
    ) -> Option<u64> {
        struct Walk<'a> {
            b: &'a TableBuilder,
            budget: usize,
            on_leaf: &'a mut dyn FnMut(u64, u64),
            free_table: &'a mut dyn FnMut(u64),
        }
        /// `Some(va)`: out of budget, continue at `va`.
        fn walk(
            w: &mut Walk<'_>,
            table: u64,
            level: u32,
            base: u64,
            from: u64,
            to: u64,
        ) -> Option<u64> {
            let shift = 39 - 9 * level;
            let span = 1u64 << shift;
            let first = ((from - base) >> shift) as usize;
            let last = (((to - 1 - base) >> shift) as usize).min(511);
            for i in first..=last {
                let va = base + i as u64 * span;
                if level == 3 {
                    if w.budget == 0 {
                        return Some(va.max(from));
                    }
                    w.budget -= 1;
                }
                let entry = w.b.read(table, i);
                if entry & flags::PRESENT == 0 {
                    continue;
                }
                if level == 3 {
                    w.b.write(table, i, 0);
                    (w.on_leaf)(va, entry & ADDR_MASK);
                    continue;
                }
                if entry & flags::HUGE != 0 {
                    continue; // user mappings are 4 KiB; nothing else is expected here
                }
                let child = entry & ADDR_MASK;
                let stopped = walk(w, child, level + 1, va, from.max(va), to.min(va + span));
                if (0..512).all(|j| w.b.read(child, j) & flags::PRESENT == 0) {
                    w.b.write(table, i, 0);
                    (w.free_table)(child);
                }
                if stopped.is_some() {
                    return stopped;
                }
            }
            None
        }
        let to = to.min(USER_END);
        if from >= to {
            return None;
        }
        let mut w = Walk {
            b: self,
            budget,
            on_leaf,
            free_table,
        };
        walk(&mut w, self.root, 0, 0, from, to)
    }

    /// Replaces the rights of `virt`'s 4 KiB mapping in the user half (the frame stays;
    /// address bits in `leaf_flags` are ignored). Returns false if it is not mapped or
    /// lies in the kernel half, whose tables every space shares. The caller flushes TLBs:
    /// until then CPUs may use the old rights.
    pub fn protect(&mut self, virt: u64, leaf_flags: u64) -> bool {
        if virt >= USER_END {
            return false;
        }
        let leaf_flags = leaf_flags & !ADDR_MASK;
        let Some(pt) = self.path(virt)[3] else {
            return false;
        };
        let index = ((virt >> 12) & 0x1ff) as usize;
        let entry = self.read(pt, index);
        if entry & flags::PRESENT == 0 {
            return false;
        }
        self.write(pt, index, (entry & ADDR_MASK) | leaf_flags | flags::PRESENT);
        true
    }

    /// Frames the user half holds: every mapped leaf and every table under the PML4
    /// slots 0..256, plus the PML4 itself (what `tear_down` would free).
    pub fn count_user_frames(&self) -> u64 {
        fn walk(b: &TableBuilder, table: u64, level: u32) -> u64 {
            let slots = if level == 3 { 0..256 } else { 0..512 };
            let mut n = 0;
            for i in slots {
                let entry = b.read(table, i);
                if entry & flags::PRESENT == 0 {
                    continue;
                }
                n += 1;
                if level != 0 && entry & flags::HUGE == 0 {
                    n += walk(b, entry & ADDR_MASK, level - 1);
                }
            }
            n
        }
        walk(self, self.root, 3) + 1
    }

    /// Frees every mapping and table of the user half (PML4 slots 0..256): leaf frames
    /// go to `free_leaf`, table frames (and finally the PML4) to `free_table`. The
    /// hierarchy must not be loaded on any CPU.
    pub fn tear_down(self, free_leaf: &mut dyn FnMut(u64), free_table: &mut dyn FnMut(u64)) {
        fn walk(
            b: &TableBuilder,
            table: u64,
            level: u32,
            free_leaf: &mut dyn FnMut(u64),
            free_table: &mut dyn FnMut(u64),
        ) {
            let slots = if level == 3 { 0..256 } else { 0..512 };
            for i in slots {
                let entry = b.read(table, i);
                if entry & flags::PRESENT == 0 {
                    continue;
                }
                let next = entry & ADDR_MASK;
                if level == 0 || entry & flags::HUGE != 0 {
                    free_leaf(next);
                } else {
                    walk(b, next, level - 1, free_leaf, free_table);
                    free_table(next);
                }
            }
        }
        walk(&self, self.root, 3, free_leaf, free_table);
        free_table(self.root);
    }
}

/// The active PML4's physical address.
#[inline]
pub fn active_root() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

/// Switches to the hierarchy rooted at `root` (flushing non-global TLB entries).
///
/// # Safety
/// The hierarchy must map the running code, its stack, and everything the kernel will
/// touch afterwards with the access rights it needs.
pub unsafe fn switch_to(root: u64) {
    let frame = PhysFrame::containing_address(PhysAddr::new(root));
    // SAFETY: the caller vouches for the new hierarchy.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
}

/// Reloads CR3 with the hierarchy already in use (flushes non-global entries; for
/// measuring the cost of a switch).
pub fn reload_cr3() {
    let root = active_root();
    // SAFETY: the same hierarchy stays loaded: every mapping stays as it is.
    unsafe { switch_to(root) };
}

/// Invalidates the TLB entry of one page on this CPU.
#[inline]
pub fn flush_page(virt: u64) {
    x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(virt));
}

/// Flushes this CPU's non-global TLB entries (reloads CR3).
pub fn flush_user() {
    x86_64::instructions::tlb::flush_all();
}

/// Flushes the whole TLB, global entries included, by toggling CR4.PGE.
pub fn flush_all() {
    use x86_64::registers::control::{Cr4, Cr4Flags};
    let cr4 = Cr4::read();
    if cr4.contains(Cr4Flags::PAGE_GLOBAL) {
        // SAFETY: clearing and restoring PGE only flushes the TLB.
        unsafe {
            Cr4::write(cr4 - Cr4Flags::PAGE_GLOBAL);
            Cr4::write(cr4);
        }
    } else {
        x86_64::instructions::tlb::flush_all();
    }
}

/// Ways to fill a 4 KiB page with zeros. The kernel times each at boot and keeps the
/// fastest (`set_zero_method`): on hardware with ERMS `rep stosb` or the non-temporal
/// stores usually win; under QEMU's TCG every iteration of a string instruction is
/// emulated one element at a time, so the widest stores win there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ZeroMethod {
    /// `rep stosq`: 512 stores of 8 bytes.
    RepStosq = 0,
    /// `rep stosb`: a byte store per byte of the page, fast-string microcode with ERMS.
    RepStosb = 1,
    /// `movnti`: 512 non-temporal 8-byte stores (bypass the cache), then `sfence`.
    Movnti = 2,
    /// `movntdq`: 256 non-temporal 16-byte SSE stores, then `sfence`.
    SseNonTemporal = 3,
    /// `movdqa`: 256 16-byte SSE stores.
    SseStore = 4,
}

impl ZeroMethod {
    pub const ALL: [ZeroMethod; 5] = [
        ZeroMethod::RepStosq,
        ZeroMethod::RepStosb,
        ZeroMethod::Movnti,
        ZeroMethod::SseNonTemporal,
        ZeroMethod::SseStore,
    ];

    /// Short name, for the `mm.zero=` command-line option.
    pub fn id(self) -> &'static str {
        match self {
            ZeroMethod::RepStosq => "stosq",
            ZeroMethod::RepStosb => "stosb",
            ZeroMethod::Movnti => "movnti",
            ZeroMethod::SseNonTemporal => "movntdq",
            ZeroMethod::SseStore => "movdqa",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ZeroMethod::RepStosq => "rep stosq",
            ZeroMethod::RepStosb => "rep stosb",
            ZeroMethod::Movnti => "movnti",
            ZeroMethod::SseNonTemporal => "movntdq",
            ZeroMethod::SseStore => "movdqa",
        }
    }
}

static ZERO_METHOD: core::sync::atomic::AtomicU8 =
    core::sync::atomic::AtomicU8::new(ZeroMethod::RepStosq as u8);

/// Makes `Frame::zero` use `method` from now on (every CPU).
pub fn set_zero_method(method: ZeroMethod) {
    ZERO_METHOD.store(method as u8, core::sync::atomic::Ordering::Relaxed);
}

/// The method `Frame::zero` uses.
#[inline]
pub fn zero_method() -> ZeroMethod {
    let m = ZERO_METHOD.load(core::sync::atomic::Ordering::Relaxed);
    ZeroMethod::ALL
        .into_iter()
        .find(|x| *x as u8 == m)
        .unwrap_or(ZeroMethod::RepStosq)
}

/// A page of zeros from `$virt` in `PAGE_SIZE / 64` iterations of four 16-byte SSE stores
/// (`$store`: `movntdq` or `movdqa`), then `$fence` (empty, or `sfence` after
/// non-temporal stores). xmm0 is saved in `$save` (16 bytes) first and restored after:
/// it may hold a user thread's value (its registers stay loaded between its runs, see
/// `user::FpuState`). Expands to an `asm!` the caller wraps in `unsafe`.
macro_rules! sse_zero_loop {
    ($virt:expr, $save:expr, $store:literal, $fence:literal) => {
        core::arch::asm!(
            "movdqu [{s}], xmm0",
            "pxor xmm0, xmm0",
            "2:",
            concat!($store, " [{p}], xmm0"),
            concat!($store, " [{p} + 16], xmm0"),
            concat!($store, " [{p} + 32], xmm0"),
            concat!($store, " [{p} + 48], xmm0"),
            "add {p}, 64",
            "dec {n}",
            "jnz 2b",
            $fence,
            "movdqu xmm0, [{s}]",
            p = inout(reg) $virt => _,
            n = inout(reg) PAGE_SIZE / 64 => _,
            s = in(reg) $save,
            options(nostack)
        )
    };
}

/// Fills the 4 KiB page at virtual `virt` with zeros, with `method` (`Frame::zero`
/// passes the method chosen at boot).
///
/// # Safety
/// The caller must own the page (a frame it owns, reached through the HHDM): nothing
/// else may read or write it during the call.
pub unsafe fn zero_page_with(method: ZeroMethod, virt: u64) {
    debug_assert!(virt.is_multiple_of(PAGE_SIZE));
    // The SSE arms keep xmm0 here while they use the register.
    let mut xmm0 = [0u64; 2];
    let xmm0 = xmm0.as_mut_ptr();
    // SAFETY: (all arms) the caller owns the page; each loop writes exactly the PAGE_SIZE
    // bytes from `virt` (DF is clear, as the ABI guarantees). The SSE arms use xmm0,
    // which no kernel code holds a value in (the kernel is built without SSE); it may
    // hold a user thread's value, so they save it in `xmm0` (16 bytes of this frame)
    // and restore it. CR4.OSFXSR is set at CPU bring-up.
    // The non-temporal arms end with `sfence`, so the zeros are globally visible before
    // the frame is mapped or handed to another CPU.
    unsafe {
        match method {
            ZeroMethod::RepStosq => core::arch::asm!(
                "rep stosq",
                inout("rdi") virt => _,
                inout("rcx") PAGE_SIZE / 8 => _,
                in("rax") 0u64,
                options(nostack, preserves_flags)
            ),
            ZeroMethod::RepStosb => core::arch::asm!(
                "rep stosb",
                inout("rdi") virt => _,
                inout("rcx") PAGE_SIZE => _,
                in("al") 0u8,
                options(nostack, preserves_flags)
            ),
            ZeroMethod::Movnti => core::arch::asm!(
                "2:",
                "movnti [{p}], {z}",
                "movnti [{p} + 8], {z}",
                "movnti [{p} + 16], {z}",
                "movnti [{p} + 24], {z}",
                "movnti [{p} + 32], {z}",
                "movnti [{p} + 40], {z}",
                "movnti [{p} + 48], {z}",
                "movnti [{p} + 56], {z}",
                "add {p}, 64",
                "dec {n}",
                "jnz 2b",
                "sfence",
                p = inout(reg) virt => _,
                n = inout(reg) PAGE_SIZE / 64 => _,
                z = in(reg) 0u64,
                options(nostack)
            ),
            ZeroMethod::SseNonTemporal => sse_zero_loop!(virt, xmm0, "movntdq", "sfence"),
            ZeroMethod::SseStore => sse_zero_loop!(virt, xmm0, "movdqa", ""),
        }
    }
}
