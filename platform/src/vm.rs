//! User address spaces as the hardware sees them: a page-table hierarchy that owns the
//! frames it maps, the CPUs that may cache its translations, and the shootdown that
//! keeps a frame in use until every one of them has flushed.
//!
//! `VmSpace` is the only way code above this crate changes a user page table, and every
//! way it offers is safe whatever the caller does:
//! - with the tables locked (`VmSpace::lock`, a cursor over them), a page is mapped
//!   from an owned frame whose contents the type states: `UserTables::map_zeroed` takes
//!   a `ZeroedFrame` (the fault path), `map_filled` a `FilledFrame` (the loader's
//!   segment pages); a plain `Frame` cannot be mapped. The tables own the frame from
//!   then on (`tables::OwnedTables`, the one place a frame becomes an entry's number
//!   and back). User rights only: no physical address can be mapped that the caller
//!   does not own, and nothing is mapped into the kernel half;
//! - unmapping and protecting exist only on `VmSpace`: `unmap` hands back the frames in
//!   an `Unmapped` batch that frees them only after every CPU that may hold the old
//!   translation has flushed (`Unmapped::finish`, or its drop); `unmap_range` and
//!   `protect_range` flush before they return;
//! - user memory is copied (`UserTables::read`/`write`, or `UserCopy` a page piece at
//!   a time), never borrowed: another user thread may write the same bytes at any
//!   moment, and a Rust reference over them would be undefined behaviour. The copy runs
//!   with the table lock held, so the frame cannot be unmapped and reused under it; it
//!   takes a `UserRange` (`panda_arch::addr`), so it reaches only the user half;
//! - a CPU loads the space with `activate`; dropping the space first moves every CPU
//!   that may still have it loaded back to the kernel's tables.
//!
//! The policy (which addresses are valid, demand-zero faults, brk, buffers) is the
//! kernel's (`kernel/src/aspace.rs`) over `panda-mm`'s region bookkeeping.

use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use panda_mm::region::{Access, Rights};
use panda_mm::tlb::{CpuMask, FlushBatch, FlushScope, SwitchFlush, TlbState};
use panda_mm::{CpuId, PerCpu, MAX_CPUS};

use crate::cpu;
use crate::frame::{self, FilledFrame, Frame, ZeroedFrame};
use crate::ipi;
use crate::sync::{Mutex, MutexGuard, Rank};
use crate::tables::OwnedTables;
pub use panda_arch::addr::{UserAddr, UserRange};
use panda_arch::paging::{flags, MapError};
// Nothing at or above `USER_END` (the user half's end) is ever mapped into a user
// space by this module.
use panda_arch::{page_floor, percpu, HHDM_BASE, PAGE_SIZE, USER_END};

/// Lock ranks of this module (the kernel's others are in `kernel/src/locks.rs`;
/// docs/LOCKING.md has the whole order).
pub static TABLES: Rank = Rank::new(50, "VmSpace::tables");
/// One initiating CPU's shootdown request: the pages its targets flush.
pub static SCOPE: Rank = Rank::new(65, "vm::SCOPES[cpu]");
/// The space each CPU last activated.
pub static CURRENT: Rank = Rank::new(70, "vm::CURRENT");

/// Most page slots one unmap batch looks at (so at most as many frames it frees): the
/// table lock is held, and the shootdown waited for, one batch at a time.
pub const UNMAP_BATCH: usize = 512;

/// Page-table bits of a user page with `rights`.
fn leaf_bits(rights: Rights) -> u64 {
    let mut bits = flags::USER;
    if rights.write {
        bits |= flags::WRITABLE;
    }
    if !rights.execute {
        bits |= panda_arch::paging::nx_bit();
    }
    bits
}

/// Copies `n` bytes between kernel memory and a user frame reached through the HHDM.
/// Written in assembly so that a user thread writing the same bytes at the same time
/// is not a data race in Rust's sense (it only changes which bytes are copied).
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` bytes, and they must not overlap.
unsafe fn copy_bytes(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's guarantee; DF is clear (the ABI guarantees it in kernel code).
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) n % 8,
            inout("rcx") n / 8 => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        )
    };
}

/// The page tables of one user space, reached only with its lock held (`VmSpace::lock`).
pub struct UserTables {
    tables: OwnedTables,
}

impl UserTables {
    /// The physical address and leaf bits `virt` maps to, if any.
    pub fn translate(&self, virt: u64) -> Option<(u64, u64)> {
        self.tables.translate(virt)
    }

    /// Whether `addr`'s page is mapped for user access (and writable, if `write`).
    pub fn user_can(&self, addr: UserAddr, write: bool) -> bool {
        self.user_frame(addr, write).is_some()
    }

    /// The physical address `addr` maps to, if its page is mapped for user access (and
    /// writable, if `write`): one walk of the tables. (`addr` is in the user half by
    /// its type: a kernel address cannot be asked about.)
    fn user_frame(&self, addr: UserAddr, write: bool) -> Option<u64> {
        let need = if write {
            flags::USER | flags::WRITABLE
        } else {
            flags::USER
        };
        self.tables
            .translate(addr.get())
            .filter(|&(_, bits)| bits & need == need)
            .map(|(phys, _)| phys)
    }

    /// Maps the zeroed `frame` at the page `virt` with user `rights` (a demand-zero
    /// fault: the user sees only zeros); the tables own it from now on (unmapping or
    /// tearing the space down frees it). On failure the frame is freed:
    /// `AlreadyMapped` if the page is mapped, `OutOfFrames` if a page-table frame could
    /// not be had, `Misaligned` for an address outside the user half.
    pub fn map_zeroed(
        &mut self,
        virt: u64,
        frame: ZeroedFrame,
        rights: Rights,
    ) -> Result<(), MapError> {
        self.map(virt, frame.into_inner(), rights)
    }

    /// `map_zeroed` for a frame the kernel filled (an ELF segment's page with the
    /// file's bytes over zeros).
    pub fn map_filled(
        &mut self,
        virt: u64,
        frame: FilledFrame,
        rights: Rights,
    ) -> Result<(), MapError> {
        self.map(virt, frame.into_inner(), rights)
    }

    fn map(&mut self, virt: u64, frame: Frame, rights: Rights) -> Result<(), MapError> {
        let page = page_floor(virt);
        if page >= USER_END {
            return Err(MapError::Misaligned {
                virt,
                phys: frame.phys(),
            });
        }
        // One walk: `map` itself refuses a page that is mapped already (a 4 KiB entry,
        // or a huge one on the way), without changing any table.
        let result = self.tables.map(page, frame, leaf_bits(rights));
        result.map_err(|e| match e {
            MapError::AlreadyMapped { .. } => MapError::AlreadyMapped { virt: page },
            other => other,
        })
    }

    /// How many page tables a `map` of `virt` would have to add (0 to 3): with the
    /// leaf, the frames the mapping would newly hold.
    pub fn tables_missing(&self, virt: u64) -> u64 {
        self.tables.path(virt)[1..]
            .iter()
            .filter(|t| t.is_none())
            .count() as u64
    }

    /// Frames the hierarchy holds: mapped user pages, their tables and the PML4 (one
    /// walk of the user half; for checks, not for hot paths).
    pub fn frames_held(&self) -> u64 {
        self.tables.count_user_frames()
    }

    /// Copies the user memory `from` into `out` (as long as `from`), as a user read
    /// would see it. Stops at the first page not mapped user-readable: `Err(bytes
    /// copied)`; `Err(0)` if the lengths differ.
    pub fn read(&self, from: UserRange, out: &mut [u8]) -> Result<(), usize> {
        UserCopy::from_user(from, out).ok_or(0usize)?.run(self)
    }

    /// Copies `bytes` to the user memory `to` (as long as `bytes`), where the user may
    /// write. Stops at the first page not mapped user-writable: `Err(bytes copied)`;
    /// `Err(0)` if the lengths differ.
    pub fn write(&self, to: UserRange, bytes: &[u8]) -> Result<(), usize> {
        UserCopy::to_user(to, bytes).ok_or(0usize)?.run(self)
    }
}

/// What a `UserCopy` does with each piece of its range.
enum Transfer<'a> {
    /// Nothing: only check that the user could access it (`write`: write it).
    Check { write: bool },
    /// User memory into this kernel buffer.
    FromUser(&'a mut [u8]),
    /// This kernel buffer into user memory.
    ToUser(&'a [u8]),
}

/// A copy between kernel memory and a `UserRange` (or a check of the range's rights),
/// made one page piece at a time by `step`, each with the tables locked by the caller:
/// the kernel's copy loop (`AddressSpace::copy_user`) takes the lock per piece, and
/// between pieces resolves a fault at `next()` or gives its CPU's other tasks a turn.
/// Every piece is checked against the page's user rights (one walk), so no byte the
/// user could not read (or write) that way is copied.
pub struct UserCopy<'a> {
    /// What is still to copy.
    rest: UserRange,
    /// Bytes copied so far (the offset into the kernel buffer).
    done: usize,
    transfer: Transfer<'a>,
}

impl<'a> UserCopy<'a> {
    /// A check that the user could read (`write`: write) every byte of `range`.
    pub fn check(range: UserRange, write: bool) -> Self {
        Self {
            rest: range,
            done: 0,
            transfer: Transfer::Check { write },
        }
    }

    /// A copy of `from` into `out`; `None` unless they are as long.
    pub fn from_user(from: UserRange, out: &'a mut [u8]) -> Option<Self> {
        (out.len() as u64 == from.len()).then_some(Self {
            rest: from,
            done: 0,
            transfer: Transfer::FromUser(out),
        })
    }

    /// A copy of `bytes` to `to`; `None` unless they are as long.
    pub fn to_user(to: UserRange, bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() as u64 == to.len()).then_some(Self {
            rest: to,
            done: 0,
            transfer: Transfer::ToUser(bytes),
        })
    }

    /// Whether the user access each piece is checked against is a write.
    pub fn writes(&self) -> bool {
        match self.transfer {
            Transfer::Check { write } => write,
            Transfer::FromUser(_) => false,
            Transfer::ToUser(_) => true,
        }
    }

    /// The first byte not yet copied (where a fault must be resolved when `step` finds
    /// its page inaccessible), or `None` when the copy is done.
    pub fn next(&self) -> Option<UserAddr> {
        self.rest.first()
    }

    /// Copies the next piece (at most to the end of `next()`'s page) if the user could
    /// access its page that way, and says whether it did; if not, nothing is copied
    /// and the copy stays where it was. `true` when the copy is done already.
    pub fn step(&mut self, tables: &UserTables) -> bool {
        let Some(at) = self.rest.first() else {
            return true;
        };
        let (piece, rest) = self.rest.split_at(at.to_page_end());
        let Some(phys) = tables.user_frame(at, self.writes()) else {
            return false;
        };
        let (from, n) = (self.done, piece.len() as usize);
        match &mut self.transfer {
            Transfer::Check { .. } => {}
            // SAFETY: `phys..phys + n` lies in one frame (the piece ends at its page's
            // end) that `tables` owns and keeps mapped while the borrow (the table
            // lock) lasts; the HHDM maps it; `out[from..from + n]` is in bounds (`out`
            // is as long as the range) and is kernel memory, which no user frame
            // overlaps.
            Transfer::FromUser(out) => unsafe {
                copy_bytes(
                    out[from..from + n].as_mut_ptr(),
                    (HHDM_BASE + phys) as *const u8,
                    n,
                )
            },
            // SAFETY: as above; the frame is a user-writable page of this space
            // (`user_frame` checked), so writing it touches nothing the kernel owns.
            Transfer::ToUser(bytes) => unsafe {
                copy_bytes(
                    (HHDM_BASE + phys) as *mut u8,
                    bytes[from..from + n].as_ptr(),
                    n,
                )
            },
        }
        self.done += n;
        self.rest = rest;
        true
    }

    /// Steps to the end in `tables` (one lock held throughout): `Err(bytes copied)` at
    /// the first page the user could not access that way.
    fn run(mut self, tables: &UserTables) -> Result<(), usize> {
        while self.rest.first().is_some() {
            if !self.step(tables) {
                return Err(self.done);
            }
        }
        Ok(())
    }
}

/// One user address space's hardware side.
pub struct VmSpace {
    root: u64,
    tables: Mutex<Option<UserTables>>,
    tlb: TlbState,
}

/// `VmSpace::lock`'s guard: the tables (`None` once the space is being torn down).
pub type TablesGuard<'a> = MutexGuard<'a, Option<UserTables>>;

impl VmSpace {
    /// An empty space sharing the kernel half (`None` if no frame could be had).
    pub fn new() -> Option<Arc<Self>> {
        let tables = OwnedTables::new()?;
        Some(Arc::new(Self {
            root: tables.root(),
            tables: Mutex::new(&TABLES, Some(UserTables { tables })),
            tlb: TlbState::new(),
        }))
    }

    /// The tables, locked.
    pub fn lock(&self) -> TablesGuard<'_> {
        self.tables.lock()
    }

    /// Frames the hierarchy holds (`UserTables::frames_held`; 0 once torn down).
    pub fn frames_held(&self) -> u64 {
        self.tables
            .lock()
            .as_ref()
            .map_or(0, UserTables::frames_held)
    }

    /// Whether this space is the calling CPU's current one.
    pub fn is_current(&self) -> bool {
        panda_arch::paging::active_root() == self.root
    }

    /// The CPUs that may hold this space's translations now (its shootdown targets).
    pub fn active_cpus(&self) -> CpuMask {
        self.tlb.active()
    }

    /// Makes this space current on the calling CPU. The space it replaces there (if
    /// any) learns that this CPU left it, so its shootdowns stop targeting this CPU.
    pub fn activate(self: &Arc<Self>) {
        let cpu = cpu::current();
        let decision = self.tlb.on_switch_in(cpu);
        // SAFETY: the hierarchy shares the kernel half, so everything the kernel uses
        // stays mapped; it stays alive while loaded (dropping it first moves every CPU
        // that may have it loaded away). Without PCID the CR3 load flushes this CPU's
        // user entries, which also covers a `Flush` decision.
        unsafe { panda_arch::paging::switch_to(self.root) };
        if decision == SwitchFlush::Flush {
            panda_arch::paging::flush_user();
        }
        // After the CR3 load: this CPU can no longer use the previous space's entries.
        let previous = CURRENT_SPACE[cpu].lock().replace(Arc::downgrade(self));
        if let Some(prev) = previous.and_then(|w| w.upgrade()) {
            if !Arc::ptr_eq(&prev, self) {
                prev.tlb.on_switch_out(cpu);
            }
        }
    }

    /// Returns the calling CPU to the kernel's own tables.
    pub fn deactivate(&self) {
        panda_arch::kernel_tables::load();
        let cpu = cpu::current();
        self.tlb.on_switch_out(cpu);
        let mut current = CURRENT_SPACE[cpu].lock();
        if current
            .as_ref()
            .is_some_and(|w| core::ptr::eq(w.as_ptr(), self))
        {
            *current = None;
        }
    }

    /// Unmaps every mapped page in `[from, to)` and shoots their translations down;
    /// the frames and emptied tables are freed once every CPU that may cache them has
    /// flushed. In batches (`unmap`) without a break: for ranges the caller knows to be
    /// small (a segment); large ones go batch by batch with yields between.
    /// Returns how many frames the hierarchy gave up (pages and tables).
    pub fn unmap_range(&self, from: u64, to: u64) -> u64 {
        let mut at = from;
        let mut freed = 0;
        loop {
            let (next, n) = self.unmap(at, to).finish();
            freed += n;
            match next {
                Some(next) => at = next,
                None => return freed,
            }
        }
    }

    /// Unmaps the first batch of `[from, to)`: at most `UNMAP_BATCH` page slots, so at
    /// most that many frames, with the table lock held only for the unmap. The batch's
    /// frames (in a `FlushBatch` of fixed capacity, allocated before the lock is taken)
    /// and emptied tables come back in `Unmapped`, which shoots the pages down and
    /// frees them only then (`finish`, or when it is dropped). Each batch is complete in
    /// itself: a caller that stops between two leaves the rest mapped (and owned by the
    /// tables, which free it when the space is dropped).
    pub fn unmap(&self, from: u64, to: u64) -> Unmapped<'_> {
        let mut batch: FlushBatch<Frame> = FlushBatch::with_capacity(UNMAP_BATCH);
        // Emptied tables: at most one last-level table per batch, plus the upper ones
        // it may leave empty.
        let mut tables: [Option<Frame>; 8] = Default::default();
        let mut emptied = 0;
        let mut pages = 0u64;
        let next = {
            let mut guard = self.tables.lock();
            let Some(t) = guard.as_mut() else {
                return Unmapped {
                    space: self,
                    batch: None,
                    tables,
                    next: None,
                    frames: 0,
                };
            };
            t.tables.unmap_range(
                from,
                to.min(USER_END),
                UNMAP_BATCH,
                &mut |page, frame| {
                    pages += 1;
                    batch.add(page, Some(frame))
                },
                &mut |table| {
                    match tables.get_mut(emptied) {
                        Some(slot) => *slot = Some(table),
                        // More than the walk can empty in one batch; never freeing
                        // it early is the safe outcome.
                        None => core::mem::forget(table),
                    }
                    emptied += 1;
                },
            )
        };
        Unmapped {
            space: self,
            batch: Some(batch),
            tables,
            next,
            frames: pages + emptied as u64,
        }
    }

    /// Gives the mapped pages of `[from, to)` the user `rights`; every CPU running the
    /// space flushes them before this returns.
    pub fn protect_range(&self, from: u64, to: u64, rights: Rights) {
        let bits = leaf_bits(rights);
        let mut batch: FlushBatch<Frame> = FlushBatch::default();
        {
            let mut guard = self.tables.lock();
            let Some(t) = guard.as_mut() else { return };
            let mut page = page_floor(from);
            while page < to.min(USER_END) {
                if t.tables.protect(page, bits) {
                    batch.add(page, None);
                }
                page += PAGE_SIZE;
            }
        }
        self.shoot_down(batch);
    }

    fn shoot_down(&self, batch: FlushBatch<Frame>) {
        let me = cpu::current();
        let pending = batch.commit(&self.tlb, me);
        // This CPU's request slot: shootdowns started on different CPUs (of one space
        // or of different ones) run in parallel; one CPU runs one at a time.
        let slot = &SCOPES[me];
        let in_flight = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        MOST_IN_FLIGHT.fetch_max(in_flight, Ordering::SeqCst);
        *slot.lock() = match pending.scope() {
            FlushScope::Pages(pages) => Some(pages.clone()),
            FlushScope::Everything => None,
        };
        if pending.flush_locally() {
            flush_scope(me.index() as u64);
        }
        // All targets flush in parallel; `call_on_set` returns once every online one
        // has. An offline CPU cannot hold translations: it counts as flushed too.
        let targets = pending.targets();
        SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
        SHOOTDOWN_IPIS.fetch_add(targets.iter().count() as u64, Ordering::Relaxed);
        ipi::call_on_set(
            |c| CpuId::new(c).is_some_and(|c| targets.contains(c)),
            flush_scope,
            me.index() as u64,
        );
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        let mut acked = CpuMask::default();
        for cpu in targets.iter() {
            self.tlb.acknowledge(cpu, pending.generation());
            acked.insert(cpu);
        }
        match pending.complete(&acked) {
            // Many frames (a heap shrink): to the global allocator in one go; a few:
            // through this CPU's cache like any free.
            Ok(frames) if frames.len() > 64 => frame::free_many(frames),
            Ok(frames) => drop(frames),
            // Every target is in `acked`, so this does not happen; if it did, leaking
            // the frames is the safe outcome, never reusing them early.
            Err(pending) => {
                log::error!(target: "mm", "shootdown incomplete: frames leaked");
                core::mem::forget(pending);
            }
        }
    }
}

impl Drop for VmSpace {
    fn drop(&mut self) {
        // CPUs whose last activated space this was hold a weak reference to it, which
        // would keep its memory allocated: let go of them.
        for slot in CURRENT_SPACE.iter().take(percpu::online_count()) {
            let mut current = slot.lock();
            if current
                .as_ref()
                .is_some_and(|w| core::ptr::eq(w.as_ptr(), self))
            {
                *current = None;
            }
        }
        // No CPU may keep a freed PML4 in CR3: every CPU that may still run this space
        // (it ran a thread and has not switched since) leaves it first.
        let active = self.tlb.active();
        ipi::call_on_set(
            |c| CpuId::new(c).is_some_and(|c| active.contains(c)),
            leave_space,
            self.root,
        );
        leave_space(self.root);
        // No CPU has the hierarchy loaded any more.
        if let Some(t) = self.tables.lock().take() {
            t.tables.tear_down();
        }
    }
}

/// One batch `VmSpace::unmap` took out of the tables: its pages' frames (with the pages
/// to flush) and the tables it emptied, still owned here. They are freed only after the
/// shootdown, which `finish` runs (and the drop, if `finish` was not called: a batch is
/// never freed early, and never kept mapped in a TLB).
#[must_use = "the frames are freed only after the shootdown: call `finish`"]
pub struct Unmapped<'a> {
    space: &'a VmSpace,
    batch: Option<FlushBatch<Frame>>,
    tables: [Option<Frame>; 8],
    next: Option<u64>,
    frames: u64,
}

impl Unmapped<'_> {
    /// Where the next batch of the range starts (`None`: the range is done).
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Frames the hierarchy gave up in this batch (pages and tables).
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Shoots the batch's pages down on every CPU that may cache them, then frees the
    /// frames and tables. Returns `(next, frames)`.
    pub fn finish(mut self) -> (Option<u64>, u64) {
        self.flush();
        (self.next, self.frames)
    }

    fn flush(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.space.shoot_down(batch);
        }
        // Table pages too could be cached (paging-structure caches): freed only after
        // the flush as well.
        self.tables = Default::default();
    }
}

impl Drop for Unmapped<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The user space each CPU last activated (to tell it when the CPU leaves).
static CURRENT_SPACE: PerCpu<Mutex<Option<Weak<VmSpace>>>> =
    PerCpu::new([const { Mutex::new(&CURRENT, None) }; MAX_CPUS]);

/// Per initiating CPU, the pages its shootdown in progress flushes (`None`: everything).
/// A CPU runs one shootdown at a time, to the end, so one slot each suffices, and the
/// cross-CPU call names the slot by the initiator's index.
static SCOPES: PerCpu<Mutex<Option<Vec<u64>>>> =
    PerCpu::new([const { Mutex::new(&SCOPE, None) }; MAX_CPUS]);

static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
static SHOOTDOWN_IPIS: AtomicU64 = AtomicU64::new(0);
/// Shootdowns running now, and the most that ever ran at once.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static MOST_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Shootdowns run, and the cross-CPU flushes they asked for.
pub fn shootdown_counts() -> (u64, u64) {
    (
        SHOOTDOWNS.load(Ordering::Relaxed),
        SHOOTDOWN_IPIS.load(Ordering::Relaxed),
    )
}

/// The most shootdowns that ran at the same time since the last `take_…`.
pub fn most_shootdowns_in_flight() -> usize {
    MOST_IN_FLIGHT.load(Ordering::SeqCst)
}

/// `most_shootdowns_in_flight`, and resets it.
pub fn take_most_shootdowns_in_flight() -> usize {
    MOST_IN_FLIGHT.swap(0, Ordering::SeqCst)
}

/// A check run inside every flush, before it flushes (in-kernel tests: it proves the
/// unmapped frames are still in use while any target has not yet flushed).
static FLUSH_PROBE: spin::Once<fn()> = spin::Once::new();
static FLUSH_PROBE_ON: AtomicBool = AtomicBool::new(false);

/// Runs `probe` inside every shootdown flush (on each target CPU and the initiator)
/// while `on`. The probe is set once; later calls only switch it.
pub fn set_flush_probe(probe: fn(), on: bool) {
    FLUSH_PROBE.call_once(|| probe);
    FLUSH_PROBE_ON.store(on, Ordering::SeqCst);
}

/// Runs on each target (and the initiator): flushes the pages in CPU `initiator`'s
/// request slot, or the whole TLB.
fn flush_scope(initiator: u64) -> u64 {
    if FLUSH_PROBE_ON.load(Ordering::Relaxed) {
        if let Some(probe) = FLUSH_PROBE.get() {
            probe();
        }
    }
    // The initiator's number came over the cross-CPU call as a `u64`: checked again.
    let Some(slot) = CpuId::new(initiator as usize).map(|c| &SCOPES[c]) else {
        panda_arch::paging::flush_user();
        return 0;
    };
    match slot.lock().as_ref() {
        Some(pages) => pages
            .iter()
            .for_each(|&p| panda_arch::paging::flush_page(p)),
        None => panda_arch::paging::flush_user(),
    }
    0
}

/// Runs on a CPU that may still have the dying space `root` loaded (a thread ran there
/// and moved on): switches it to the kernel's tables.
fn leave_space(root: u64) -> u64 {
    if panda_arch::paging::active_root() == root {
        panda_arch::kernel_tables::load();
    }
    0
}
