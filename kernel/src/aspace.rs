//! User address spaces: a page-table hierarchy per process over `panda-mm`'s region
//! and shootdown bookkeeping.
//!
//! Each space owns a PML4 whose kernel half (slots 256..511) is copied from the kernel's
//! and therefore shared. Faults in demand-zero regions map a frame from the zeroed pool
//! (or a freshly zeroed one), under the page-table lock, so two faults on one page end
//! with one mapping. Shrinking the heap unmaps pages and runs the shootdown protocol:
//! CPUs running the space now flush (cross-CPU calls), the others catch up at their
//! next switch, and the frames are freed only after every target acknowledged.
//! Dropping the space frees every frame and table page. User threads reach it through
//! `process` (faults from ring 3, brk, buffers); the in-kernel tests drive it directly.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use panda_arch::paging::{flags, FrameSource, PageSize, TableBuilder};
use panda_arch::{ipi, percpu};
use panda_mm::region::{Access, FaultDecision, Regions, Rights};
use panda_mm::tlb::{CpuMask, FlushBatch, FlushScope, SwitchFlush, TlbState};
use panda_mm::{MmError, PhysFrame};

use panda_arch::sync::{Mutex, RwLock};

use crate::{kernel_tables, locks, memory};

/// Page-table frames from the frame allocator, zeroed.
struct TableFrames;

impl FrameSource for TableFrames {
    fn zeroed_frame(&mut self) -> Option<u64> {
        // User page tables are user memory: refused below the kernel's reserve.
        let frame = memory::alloc_user_frame()?;
        memory::zero(frame);
        Some(frame.addr())
    }
}

/// Counters of the fault and shootdown paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Demand-zero faults that mapped a frame, of which `PoolHits` took one from the
    /// pool at once, `PoolWaits` awaited the zeroing task, and `ZeroedInline` zeroed
    /// one on the spot.
    Faults,
    PoolHits,
    PoolWaits,
    ZeroedInline,
    /// Shootdowns run, and the cross-CPU flushes they asked for.
    Shootdowns,
    ShootdownIpis,
    /// Cycle sums of the user fault path (see `SystemInfo`): handler, classify,
    /// inline zeroing, mapping, and the faults they cover.
    ProfHandler,
    ProfClassify,
    ProfZero,
    ProfMap,
    ProfFaults,
}

const STATS: usize = Stat::ProfFaults as usize + 1;

/// The counters, one set per CPU on its own cache lines: the fault path updates only
/// its CPU's, so counting never makes CPUs fight over a shared line; `stat` sums them.
static STAT: [CachePadded<[AtomicU64; STATS]>; panda_sched::MAX_CPUS] =
    [const { CachePadded::new([const { AtomicU64::new(0) }; STATS]) }; panda_sched::MAX_CPUS];

fn add(stat: Stat, n: u64) {
    let cpu = percpu::current_index().min(STAT.len() - 1);
    STAT[cpu][stat as usize].fetch_add(n, Ordering::Relaxed);
}

fn count(stat: Stat) {
    add(stat, 1);
}

/// A counter's total over every CPU.
pub fn stat(stat: Stat) -> u64 {
    STAT.iter()
        .take(percpu::online_count().max(1))
        .map(|c| c[stat as usize].load(Ordering::Relaxed))
        .sum()
}

fn tsc() -> u64 {
    panda_arch::cpu::rdtsc()
}

/// A frame zeroed on the spot (the pool had none); refused below the kernel's reserve.
fn zero_now() -> Result<PhysFrame, FaultError> {
    let t0 = tsc();
    let frame = memory::alloc_user_frame().ok_or(FaultError::OutOfMemory)?;
    memory::zero(frame);
    count(Stat::ZeroedInline);
    add(Stat::ProfZero, tsc() - t0);
    Ok(frame)
}

/// A frame from CPU `cpu`'s zeroed pool, if it has one (counted as a pool hit).
fn pooled_frame(cpu: usize) -> Option<PhysFrame> {
    let frame = memory::zero_pools()?.try_take(cpu)?.into_frame();
    count(Stat::PoolHits);
    Some(frame)
}

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

/// `memory::free` by physical address (the page-table walkers report frames as such).
fn free_frame(phys: u64) {
    if let Some(frame) = PhysFrame::from_addr(phys) {
        memory::free(frame);
    }
}

/// Why a fault was not resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// The access is not allowed there (the region bookkeeping's verdict).
    Denied(FaultDecision),
    /// Valid, but no frame could be had: memory is exhausted.
    OutOfMemory,
}

/// One user address space.
pub struct AddressSpace {
    root: u64,
    tables: Mutex<Option<TableBuilder>>,
    /// Read by every fault (concurrently), written by layout changes.
    regions: RwLock<Regions>,
    /// Bumped by every layout change (before its unmap): a fault that classified its
    /// address under an unchanged generation need not classify again to map.
    layout_gen: AtomicU64,
    /// Serialises changes of the layout that unmap (brk, buffer free, protect) with
    /// each other and with buffer allocation, so a range is never handed out again
    /// before its old pages are unmapped and shot down.
    layout: Mutex<()>,
    tlb: TlbState,
}

impl AddressSpace {
    /// An empty space sharing the kernel half.
    pub fn new() -> Result<Arc<Self>, MmError> {
        let hhdm = panda_arch::HHDM_BASE;
        let mut tables =
            TableBuilder::new(&mut TableFrames, hhdm).map_err(|_| MmError::OutOfMemory)?;
        tables.share_kernel_half(kernel_tables::kernel_root());
        Ok(Arc::new(Self {
            root: tables.root(),
            tables: Mutex::new(&locks::TABLES, Some(tables)),
            regions: RwLock::new(&locks::REGIONS, Regions::new()),
            layout_gen: AtomicU64::new(0),
            layout: Mutex::new(&locks::LAYOUT, ()),
            tlb: TlbState::new(),
        }))
    }

    /// Adds an ELF segment `[start, end)` with `rights` (the loader, before the first
    /// thread runs). Like every layout change, it bumps the layout generation.
    pub fn add_segment(&self, start: u64, end: u64, rights: Rights) -> Result<(), MmError> {
        let _layout = self.layout.lock();
        self.change_layout(|r| r.add_segment(start, end, rights).map(|_| ()))
    }

    /// The current break.
    pub fn brk(&self) -> u64 {
        self.regions.read().brk()
    }

    /// Changes the region layout (under the write lock) and bumps the generation.
    fn change_layout<R>(&self, f: impl FnOnce(&mut Regions) -> R) -> R {
        let mut regions = self.regions.write();
        let r = f(&mut regions);
        self.layout_gen.fetch_add(1, Ordering::Release);
        r
    }

    /// Whether this space is the calling CPU's current one.
    pub fn is_current(&self) -> bool {
        panda_arch::paging::active_root() == self.root
    }

    /// Makes this space current on the calling CPU. The space it replaces there (if
    /// any) learns that this CPU left it, so its shootdowns stop targeting this CPU:
    /// without this, a CPU stayed in the active set of every space it ever ran until
    /// a thread of that space ended on it, and received its shootdowns for nothing.
    pub fn activate(self: &Arc<Self>) {
        let cpu = percpu::current_index();
        let decision = self.tlb.on_switch_in(cpu);
        #[allow(unsafe_code)]
        // SAFETY: the hierarchy shares the kernel half, so everything the kernel uses
        // stays mapped; without PCID the CR3 load flushes this CPU's user entries, which
        // also covers a `Flush` decision.
        unsafe {
            panda_arch::paging::switch_to(self.root)
        };
        if decision == SwitchFlush::Flush {
            panda_arch::paging::flush_user();
        }
        // After the CR3 load: this CPU can no longer use the previous space's entries.
        let previous = CURRENT[cpu.min(CURRENT.len() - 1)]
            .lock()
            .replace(Arc::downgrade(self));
        if let Some(prev) = previous.and_then(|w| w.upgrade()) {
            if !Arc::ptr_eq(&prev, self) {
                prev.tlb.on_switch_out(cpu);
            }
        }
    }

    /// The CPUs that may hold this space's translations now (its shootdown targets).
    pub fn active_cpus(&self) -> CpuMask {
        self.tlb.active()
    }

    /// Returns the calling CPU to the kernel's own tables.
    pub fn deactivate(&self) {
        // SAFETY: the kernel's tables map everything the kernel uses.
        #[allow(unsafe_code)]
        unsafe {
            panda_arch::paging::switch_to(kernel_tables::kernel_root())
        };
        let cpu = percpu::current_index();
        self.tlb.on_switch_out(cpu);
        let mut current = CURRENT[cpu.min(CURRENT.len() - 1)].lock();
        if current
            .as_ref()
            .is_some_and(|w| core::ptr::eq(w.as_ptr(), self))
        {
            *current = None;
        }
    }

    /// Resolves a fault at `addr`: maps a zeroed frame if the address is valid for the
    /// access and not yet backed; otherwise says why not.
    pub fn handle_fault(&self, addr: u64, access: Access) -> Result<(), FaultError> {
        let generation = self.layout_gen.load(Ordering::Acquire);
        let rights = self.demand_zero_rights(addr, access)?;
        let cpu = percpu::current_index();
        let frame = match pooled_frame(cpu) {
            Some(frame) => frame,
            None => zero_now()?,
        };
        self.install(addr, frame, rights, generation)
    }

    /// `handle_fault` for the fault path of user threads: when this CPU's zeroed pool
    /// is empty and the CPU has other tasks to run, the thread's future awaits the
    /// pool — whose waiting call wakes the CPU's zeroing task — so the CPU runs its
    /// other tasks meanwhile and the thread resumes once a frame is zeroed for it.
    /// With nothing else to run, waiting would only add two task switches around the
    /// same zeroing, so the fault zeroes a frame on the spot (docs/MEMORY.md has the
    /// measurements). If memory is exhausted (the refill found no frame), the fault
    /// tries once itself and otherwise reports `OutOfMemory`. With zeroing paused
    /// (tests counting frames) it zeroes on the spot.
    pub async fn handle_fault_async(&self, addr: u64, access: Access) -> Result<(), FaultError> {
        let t0 = tsc();
        let result = self.handle_fault_inner(addr, access).await;
        if result.is_ok() {
            add(Stat::ProfHandler, tsc() - t0);
            count(Stat::ProfFaults);
        }
        result
    }

    async fn handle_fault_inner(&self, addr: u64, access: Access) -> Result<(), FaultError> {
        let t0 = tsc();
        let generation = self.layout_gen.load(Ordering::Acquire);
        let rights = self.demand_zero_rights(addr, access)?;
        add(Stat::ProfClassify, tsc() - t0);
        let cpu = percpu::current_index();
        let frame = match pooled_frame(cpu) {
            Some(frame) => frame,
            None => match (memory::zero_pools(), crate::executor::get()) {
                (Some(p), Some(exec)) if !memory::zeroing_paused() && exec.has_queued_work(cpu) => {
                    match p.take(cpu).await {
                        Some(z) => {
                            count(Stat::PoolWaits);
                            z.into_frame()
                        }
                        None => zero_now()?,
                    }
                }
                _ => zero_now()?,
            },
        };
        let t0 = tsc();
        let result = self.install(addr, frame, rights, generation);
        add(Stat::ProfMap, tsc() - t0);
        result
    }

    /// The rights of a demand-zero page at `addr`, or why there is none.
    fn demand_zero_rights(&self, addr: u64, access: Access) -> Result<Rights, FaultError> {
        match self.regions.read().classify(addr, access) {
            FaultDecision::DemandZero(rights) => Ok(rights),
            decision => Err(FaultError::Denied(decision)),
        }
    }

    /// Maps a zeroed `frame` at `addr`'s page unless another fault mapped it first (then
    /// the frame goes back and both faults resume on the one mapping).
    fn install(
        &self,
        addr: u64,
        frame: PhysFrame,
        rights: Rights,
        generation: u64,
    ) -> Result<(), FaultError> {
        let page = addr & !0xfff;
        let mut guard = self.tables.lock();
        // The region may have shrunk or been freed since the fault was classified (by
        // another thread): if the layout changed since, classify again with the tables
        // locked. An unmap that follows a layout change takes this lock too, so a page
        // either maps before it (and is unmapped by it) or sees the change here.
        let (bits, now) = if self.layout_gen.load(Ordering::Acquire) == generation {
            (leaf_bits(rights), FaultDecision::DemandZero(rights))
        } else {
            let access = if rights.write {
                Access::Write
            } else {
                Access::Read
            };
            match self.regions.read().classify(addr, access) {
                FaultDecision::DemandZero(current) => {
                    (leaf_bits(current), FaultDecision::DemandZero(current))
                }
                other => (0, other),
            }
        };
        let result = match guard.as_mut() {
            _ if bits == 0 => Err(FaultError::Denied(now)),
            // Being torn down.
            None => Err(FaultError::Denied(FaultDecision::OutsideRegions)),
            Some(tables) if tables.translate(page).is_some() => {
                drop(guard);
                free_frame(frame.addr());
                return Ok(());
            }
            // The only way `map` fails on an unmapped page is a page-table frame.
            Some(tables) => tables
                .map(page, frame.addr(), PageSize::Size4K, bits, &mut TableFrames)
                .map(|()| count(Stat::Faults))
                .map_err(|_| FaultError::OutOfMemory),
        };
        drop(guard);
        if result.is_err() {
            free_frame(frame.addr());
        }
        result
    }

    /// Maps `frame` at the page `virt` with `rights` (e.g. an ELF segment's page with
    /// its contents), taking ownership of the frame: tear-down frees it. The page must
    /// lie in a region that allows `rights` (the fault path would refuse it otherwise).
    pub fn map_frame(&self, virt: u64, frame: PhysFrame, rights: Rights) -> Result<(), MmError> {
        let mut guard = self.tables.lock();
        let tables = guard.as_mut().ok_or(MmError::Invalid)?;
        tables
            .map(
                virt & !0xfff,
                frame.addr(),
                PageSize::Size4K,
                leaf_bits(rights),
                &mut TableFrames,
            )
            .map_err(|e| match e {
                panda_arch::paging::MapError::OutOfFrames => MmError::OutOfMemory,
                _ => MmError::Invalid,
            })
    }

    /// Moves the break; shrinking unmaps the released pages and shoots down their TLB
    /// entries before freeing the frames. Returns the new break.
    pub fn set_brk(&self, new: u64) -> Result<u64, MmError> {
        let _layout = self.layout.lock();
        let released = self.change_layout(|r| r.set_brk(new))?;
        if let Some((from, to)) = released {
            self.unmap_range(from, to);
        }
        Ok(new)
    }

    /// Changes the rights of the segment at `start`; mapped pages get the new rights
    /// and every CPU running the space flushes them before this returns.
    pub fn protect_segment(
        &self,
        start: u64,
        rights: panda_mm::region::Rights,
    ) -> Result<(), MmError> {
        let _layout = self.layout.lock();
        let (from, to) = self.change_layout(|r| r.protect_segment(start, rights))?;
        let bits = leaf_bits(rights);
        let mut batch = FlushBatch::new();
        {
            let mut guard = self.tables.lock();
            let Some(tables) = guard.as_mut() else {
                return Ok(());
            };
            let mut page = from;
            while page < to {
                if tables.protect(page, bits) {
                    batch.add(page, None);
                }
                page += 4096;
            }
        }
        self.shoot_down(batch);
        Ok(())
    }

    /// Allocates a buffer of `size` bytes (page-rounded) in the buffer region; its pages
    /// are demand-zero. Returns its start.
    pub fn alloc_buffer(&self, size: u64) -> Result<u64, MmError> {
        let _layout = self.layout.lock();
        self.change_layout(|r| r.alloc_buffer(size))
    }

    /// Frees the buffer starting at `start`: unmaps its pages, shoots down their TLB
    /// entries, then frees the frames.
    pub fn free_buffer(&self, start: u64) -> Result<(), MmError> {
        let _layout = self.layout.lock();
        let (from, to) = self.change_layout(|r| r.free_buffer(start))?;
        self.unmap_range(from, to);
        Ok(())
    }

    /// Whether `[addr, addr + len)` lies inside one live buffer.
    pub fn in_buffer(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions
            .read()
            .buffers()
            .any(|(s, e)| s <= addr && end <= e)
    }

    /// Visits the user memory `[addr, addr + len)` page by page as the user would
    /// access it (`write` or read): a valid page not yet backed is faulted in first —
    /// awaiting a zeroed frame like a user fault — and `f(phys, offset, chunk)` runs
    /// with the page's table lock held, so the frame cannot be unmapped and freed
    /// while `f` reads or writes it through the HHDM. Anything the user could not
    /// access that way is an error, and nothing past it is visited.
    pub async fn access_user(
        &self,
        addr: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), FaultError> {
        let denied = FaultError::Denied(FaultDecision::OutsideRegions);
        let end = addr.checked_add(len).ok_or(denied)?;
        if end > panda_abi::USER_SPACE_END as u64 {
            return Err(denied);
        }
        let (access, need) = if write {
            (Access::Write, flags::USER | flags::WRITABLE)
        } else {
            (Access::Read, flags::USER)
        };
        let mut at = addr;
        let mut tries = 0;
        while at < end {
            let chunk = (end - at).min(4096 - (at & 0xfff));
            let visited = {
                let guard = self.tables.lock();
                match guard.as_ref().and_then(|t| t.translate(at)) {
                    Some((phys, bits)) if bits & need == need => {
                        f(phys, (at - addr) as usize, chunk as usize);
                        true
                    }
                    _ => false,
                }
            };
            if visited {
                at += chunk;
                tries = 0;
                continue;
            }
            // Mapped with fewer rights than the region gives cannot happen; a page
            // unmapped again by another thread right after the fault can, rarely.
            tries += 1;
            if tries > 4 {
                return Err(denied);
            }
            self.handle_fault_async(at, access).await?;
        }
        Ok(())
    }

    /// Visits `[addr, addr + len)` page by page like `access_user` (reads), without
    /// faulting anything in: with the table lock held for the whole range, runs
    /// `f(phys, offset, chunk)` per mapped piece and stops at the first page that is
    /// not mapped user-readable. Returns whether the whole range was visited.
    pub fn with_mapped_user(
        &self,
        addr: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize),
    ) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let guard = self.tables.lock();
        let Some(tables) = guard.as_ref() else {
            return false;
        };
        let mut at = addr;
        while at < end {
            let chunk = (end - at).min(4096 - (at & 0xfff));
            match tables.translate(at) {
                Some((phys, bits)) if bits & flags::USER != 0 => {
                    f(phys, (at - addr) as usize, chunk as usize)
                }
                _ => return false,
            }
            at += chunk;
        }
        true
    }

    /// Unmaps every mapped page in `[from, to)`, then runs the shootdown.
    fn unmap_range(&self, from: u64, to: u64) {
        let mut batch = FlushBatch::new();
        let mut tables_freed = Vec::new();
        {
            let mut guard = self.tables.lock();
            let Some(tables) = guard.as_mut() else { return };
            tables.unmap_range(
                from,
                to,
                &mut |page, phys| batch.add(page, PhysFrame::from_addr(phys)),
                &mut |t| tables_freed.push(t),
            );
        }
        self.shoot_down(batch);
        // Table pages too could be cached (paging-structure caches): free them only
        // after the flush as well.
        for t in tables_freed {
            free_frame(t);
        }
    }

    fn shoot_down(&self, batch: FlushBatch) {
        let me = percpu::current_index();
        let pending = batch.commit(&self.tlb, me);
        // This CPU's request slot: shootdowns started on different CPUs (of different
        // spaces; one space's are serialised by its layout lock) run in parallel.
        let Some(slot) = SCOPES.get(me) else {
            return;
        };
        let in_flight = SHOOTDOWNS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        MOST_SHOOTDOWNS_IN_FLIGHT.fetch_max(in_flight, Ordering::SeqCst);
        *slot.lock() = match pending.scope() {
            FlushScope::Pages(pages) => Some(pages.clone()),
            FlushScope::Everything => None,
        };
        if pending.flush_locally() {
            flush_scope(me as u64);
        }
        // All targets flush in parallel; `call_on_set` returns once every online one
        // has. An offline CPU cannot hold translations: it counts as flushed too.
        let targets = pending.targets();
        count(Stat::Shootdowns);
        add(Stat::ShootdownIpis, targets.iter().count() as u64);
        ipi::call_on_set(|c| targets.contains(c), flush_scope, me as u64);
        SHOOTDOWNS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        let mut acked = CpuMask::default();
        for cpu in targets.iter() {
            self.tlb.acknowledge(cpu, pending.generation());
            acked.insert(cpu);
        }
        match pending.complete(&acked) {
            // Many frames (a heap shrink): to the global allocator in one go; a few:
            // through this CPU's cache like any free.
            Ok(frames) if frames.len() > 64 => {
                if let Some(all) = memory::frames() {
                    let mut addrs: Vec<u64> = frames.iter().map(|f| f.addr()).collect();
                    let rejected = all.free_many(&mut addrs);
                    if rejected > 0 {
                        log::error!(target: "mm", "{rejected} frames freed twice or never allocated");
                    }
                }
            }
            Ok(frames) => frames.into_iter().for_each(|f| free_frame(f.addr())),
            // Every target is in `acked`, so this does not happen; if it did, leaking
            // the frames is the safe outcome, never reusing them early.
            Err(_) => log::error!(target: "mm", "shootdown incomplete: frames leaked"),
        }
    }

    /// Physical frame and flags `virt` maps to, if any.
    pub fn translate(&self, virt: u64) -> Option<(u64, u64)> {
        self.tables.lock().as_ref().and_then(|t| t.translate(virt))
    }
}

/// The user space each CPU last activated (to tell it when the CPU leaves).
static CURRENT: [Mutex<Option<alloc::sync::Weak<AddressSpace>>>; panda_sched::MAX_CPUS] =
    [const { Mutex::new(&locks::CURRENT, None) }; panda_sched::MAX_CPUS];

/// Per initiating CPU, the pages its shootdown in progress flushes (`None`: everything).
/// A CPU runs one shootdown at a time, to the end, so one slot each suffices, and the
/// cross-CPU call names the slot by the initiator's index.
static SCOPES: [Mutex<Option<Vec<u64>>>; panda_sched::MAX_CPUS] =
    [const { Mutex::new(&locks::SCOPE, None) }; panda_sched::MAX_CPUS];

/// Shootdowns running now, and the most that ever ran at once (tests show that
/// shootdowns of different spaces do not wait for each other).
static SHOOTDOWNS_IN_FLIGHT: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);
static MOST_SHOOTDOWNS_IN_FLIGHT: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

/// The most shootdowns that ran at the same time since the last reset.
pub fn most_shootdowns_in_flight() -> usize {
    MOST_SHOOTDOWNS_IN_FLIGHT.load(Ordering::SeqCst)
}

/// `most_shootdowns_in_flight`, and resets it.
pub fn take_most_shootdowns_in_flight() -> usize {
    MOST_SHOOTDOWNS_IN_FLIGHT.swap(0, Ordering::SeqCst)
}

/// A check run inside every flush, before it flushes (in-kernel tests: it proves the
/// unmapped frames are still in use while any target has not yet flushed).
static FLUSH_PROBE: spin::Once<fn()> = spin::Once::new();
static FLUSH_PROBE_ON: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

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
    let Some(slot) = SCOPES.get(initiator as usize) else {
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
        // SAFETY: the kernel's tables map everything the kernel uses.
        #[allow(unsafe_code)]
        unsafe {
            panda_arch::paging::switch_to(kernel_tables::kernel_root())
        };
    }
    0
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        // CPUs whose last activated space this was hold a weak reference to it, which
        // would keep its memory allocated: let go of them.
        for slot in CURRENT.iter().take(percpu::online_count()) {
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
        ipi::call_on_set(|c| active.contains(c), leave_space, self.root);
        if let Some(tables) = self.tables.lock().take() {
            tables.tear_down(&mut free_frame, &mut free_frame);
        }
    }
}
