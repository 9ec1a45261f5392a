//! User address spaces: a page-table hierarchy per process over `panda-mm`'s region
//! and shootdown bookkeeping.
//!
//! Each space owns a PML4 whose kernel half (slots 256..511) is copied from the kernel's
//! and therefore shared. Faults in demand-zero regions map a `ZeroedFrame` that
//! `panda_platform::zero::fault_frame` chose (from the pool, awaited, or zeroed on the
//! spot) with `UserTables::map_zeroed`, under the page-table lock, so two faults on one
//! page end with one mapping. Shrinking the heap unmaps pages and runs the shootdown protocol:
//! CPUs running the space now flush (cross-CPU calls), the others catch up at their
//! next switch, and the frames are freed only after every target acknowledged. The
//! released range stays *retiring* in the region bookkeeping meanwhile (nothing new is
//! placed there), so no lock is held across the shootdown's wait: two threads of one
//! process freeing buffers on two CPUs shoot down in parallel.
//! Dropping the space frees every frame and table page. User threads reach it through
//! `process` (faults from ring 3, brk, buffers); the in-kernel tests drive it directly.
//!
//! **Accounting.** Every frame the hierarchy holds (mapped pages, page tables, the
//! PML4) is charged, `PAGE_SIZE` bytes each, to the space's memory account
//! (`panda_mm::account`, charged up the process tree) at the one place it is mapped
//! (`map_charged`: the page and the tables the walk will add, counted under the table
//! lock before the map) and given back where
//! it is unmapped (`retire`, from the count `unmap_range` returns) and at drop, which
//! checks first that what was charged is exactly what the tables hold. A fault past the
//! limit ends the process; a fault that finds the machine out of frames asks the
//! out-of-memory policy to end the largest process and waits for its memory: both
//! answers are the process side's, installed in `limits` at boot (docs/MEMORY.md,
//! "Limits and running out").

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use panda_arch::paging::MapError;
use panda_arch::{percpu, PAGE_SIZE};
use panda_mm::account::{Account, OverLimit, UNLIMITED};
use panda_mm::region::{Access, FaultDecision, Regions, Retiring, Rights};
use panda_mm::tlb::CpuMask;
use panda_mm::{MmError, PerCpu, MAX_CPUS};
use panda_platform::frame::{FilledFrame, ZeroedFrame};
use panda_platform::vm::{UserAddr, UserCopy, UserRange, UserTables, VmSpace};
use panda_platform::zero::Source;

use panda_platform::sync::{Mutex, RwLock};

use crate::executor::yield_once;
use crate::locks;

mod limits;
pub use limits::{set_limit_policy, LimitPolicy, Reclaim};

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
static STAT: PerCpu<CachePadded<[AtomicU64; STATS]>> =
    PerCpu::new([const { CachePadded::new([const { AtomicU64::new(0) }; STATS]) }; MAX_CPUS]);

fn add(stat: Stat, n: u64) {
    STAT[panda_platform::cpu::current()][stat as usize].fetch_add(n, Ordering::Relaxed);
}

fn count(stat: Stat) {
    add(stat, 1);
}

/// A counter's total over every CPU.
pub fn stat(stat: Stat) -> u64 {
    match stat {
        Stat::Shootdowns => return panda_platform::vm::shootdown_counts().0,
        Stat::ShootdownIpis => return panda_platform::vm::shootdown_counts().1,
        _ => {}
    }
    STAT.iter()
        .take(percpu::online_count().max(1))
        .map(|c| c[stat as usize].load(Ordering::Relaxed))
        .sum()
}

fn tsc() -> u64 {
    panda_arch::cpu::rdtsc()
}

/// Counts where a fault's frame came from.
fn count_source(source: Source) {
    match source {
        Source::PoolHit => count(Stat::PoolHits),
        Source::PoolWait => count(Stat::PoolWaits),
        Source::ZeroedInline { cycles } => {
            count(Stat::ZeroedInline);
            add(Stat::ProfZero, cycles);
        }
    }
}

/// Spaces whose charge did not match the frames they held at drop, and uncharges of
/// more than was charged: both 0 unless the accounting has a bug (`SystemInfo`).
static ACCOUNT_ERRORS: AtomicU64 = AtomicU64::new(0);

/// See `ACCOUNT_ERRORS`.
pub fn account_errors() -> u64 {
    ACCOUNT_ERRORS.load(Ordering::Relaxed)
}

/// Counts an accounting error (also the process layer's: a process whose charge is not
/// zero when it is gone).
pub fn note_account_error() {
    ACCOUNT_ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// How many times a fault that found no frame lets the out-of-memory policy end a
/// process and wait for its memory before it gives up.
const MAX_RECLAIMS: u32 = 4;

/// Why the fault path could not map a page (inside this module: the public
/// `FaultError` folds the last two into `OutOfMemory`).
#[derive(Clone, Copy, Debug)]
enum Miss {
    Denied(FaultDecision),
    /// The machine is out of frames (down to the kernel's reserve).
    NoFrame,
    /// The page would take the space's account (or an ancestor's) past its limit.
    OverLimit(OverLimit),
    /// Another fault mapped the page first.
    AlreadyMapped,
}

impl From<Miss> for FaultError {
    fn from(m: Miss) -> Self {
        match m {
            Miss::Denied(d) => FaultError::Denied(d),
            Miss::NoFrame | Miss::OverLimit(_) => FaultError::OutOfMemory,
            Miss::AlreadyMapped => FaultError::Denied(FaultDecision::OutsideRegions),
        }
    }
}

/// A user copy's answer for a page the user may not access that way.
const DENIED: FaultError = FaultError::Denied(FaultDecision::OutsideRegions);

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
    /// The page tables (which own the mapped frames) and their TLB state.
    vm: Arc<VmSpace>,
    /// Read by every fault (concurrently), written by layout changes.
    regions: RwLock<Regions>,
    /// Bumped by every layout change (before its unmap): a fault that classified its
    /// address under an unchanged generation need not classify again to map.
    layout_gen: AtomicU64,
    /// Serialises segment changes (the loader's `add_segment`, `protect_segment`), so a
    /// segment's mapped rights end as its bookkeeping says. Brk and buffers do not take
    /// it: their released ranges retire in the bookkeeping instead.
    layout: Mutex<()>,
    /// What the space's frames are charged to.
    account: Arc<Account>,
    /// Bytes this space has charged to `account` now (its frames): always what the
    /// tables hold, given back at drop.
    charged: AtomicU64,
}

impl AddressSpace {
    /// An empty space sharing the kernel half, charged to an account of its own with
    /// no limit (kernel-built spaces, tests).
    pub fn new() -> Result<Arc<Self>, MmError> {
        Self::with_account(Account::root(UNLIMITED))
    }

    /// An empty space whose frames are charged to `account` (its PML4 at once).
    pub fn with_account(account: Arc<Account>) -> Result<Arc<Self>, MmError> {
        account
            .try_charge(PAGE_SIZE)
            .map_err(|_| MmError::OutOfMemory)?;
        let Some(vm) = VmSpace::new() else {
            let _ = account.uncharge(PAGE_SIZE);
            return Err(MmError::OutOfMemory);
        };
        Ok(Arc::new(Self {
            vm,
            regions: RwLock::new(&locks::REGIONS, Regions::new()),
            layout_gen: AtomicU64::new(0),
            layout: Mutex::new(&locks::LAYOUT, ()),
            account,
            charged: AtomicU64::new(PAGE_SIZE),
        }))
    }

    /// The account this space's frames are charged to.
    pub fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// Bytes of frames this space holds (and has charged).
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// Frames the page tables hold now, counted by walking them (for checks).
    pub fn frames_held(&self) -> u64 {
        self.vm.frames_held()
    }

    fn charge(&self, bytes: u64) -> Result<(), OverLimit> {
        self.account.try_charge(bytes)?;
        self.charged.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn uncharge(&self, bytes: u64) {
        self.charged.fetch_sub(bytes, Ordering::Relaxed);
        if self.account.uncharge(bytes).is_err() {
            note_account_error();
            log::error!(target: "mm", "memory account of pid {}: {bytes} bytes given back that were not charged", self.account.id());
        }
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
        self.vm.is_current()
    }

    /// Makes this space current on the calling CPU (see `VmSpace::activate`).
    pub fn activate(&self) {
        self.vm.activate();
    }

    /// The CPUs that may hold this space's translations now (its shootdown targets).
    pub fn active_cpus(&self) -> CpuMask {
        self.vm.active_cpus()
    }

    /// Returns the calling CPU to the kernel's own tables.
    pub fn deactivate(&self) {
        self.vm.deactivate();
    }

    /// Resolves a fault at `addr`: maps a zeroed frame if the address is valid for the
    /// access and not yet backed; otherwise says why not.
    /// (Past the account's limit or with no frame to be had: `OutOfMemory`; this path
    /// ends no process.)
    pub fn handle_fault(&self, addr: UserAddr, access: Access) -> Result<(), FaultError> {
        let generation = self.layout_gen.load(Ordering::Acquire);
        let rights = self.demand_zero_rights(addr, access)?;
        self.charge(PAGE_SIZE).map_err(Miss::OverLimit)?;
        let Some((frame, source)) = panda_platform::zero::fault_frame_now() else {
            self.uncharge(PAGE_SIZE);
            return Err(FaultError::OutOfMemory);
        };
        count_source(source);
        Ok(self.install(addr, frame, rights, generation)?)
    }

    /// `handle_fault` for the fault path of user threads: when this CPU's zeroed pool
    /// is empty and the CPU has other tasks to run, the thread's future awaits the
    /// pool — whose waiting call wakes the CPU's zeroing task — so the CPU runs its
    /// other tasks meanwhile and the thread resumes once a frame is zeroed for it.
    /// With nothing else to run, waiting would only add two task switches around the
    /// same zeroing, so the fault zeroes a frame on the spot (docs/MEMORY.md has the
    /// measurements). If memory is exhausted (the refill found no frame), the fault
    /// tries once itself, and then the out-of-memory policy ends the process with the
    /// largest footprint and the fault waits for its frames and tries again (a few
    /// times, each wait bounded). With zeroing paused (tests counting frames) it zeroes
    /// on the spot.
    ///
    /// A fault past the account's limit ends the process, as does being chosen by the
    /// out-of-memory policy: both log why, and the fault then returns `Ok` for a process
    /// that is ending, so the thread loop (which checks for that before it runs the
    /// thread again) logs nothing more.
    pub async fn handle_fault_async(
        &self,
        addr: UserAddr,
        access: Access,
    ) -> Result<(), FaultError> {
        self.resolve_fault(addr, access, true).await
    }

    /// A fault in the kernel's copies for a system call (`copy_user`): like a user
    /// fault, but past the limit the call fails with `OutOfMemory` instead.
    async fn resolve_fault(
        &self,
        addr: UserAddr,
        access: Access,
        user: bool,
    ) -> Result<(), FaultError> {
        let t0 = tsc();
        let mut reclaims = 0;
        loop {
            match self.handle_fault_inner(addr, access).await {
                Ok(()) => {
                    add(Stat::ProfHandler, tsc() - t0);
                    count(Stat::ProfFaults);
                    return Ok(());
                }
                Err(Miss::OverLimit(over)) => {
                    let pid = self.account.id();
                    if user && limits::end_over_limit(pid, addr.get(), access, over) {
                        return Ok(());
                    }
                    return Err(FaultError::OutOfMemory);
                }
                Err(Miss::NoFrame) if reclaims < MAX_RECLAIMS => {
                    reclaims += 1;
                    match limits::out_of_frames(self.account.id()).await {
                        Reclaim::Retry => {}
                        Reclaim::Ended if user => return Ok(()),
                        _ => return Err(FaultError::OutOfMemory),
                    }
                }
                Err(miss) => return Err(miss.into()),
            }
        }
    }

    async fn handle_fault_inner(&self, addr: UserAddr, access: Access) -> Result<(), Miss> {
        let t0 = tsc();
        let generation = self.layout_gen.load(Ordering::Acquire);
        let rights = self.demand_zero_rights(addr, access).map_err(|e| match e {
            FaultError::Denied(d) => Miss::Denied(d),
            FaultError::OutOfMemory => Miss::NoFrame,
        })?;
        add(Stat::ProfClassify, tsc() - t0);
        // The page is charged before a frame is taken: past the limit, none is. The
        // charge is held by a guard across the wait for a frame: a thread whose process
        // ends meanwhile drops this future there, and the charge must go back with it.
        self.charge(PAGE_SIZE).map_err(Miss::OverLimit)?;
        let pending = PendingPage(self);
        let (frame, source) = panda_platform::zero::fault_frame()
            .await
            .ok_or(Miss::NoFrame)?;
        count_source(source);
        // `install` owns the charge from here.
        core::mem::forget(pending);
        let t0 = tsc();
        let result = self.install(addr, frame, rights, generation);
        add(Stat::ProfMap, tsc() - t0);
        result
    }

    /// The rights of a demand-zero page at `addr`, or why there is none.
    fn demand_zero_rights(&self, addr: UserAddr, access: Access) -> Result<Rights, FaultError> {
        match self.regions.read().classify(addr.get(), access) {
            FaultDecision::DemandZero(rights) => Ok(rights),
            decision => Err(FaultError::Denied(decision)),
        }
    }

    /// Maps a zeroed `frame` at `addr`'s page unless another fault mapped it first (then
    /// the frame goes back and both faults resume on the one mapping). The page is
    /// charged already (by the caller); given back unless it is mapped here.
    fn install(
        &self,
        addr: UserAddr,
        frame: ZeroedFrame,
        rights: Rights,
        generation: u64,
    ) -> Result<(), Miss> {
        let mut guard = self.vm.lock();
        // The region may have shrunk or been freed since the fault was classified (by
        // another thread): if the layout changed since, classify again with the tables
        // locked. An unmap that follows a layout change takes this lock too, so a page
        // either maps before it (and is unmapped by it) or sees the change here.
        let rights = if self.layout_gen.load(Ordering::Acquire) == generation {
            rights
        } else {
            let access = if rights.write {
                Access::Write
            } else {
                Access::Read
            };
            match self.regions.read().classify(addr.get(), access) {
                FaultDecision::DemandZero(current) => current,
                other => {
                    self.uncharge(PAGE_SIZE);
                    return Err(Miss::Denied(other));
                }
            }
        };
        // Being torn down.
        let Some(tables) = guard.as_mut() else {
            self.uncharge(PAGE_SIZE);
            return Err(Miss::Denied(FaultDecision::OutsideRegions));
        };
        match self.map_charged(tables, addr.get(), |t| {
            t.map_zeroed(addr.get(), frame, rights)
        }) {
            Ok(()) => {
                count(Stat::Faults);
                Ok(())
            }
            // Another fault mapped it first: the frame went back; both resume on the
            // one mapping.
            Err(Miss::AlreadyMapped) => Ok(()),
            Err(miss) => Err(miss),
        }
    }

    /// Runs `map` (one `UserTables::map_zeroed` or `map_filled` of the page `virt`, which
    /// owns the frame) in `tables` (locked), the one place a frame joins a space: the
    /// page is charged already; the page tables the walk will add are charged here
    /// first (refused past the limit: `map` is dropped unrun, with its frame), and
    /// whatever the map did not end up holding is given back. Errors: `OverLimit`;
    /// `NoFrame` (a table frame could not be had); `AlreadyMapped` (the frame went
    /// back); `Denied(OutsideRegions)` for an address the tables refuse.
    fn map_charged(
        &self,
        tables: &mut UserTables,
        virt: u64,
        map: impl FnOnce(&mut UserTables) -> Result<(), MapError>,
    ) -> Result<(), Miss> {
        let missing = tables.tables_missing(virt);
        if let Err(over) = self.charge(missing * PAGE_SIZE) {
            self.uncharge(PAGE_SIZE);
            drop(map);
            return Err(Miss::OverLimit(over));
        }
        let result = map(tables);
        if result.is_err() {
            // Tables a failed map added stay (empty; an unmap or the drop frees them):
            // only the page and the tables not added go back.
            let added = missing - tables.tables_missing(virt);
            self.uncharge(PAGE_SIZE + (missing - added) * PAGE_SIZE);
        }
        result.map_err(|e| match e {
            MapError::AlreadyMapped { .. } => Miss::AlreadyMapped,
            MapError::OutOfFrames => Miss::NoFrame,
            _ => Miss::Denied(FaultDecision::OutsideRegions),
        })
    }

    /// Maps the filled `frame` at the page `virt` with `rights` (an ELF segment's page
    /// with its file bytes), taking ownership of the frame: tear-down frees it. The page
    /// must lie in a region that allows `rights` (the fault path would refuse it
    /// otherwise). Charged like a fault's page: past the account's limit, `OutOfMemory`.
    pub fn map_filled(&self, virt: u64, frame: FilledFrame, rights: Rights) -> Result<(), MmError> {
        self.charge(PAGE_SIZE).map_err(|_| MmError::OutOfMemory)?;
        let mut guard = self.vm.lock();
        let Some(tables) = guard.as_mut() else {
            self.uncharge(PAGE_SIZE);
            return Err(MmError::Invalid);
        };
        self.map_charged(tables, virt, |t| t.map_filled(virt, frame, rights))
            .map_err(|e| match e {
                Miss::NoFrame | Miss::OverLimit(_) => MmError::OutOfMemory,
                Miss::Denied(_) | Miss::AlreadyMapped => MmError::Invalid,
            })
    }

    /// Moves the break; shrinking unmaps the released pages and shoots down their TLB
    /// entries before freeing the frames, in batches with yields between (`retire`).
    /// Returns the new break. Growing over a range another thread's shrink is still
    /// shooting down waits (yields) until it is done.
    pub async fn set_brk(&self, new: u64) -> Result<u64, MmError> {
        loop {
            match self.change_layout(|r| r.set_brk(new)) {
                Err(MmError::Busy) => yield_once().await,
                Err(e) => return Err(e),
                Ok(None) => return Ok(new),
                Ok(Some(retiring)) => {
                    self.retire(retiring).await;
                    return Ok(new);
                }
            }
        }
    }

    /// Unmaps a range taken out of the layout, in batches of at most
    /// `panda_platform::vm::UNMAP_BATCH` pages: each batch takes the table lock, unmaps,
    /// shoots down and frees its frames, and lets go of the lock; between batches the
    /// CPU's other tasks get their turn (`executor::Slice`). Then the bookkeeping may
    /// hand the range out again. No lock is held across a shootdown's wait or a yield.
    ///
    /// The range left the layout before the first batch (the caller's layout change),
    /// so no fault maps a page there meanwhile: one that classified its address
    /// before the change finds the layout generation changed when it takes the table
    /// lock, classifies again and is refused (its frame is freed). If this future is
    /// dropped between batches (its process ended), the range simply stays retiring:
    /// nothing is placed there again, and the pages not yet unmapped stay owned by the
    /// tables, which free them with the space.
    async fn retire(&self, retiring: Retiring) {
        let (from, to) = retiring.range();
        let mut slice = crate::executor::Slice::start();
        let mut at = from;
        loop {
            // Each batch's frames are uncharged as they go, so a retire stopped between
            // batches leaves the charge equal to what the tables still hold.
            let (next, freed) = self.vm.unmap(at, to).finish();
            self.uncharge(freed * PAGE_SIZE);
            let Some(next) = next else { break };
            at = next;
            slice.maybe_yield().await;
        }
        self.regions.write().retired(retiring);
    }

    /// Changes the rights of the segment at `start`; mapped pages get the new rights
    /// and every CPU running the space flushes them before this returns.
    pub fn protect_segment(&self, start: u64, rights: Rights) -> Result<(), MmError> {
        let _layout = self.layout.lock();
        let (from, to) = self.change_layout(|r| r.protect_segment(start, rights))?;
        self.vm.protect_range(from, to, rights);
        Ok(())
    }

    /// Allocates a buffer of `size` bytes (page-rounded) in the buffer region; its pages
    /// are demand-zero. Returns its start.
    pub fn alloc_buffer(&self, size: u64) -> Result<u64, MmError> {
        self.change_layout(|r| r.alloc_buffer(size))
    }

    /// Frees the buffer starting at `start`: unmaps its pages, shoots down their TLB
    /// entries, then frees the frames (in batches, as `retire` says).
    pub async fn free_buffer(&self, start: u64) -> Result<(), MmError> {
        let retiring = self.change_layout(|r| r.free_buffer(start))?;
        self.retire(retiring).await;
        Ok(())
    }

    /// Whether `range` lies inside one live buffer.
    pub fn in_buffer(&self, range: UserRange) -> bool {
        self.regions
            .read()
            .buffers()
            .any(|(s, e)| range.within(s, e))
    }

    /// Makes `range` accessible as the user would access it (`write` or read): a valid
    /// page not yet backed is faulted in — awaiting a zeroed frame like a user fault.
    /// Anything the user could not access that way is an error.
    pub async fn fault_in(&self, range: UserRange, write: bool) -> Result<(), FaultError> {
        self.copy_user(UserCopy::check(range, write)).await
    }

    /// Copies the user memory `from` into `out` (as long as `from`), faulting pages in
    /// as a user read would. (Lengths that differ: `Denied`, a caller's bug.)
    pub async fn read_user(&self, from: UserRange, out: &mut [u8]) -> Result<(), FaultError> {
        let copy = UserCopy::from_user(from, out).ok_or(DENIED)?;
        self.copy_user(copy).await
    }

    /// Copies `bytes` to the user memory `to` (as long as `bytes`), faulting pages in as
    /// a user write would. The whole destination is checked (and faulted in) first, so
    /// a destination that runs into memory the caller may not write gets an error and
    /// is left untouched. (If another thread of the process frees part of it between
    /// the two passes, the write stops there with an error.)
    pub async fn write_user(&self, to: UserRange, bytes: &[u8]) -> Result<(), FaultError> {
        let copy = UserCopy::to_user(to, bytes).ok_or(DENIED)?;
        self.fault_in(to, true).await?;
        self.copy_user(copy).await
    }

    /// Runs `copy` (`UserCopy`: a copy to or from a user range, or a check of it) piece
    /// by piece (at most a page each), with the table lock held for each, so the frames
    /// cannot be unmapped and freed while it copies; a page not yet accessible is
    /// faulted in first. Between pieces it gives its CPU's other tasks a turn when
    /// `executor::Slice` says so. The range is a `UserRange`, checked at the system-call
    /// boundary: it lies in the user half, so no bound is checked here.
    async fn copy_user(&self, mut copy: UserCopy<'_>) -> Result<(), FaultError> {
        let access = if copy.writes() {
            Access::Write
        } else {
            Access::Read
        };
        let mut tries = 0;
        let mut slice = crate::executor::Slice::start();
        while let Some(at) = copy.next() {
            // A long copy (up to megabytes) gives the CPU's other tasks their turn
            // between pages (`executor::Slice`), so they are not held up by it.
            slice.maybe_yield().await;
            let copied = {
                // `step` checks the page's user rights itself: one walk per piece.
                let guard = self.vm.lock();
                guard.as_ref().is_some_and(|t| copy.step(t))
            };
            if copied {
                tries = 0;
                continue;
            }
            // Mapped with fewer rights than the region gives cannot happen; a page
            // unmapped again by another thread right after the fault can, rarely.
            tries += 1;
            if tries > 4 {
                return Err(DENIED);
            }
            self.resolve_fault(at, access, false).await?;
        }
        Ok(())
    }

    /// Copies the user memory `from` into `out` (as long as `from`) from pages already
    /// mapped, without faulting anything in; stops at the first page not mapped
    /// user-readable. Returns whether all of it was copied.
    pub fn read_mapped(&self, from: UserRange, out: &mut [u8]) -> bool {
        self.vm
            .lock()
            .as_ref()
            .is_some_and(|t| t.read(from, out).is_ok())
    }

    /// Physical frame and flags `virt` maps to, if any.
    pub fn translate(&self, virt: u64) -> Option<(u64, u64)> {
        self.vm.lock().as_ref().and_then(|t| t.translate(virt))
    }
}

/// A page charged for a fault that has no frame yet: given back if the fault ends
/// (or its future is dropped) before `install` takes it over.
struct PendingPage<'a>(&'a AddressSpace);

impl Drop for PendingPage<'_> {
    fn drop(&mut self) {
        self.0.uncharge(PAGE_SIZE);
    }
}

impl Drop for AddressSpace {
    /// Gives the space's charge back, after checking that it is exactly the frames the
    /// tables hold (which the page tables' own drop frees right after).
    fn drop(&mut self) {
        let charged = self.charged.load(Ordering::Relaxed);
        let held = self.vm.frames_held() * PAGE_SIZE;
        if held != charged {
            note_account_error();
            log::error!(target: "mm", "memory account of pid {}: {charged} bytes charged at exit for {held} bytes of frames held", self.account.id());
        }
        self.uncharge(charged);
    }
}

pub use panda_platform::vm::{
    most_shootdowns_in_flight, set_flush_probe, take_most_shootdowns_in_flight,
};

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
