//! Physical frames, owned: the frame allocator with its per-CPU caches and the zeroed
//! frame pools (`panda-mm`'s policy), and `Frame`, the only way code above this crate
//! holds physical memory.
//!
//! A `Frame` is 4 KiB of RAM that its holder alone may read and write: it is not
//! `Copy` or `Clone`, it is made only here (from the allocator), and dropping it gives
//! it back. So no code above this crate can free a frame twice, keep using one it gave
//! back, or map memory it does not own.
//!
//! What a user page may show is a type, up to the page-table entry:
//! - a `ZeroedFrame` holds only zeros. Only this crate makes one: the pools hand them
//!   out (zeroed ahead by idle CPUs), `alloc_user_zeroed` zeroes one on the spot, and
//!   nothing else can vouch for a frame (there is no public "this is zero");
//! - a `FilledFrame` is a `ZeroedFrame` the kernel then wrote (`ZeroedFrame::fill`: an
//!   ELF segment's file bytes);
//! - a plain `Frame` (kernel memory, or a frame that has lost its promise) can never be
//!   mapped into a user space: `vm::UserTables::map_zeroed` takes a `ZeroedFrame` (the
//!   fault path) and `map_filled` a `FilledFrame` (the loader). So no user page ever
//!   shows bytes a previous owner left behind.
//!
//! Mapping moves the frame into the page table (`tables`, the one place a frame becomes
//! a number in an entry and comes back out); unmapping moves it into the shootdown
//! batch, which drops it only after every CPU that may cache the translation has
//! flushed. Frames are numbers in `panda-mm` (host-tested); this module turns them into
//! owned values.

use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::{Context, Poll};

use panda_mm::cache::Frames;
use panda_mm::zero::{Demand, PoolStats, ZeroPools};
use panda_mm::{CpuId, PhysFrame};

use panda_arch::paging::ZeroMethod;
use panda_arch::{HHDM_BASE, PAGE_SIZE};

static FRAMES: spin::Once<Frames> = spin::Once::new();
static ZERO: spin::Once<ZeroPools> = spin::Once::new();
/// Memory below 1 MiB is never managed (firmware and the AP trampoline live there).
const FIRST_FRAME: u64 = 0x10_0000;

/// Frames kept for the kernel itself (see `above_reserve`).
static RESERVE: AtomicU64 = AtomicU64::new(0);

/// 4 KiB of RAM owned by its holder; given back to the allocator when dropped.
pub struct Frame(PhysFrame);

impl Frame {
    /// The frame's physical address (for logs and page-table entries; owning the
    /// number gives no access to the memory).
    pub fn phys(&self) -> u64 {
        self.0.addr()
    }

    fn ptr(&self) -> *mut u8 {
        (HHDM_BASE + self.phys()) as *mut u8
    }

    /// Writes zeros over the whole frame, with the method chosen at boot.
    pub fn zero(&mut self) {
        self.zero_with(panda_arch::paging::zero_method());
    }

    /// `zero` with a given method (boot times them: `choose_zero_method`).
    fn zero_with(&mut self, method: ZeroMethod) {
        // SAFETY: `self` owns the frame (made only from the allocator, never shared),
        // and the HHDM maps all usable RAM writable.
        unsafe { panda_arch::paging::zero_page_with(method, self.ptr() as u64) };
    }

    /// Zeroes the frame and vouches for it (private: only a frame zeroed here, now,
    /// becomes a `ZeroedFrame`).
    fn into_zeroed(mut self) -> ZeroedFrame {
        self.zero();
        ZeroedFrame(self)
    }

    /// Copies `bytes` into the frame at `offset`. Panics if it would run past the end.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        // SAFETY: `&mut self` owns the frame's `PAGE_SIZE` bytes alone.
        unsafe { write_owned(self.ptr(), PAGE_SIZE as usize, offset, bytes) }
    }

    /// Copies bytes of the frame from `offset` into `out`. Panics past the end.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        // SAFETY: `self` owns the frame's `PAGE_SIZE` bytes, so nobody writes them meanwhile.
        unsafe { read_owned(self.ptr(), PAGE_SIZE as usize, offset, out) }
    }

    /// Whether every byte of the frame is zero.
    pub fn is_zero(&self) -> bool {
        let mut word = [0u8; 8];
        (0..PAGE_SIZE as usize / 8).all(|i| {
            self.read(i * 8, &mut word);
            word == [0; 8]
        })
    }

    /// Gives up ownership as a number (the frame then belongs to a page table, a pool,
    /// the heap or the allocator: whoever takes it turns it back with `from_raw` at
    /// most once — for page tables, only `tables` does).
    pub(crate) fn into_raw(self) -> u64 {
        let phys = self.phys();
        core::mem::forget(self);
        phys
    }

    /// The frame at `phys`, owned again.
    ///
    /// # Safety
    /// `phys` must come from `into_raw` (or the allocator) and not be owned by anyone
    /// else: a frame a page table held and has just unlinked, for example.
    pub(crate) unsafe fn from_raw(phys: u64) -> Self {
        Self(PhysFrame::from_addr(phys).expect("frames are page-aligned"))
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(frames) = FRAMES.get() {
            poison::fill(self);
            // A frame only this type owned cannot be refused. If the allocator's
            // ownership bits ever do (the frame is not out: freed twice), it is not
            // handed out again, which is safe; the report names where.
            if frames.free(crate::cpu::current(), self.0).is_err() {
                report_misuse(format_args!(
                    "frame {:#x} freed twice (or never allocated)",
                    self.0.addr()
                ));
            }
        }
    }
}

impl core::fmt::Debug for Frame {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Frame({:#x})", self.phys())
    }
}

/// A frame known to hold only zeros in all its `PAGE_SIZE` bytes.
#[derive(Debug)]
pub struct ZeroedFrame(Frame);

impl ZeroedFrame {
    pub fn phys(&self) -> u64 {
        self.0.phys()
    }

    /// The frame, without the promise (it can then no longer be mapped into a user
    /// space; for kernel use and tests).
    pub fn into_frame(self) -> Frame {
        self.0
    }

    /// Writes `bytes` at `offset` over the zeros (e.g. an ELF segment's file bytes):
    /// every byte is now zero or the kernel's. Panics past the end.
    pub fn fill(self, offset: usize, bytes: &[u8]) -> FilledFrame {
        let mut frame = self.0;
        frame.write(offset, bytes);
        FilledFrame(frame)
    }

    pub(crate) fn into_inner(self) -> Frame {
        self.0
    }
}

/// A frame whose every byte is zero or was written by the kernel (`ZeroedFrame::fill`):
/// what the loader maps (`vm::UserTables::map_filled`).
#[derive(Debug)]
pub struct FilledFrame(Frame);

impl FilledFrame {
    pub fn phys(&self) -> u64 {
        self.0.phys()
    }

    pub(crate) fn into_inner(self) -> Frame {
        self.0
    }
}

/// `1 << order` physically contiguous frames, owned; given back whole when dropped.
pub struct FrameRun {
    start: PhysFrame,
    order: usize,
}

impl FrameRun {
    /// Physical address of the first frame.
    pub fn phys(&self) -> u64 {
        self.start.addr()
    }

    /// Bytes in the run.
    pub fn len(&self) -> usize {
        (PAGE_SIZE as usize) << self.order
    }

    /// Whether the run is empty (never: at least one frame).
    pub fn is_empty(&self) -> bool {
        false
    }

    fn ptr(&self) -> *mut u8 {
        (HHDM_BASE + self.phys()) as *mut u8
    }

    /// Copies `bytes` into the run at `offset`. Panics past the end.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        // SAFETY: `&mut self` owns the run's `len()` bytes alone.
        unsafe { write_owned(self.ptr(), self.len(), offset, bytes) }
    }

    /// Copies bytes of the run from `offset` into `out`. Panics past the end.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        // SAFETY: `self` owns the run's `len()` bytes, so nobody writes them meanwhile.
        unsafe { read_owned(self.ptr(), self.len(), offset, out) }
    }

    /// Zeroes the run's frame `index` with `method` (tests: the frames around it must
    /// stay as they were).
    pub fn zero_frame_with(&mut self, index: usize, method: ZeroMethod) {
        assert!(index < 1 << self.order, "frame past the run");
        // SAFETY: `self` owns the run, and frame `index` lies inside it.
        unsafe {
            panda_arch::paging::zero_page_with(method, self.ptr() as u64 + index as u64 * PAGE_SIZE)
        };
    }
}

/// Copies `bytes` to `offset` of the `len` bytes at `base`; panics if the copy would
/// leave them.
///
/// # Safety
/// The caller owns `[base, base + len)` exclusively (a frame or run it holds `&mut`),
/// and it is mapped writable (the HHDM maps all usable RAM).
unsafe fn write_owned(base: *mut u8, len: usize, offset: usize, bytes: &[u8]) {
    assert!(
        offset <= len && bytes.len() <= len - offset,
        "write past the frame"
    );
    // SAFETY: the caller owns `[base, base + len)`; the assertion keeps the copy inside
    // it; `bytes` is kernel memory, which cannot overlap memory the caller owns.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(offset), bytes.len()) };
}

/// Copies `out.len()` bytes from `offset` of the `len` bytes at `base` into `out`;
/// panics if the copy would leave them.
///
/// # Safety
/// The caller owns `[base, base + len)` (nobody writes it meanwhile) and it is mapped.
unsafe fn read_owned(base: *const u8, len: usize, offset: usize, out: &mut [u8]) {
    assert!(
        offset <= len && out.len() <= len - offset,
        "read past the frame"
    );
    // SAFETY: the caller owns `[base, base + len)`; the assertion keeps the copy inside.
    unsafe { core::ptr::copy_nonoverlapping(base.add(offset), out.as_mut_ptr(), out.len()) };
}

impl Drop for FrameRun {
    fn drop(&mut self) {
        if let Some(frames) = FRAMES.get() {
            let _ = frames.free_contiguous(self.start);
        }
    }
}

/// `1 << order` contiguous frames from the global allocator (not zeroed).
pub fn alloc_run(order: usize) -> Option<FrameRun> {
    let start = FRAMES.get()?.alloc_contiguous(order).ok()?;
    poison::forget_run(start.addr(), order);
    Some(FrameRun { start, order })
}

/// Starts the allocator for `cpus` CPUs with the boot memory map's free ranges above
/// 1 MiB (`BootMemoryMap::hand_over_free`: they exist once, after every boot-time claim,
/// so owning them is proof that nothing else uses them). Sizes the zeroed pools and the
/// kernel's reserve. Returns the frames it manages.
pub fn init(cpus: usize, free: panda_arch::boot::FreeRanges) -> u64 {
    // One ownership bit per frame of the span (a 4 GiB span costs 128 KiB of heap).
    let span = free
        .span()
        .map(|(start, end)| (start.max(FIRST_FRAME), end));
    let frames = FRAMES.call_once(|| match span {
        Some((start, end)) => Frames::with_span(cpus, start, end),
        None => Frames::new(cpus),
    });
    for (start, end) in free {
        let start = start.max(FIRST_FRAME);
        if start < end {
            frames.add_range(start, end);
        }
    }
    finish_init(cpus);
    frames.total_frames()
}

/// Sizes the zeroed pools and the kernel's reserve from the memory handed over.
fn finish_init(cpus: usize) {
    let Some(frames) = FRAMES.get() else { return };
    // Pools start at 256 frames per CPU and grow with the demand up to 2048 (see
    // `ZeroPools::with_limits`); all of them together park at most 1/16 of memory.
    let share = frames.total_frames() as usize / 16 / cpus.max(1);
    let start = share.clamp(8, panda_mm::zero::POOL_CAPACITY);
    let max = share.clamp(start, panda_mm::zero::POOL_MAX_CAPACITY);
    ZERO.call_once(|| ZeroPools::with_limits(cpus, start, max));
    RESERVE.store(reserve_for(frames.total_frames()), Ordering::Relaxed);
}

/// The kernel's reserve for `total` frames: 1/32 of memory, at least 1 MiB and at
/// most 64 MiB.
fn reserve_for(total: u64) -> u64 {
    (total / 32).clamp(256, 16384)
}

/// Frames the kernel keeps for itself.
pub fn reserve_frames() -> u64 {
    RESERVE.load(Ordering::Relaxed)
}

/// Whether memory a user program asks for may still be taken: user frames (faults,
/// page tables, loaded segments), zeroed-pool refills and the kernel objects a system
/// call creates (threads, processes, buffers) are all refused below the reserve, so
/// the kernel always has memory to end processes and free what they hold. Reads a
/// lock-free estimate (frames in per-CPU caches are not counted), cheap enough for
/// every fault.
pub fn above_reserve() -> bool {
    FRAMES
        .get()
        .is_some_and(|f| f.global_free_estimate() > RESERVE.load(Ordering::Relaxed))
}

/// A frame for the kernel (not zeroed).
pub fn alloc() -> Option<Frame> {
    let frame = Frame(FRAMES.get()?.alloc(crate::cpu::current()).ok()?);
    poison::check(&frame);
    Some(frame)
}

/// A frame for user memory or a user page table, zeroed now: `None` below the kernel's
/// reserve. The fault path's "zero on demand" (`zero::fault_frame`), the loader's
/// segment pages and every page-table frame (`tables`) come from here.
pub fn alloc_user_zeroed() -> Option<ZeroedFrame> {
    if !above_reserve() {
        return None;
    }
    Some(alloc()?.into_zeroed())
}

/// A frame only if the calling CPU's cache or the global allocator has one without
/// waiting for a lock (the heap's slab refill, which may run under the allocator's
/// own lock). The frame is given up as its HHDM address: it becomes heap memory.
pub(crate) fn try_alloc_heap_page() -> Option<*mut u8> {
    let frame = Frame(FRAMES.get()?.try_alloc(crate::cpu::current()).ok()?);
    poison::check(&frame);
    Some((HHDM_BASE + frame.into_raw()) as *mut u8)
}

/// A run of `1 << order` contiguous frames for a large heap block, as its HHDM
/// address.
pub(crate) fn alloc_heap_run(order: usize) -> Option<*mut u8> {
    let run = FRAMES.get()?.alloc_contiguous(order).ok()?;
    poison::forget_run(run.addr(), order);
    Some((HHDM_BASE + run.addr()) as *mut u8)
}

/// Gives back a run `alloc_heap_run` made. Returns whether the allocator took it.
///
/// # Safety
/// `ptr` must come from `alloc_heap_run` and nothing may use the run afterwards.
pub(crate) unsafe fn free_heap_run(ptr: *mut u8) -> bool {
    let phys = ptr as u64 - HHDM_BASE;
    match (FRAMES.get(), PhysFrame::from_addr(phys)) {
        (Some(frames), Some(run)) => frames.free_contiguous(run).is_ok(),
        _ => false,
    }
}

/// Gives many frames back in one go (a large unmap): to the global allocator, not
/// through the CPU's cache.
pub(crate) fn free_many(frames: alloc::vec::Vec<Frame>) {
    let Some(all) = FRAMES.get() else { return };
    let mut addrs: alloc::vec::Vec<u64> = frames
        .into_iter()
        .map(|mut f| {
            poison::fill(&mut f);
            f.into_raw()
        })
        .collect();
    let rejected = all.free_many(&mut addrs);
    if rejected > 0 {
        report_misuse(format_args!(
            "{rejected} frames of a batch freed twice (or never allocated)"
        ));
    }
}

/// Frees the allocator refused and frames it would have handed out twice: both 0 in a
/// correct kernel (the closing checks fail otherwise).
pub fn misuse() -> panda_mm::cache::Misuse {
    FRAMES.get().map(Frames::misuse).unwrap_or_default()
}

/// One error line, with a backtrace, for the first few misuses the ownership bits
/// catch (later ones are only counted).
#[cold]
fn report_misuse(what: core::fmt::Arguments) {
    static REPORTED: AtomicU64 = AtomicU64::new(0);
    if REPORTED.fetch_add(1, Ordering::Relaxed) >= 8 {
        return;
    }
    let mut trace = alloc::string::String::new();
    let _ = panda_arch::backtrace::write(&mut trace, 0, panda_arch::backtrace::current_rbp());
    log::error!(target: "mm", "{what} on cpu{}; {trace}", crate::cpu::current());
}

/// Frames free in the allocator (global and every CPU's cache).
pub fn total_free() -> u64 {
    FRAMES.get().map_or(0, |f| f.total_free())
}

/// Frames the allocator manages.
pub fn total_frames() -> u64 {
    FRAMES.get().map_or(0, |f| f.total_frames())
}

/// Entries of the allocator's own bookkeeping (it lives on the kernel heap).
pub fn bookkeeping_entries() -> usize {
    FRAMES.get().map_or(0, |f| f.bookkeeping_entries())
}

/// Whether the frame at `phys` is handed out (not free in the allocator).
pub fn is_in_use(phys: u64) -> bool {
    match (FRAMES.get(), PhysFrame::from_addr(phys)) {
        (Some(f), Some(frame)) => f.is_in_use(frame),
        _ => false,
    }
}

/// A zeroed frame from CPU `cpu`'s pool, if it has one. O(1).
pub fn try_take_zeroed(cpu: CpuId) -> Option<ZeroedFrame> {
    let z = ZERO.get()?.try_take(cpu)?;
    Some(poison::checked_zero(ZeroedFrame(Frame(z.into_frame()))))
}

/// A future for a zeroed frame from CPU `cpu`'s pool: ready at once on a hit, else
/// woken by the pool's next refill; `None` when a refill found memory exhausted.
pub(crate) fn take_zeroed(cpu: CpuId) -> Option<TakeZeroed> {
    Some(TakeZeroed(ZERO.get()?.take(cpu)))
}

/// See `take_zeroed`.
pub(crate) struct TakeZeroed(panda_mm::zero::TakeZeroed<'static>);

impl Future for TakeZeroed {
    type Output = Option<ZeroedFrame>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|z| z.map(|z| poison::checked_zero(ZeroedFrame(Frame(z.into_frame())))))
    }
}

/// Tops CPU `cpu`'s pool up by at most `budget` frames zeroed now; wakes the tasks
/// waiting for one. Returns how many were added.
pub(crate) fn refill_pool(cpu: CpuId, budget: usize) -> usize {
    let (Some(frames), Some(pools)) = (FRAMES.get(), ZERO.get()) else {
        return 0;
    };
    pools.refill(cpu, frames, budget, zero_for_pool)
}

/// TSC cycles spent zeroing frames for the pools (`zero_for_pool`), over every CPU.
static ZERO_AHEAD_CYCLES: AtomicU64 = AtomicU64::new(0);

/// TSC cycles every CPU together has spent zeroing frames ahead of need (idle work,
/// zeroing tasks): the cost of the pools, next to the faults' own inline zeroing.
pub fn zero_ahead_cycles() -> u64 {
    ZERO_AHEAD_CYCLES.load(Ordering::Relaxed)
}

/// Zeroes frame `f`, just allocated for a pool: the one zeroing path of every refill.
fn zero_for_pool(f: PhysFrame) {
    let mut frame = Frame(f);
    poison::check(&frame);
    let t0 = panda_arch::cpu::rdtsc();
    frame.zero();
    ZERO_AHEAD_CYCLES.fetch_add(panda_arch::cpu::rdtsc().wrapping_sub(t0), Ordering::Relaxed);
    // The pool holds it as a number from here on (and hands it out as a `ZeroedFrame`
    // again).
    let _ = frame.into_raw();
}

/// Zeroes at most `budget` frames from the calling CPU's frame cache into CPU
/// `cpu`'s pool (an idle CPU helping a busy one); wakes `cpu`'s waiters. Returns how
/// many were added.
pub(crate) fn refill_pool_for(cpu: CpuId, budget: usize) -> usize {
    let (Some(frames), Some(pools)) = (FRAMES.get(), ZERO.get()) else {
        return 0;
    };
    pools.refill_from(cpu, crate::cpu::current(), frames, budget, zero_for_pool)
}

/// A fault's take from CPU `cpu`'s pool: the frame if it had one, and whether the pool
/// ran low and asks for a helper now (`ZeroPools::take_for_fault`; asked once).
pub(crate) fn take_for_fault(cpu: CpuId) -> (Option<ZeroedFrame>, bool) {
    let Some(pools) = ZERO.get() else {
        return (None, false);
    };
    let (z, help) = pools.take_for_fault(cpu);
    let frame = z.map(|z| poison::checked_zero(ZeroedFrame(Frame(z.into_frame()))));
    (frame, help)
}

/// The CPU nearest to `cpu` whose pool has room (see `ZeroPools::nearest_wanting`).
pub(crate) fn pool_nearest_wanting(cpu: CpuId) -> Option<CpuId> {
    ZERO.get()?.nearest_wanting(cpu)
}

/// A future for CPU `cpu`'s zeroing task: resolves when a take waits on the empty pool.
pub(crate) fn pool_demand(cpu: CpuId) -> Option<Demand<'static>> {
    Some(ZERO.get()?.demand(cpu))
}

/// Whether a take waits on CPU `cpu`'s pool.
pub(crate) fn pool_has_waiters(cpu: CpuId) -> bool {
    ZERO.get().is_some_and(|p| p.has_waiters(cpu))
}

/// Tells CPU `cpu`'s waiters that no frame is coming (memory is short).
pub(crate) fn pool_wake_starved(cpu: CpuId) {
    if let Some(p) = ZERO.get() {
        p.wake_starved(cpu);
    }
}

/// Whether CPU `cpu`'s pool has room.
pub(crate) fn pool_wants_frames(cpu: CpuId) -> bool {
    ZERO.get().is_some_and(|p| p.wants_frames(cpu))
}

/// CPU `cpu`'s pool counters (`None` before the pools are set up).
pub fn pool_stats(cpu: CpuId) -> Option<PoolStats> {
    Some(ZERO.get()?.stats(cpu))
}

/// Frames each pool holds at most.
pub fn pool_capacity() -> usize {
    ZERO.get().map_or(0, |p| p.capacity())
}

/// Frames held zeroed in the pools of the first `cpus` CPUs.
pub fn pooled(cpus: usize) -> u64 {
    ZERO.get().map_or(0, |p| {
        CpuId::all(cpus).map(|c| p.stats(c).available as u64).sum()
    })
}

/// Times each way of zeroing a frame on 32 frames (best of three rounds) and makes
/// the fastest the one `Frame::zero` uses. Returns the choice and every method's time
/// per frame in nanoseconds.
pub fn choose_zero_method() -> Option<(ZeroMethod, [(ZeroMethod, u64); 5])> {
    let mut taken = alloc::vec::Vec::with_capacity(32);
    for _ in 0..32 {
        taken.push(alloc()?);
    }
    let mut times = [(ZeroMethod::RepStosq, u64::MAX); 5];
    for (slot, method) in times.iter_mut().zip(ZeroMethod::ALL) {
        let mut best = u64::MAX;
        for _ in 0..3 {
            let t0 = panda_arch::cpu::rdtsc();
            for f in taken.iter_mut() {
                f.zero_with(method);
            }
            best = best.min(panda_arch::cpu::rdtsc() - t0);
        }
        *slot = (
            method,
            panda_arch::time::ticks_to_ns(best / taken.len() as u64),
        );
    }
    let fastest = times.iter().min_by_key(|(_, ns)| *ns)?.0;
    panda_arch::paging::set_zero_method(fastest);
    Some((fastest, times))
}

/// Frame poisoning, a debugging mode (`mm.poison=on`; off by default: it costs a 4 KiB
/// write per free and a 4 KiB read per allocation). A single frame given back is filled
/// with `POISON`; when it is handed out again the pattern must be intact, and a frame
/// taken from a zeroed pool must still be all zeros. Anything else means something
/// wrote to memory it no longer owned — a stale TLB entry or mapping, a use after free —
/// and is reported with the frame, the first changed word and the bytes around it (so
/// the writer can often be recognised), and counted (`poison::hits`): the kernel's
/// closing check fails on any.
pub mod poison {
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use panda_mm::cache::FrameBits;

    use super::{Frame, ZeroedFrame, FRAMES};
    use panda_arch::PAGE_SIZE;

    /// The fill (Linux's `POISON_FREE` byte).
    pub const POISON: u64 = 0x6b6b_6b6b_6b6b_6b6b;

    static ON: AtomicBool = AtomicBool::new(false);
    static HITS: AtomicU64 = AtomicU64::new(0);
    /// One bit per frame of the allocator's span: set while the frame holds the fill.
    static FILLED: spin::Once<FrameBits> = spin::Once::new();

    /// Turns poisoning on (from boot, before user space runs): frames freed from now
    /// on are filled and checked when handed out again.
    pub fn enable() {
        let Some((start, end)) = FRAMES.get().and_then(|f| f.span()) else {
            return;
        };
        FILLED.call_once(|| FrameBits::new(start, end));
        ON.store(true, Ordering::SeqCst);
    }

    /// Whether poisoning is on.
    #[inline]
    pub fn on() -> bool {
        ON.load(Ordering::Relaxed)
    }

    /// Writes (or catches) found in free or pooled frames so far.
    pub fn hits() -> u64 {
        HITS.load(Ordering::Relaxed)
    }

    fn filled() -> Option<&'static FrameBits> {
        if on() {
            FILLED.get()
        } else {
            None
        }
    }

    /// Fills `frame`, which its owner is about to give back (nothing with poisoning
    /// off, or if the ownership bits say the frame is not out: a double free, which the
    /// allocator refuses, must not write over the real owner's data).
    pub(super) fn fill(frame: &mut Frame) {
        let Some(bits) = filled() else { return };
        let out = FRAMES.get().and_then(|f| f.is_out(frame.phys()));
        if bits.get(frame.phys()).is_none() || out == Some(false) {
            return;
        }
        for i in 0..PAGE_SIZE as usize / 8 {
            frame.write(i * 8, &POISON.to_ne_bytes());
        }
        bits.set(frame.phys());
    }

    /// Checks a frame just handed out: if it was filled when freed, the fill must be
    /// intact (nothing with poisoning off).
    pub(super) fn check(frame: &Frame) {
        let Some(bits) = filled() else { return };
        if bits.clear(frame.phys()) == Some(true) {
            expect(frame, POISON, "written while free");
        }
    }

    /// A run just handed out whole: its frames are not checked (runs are not filled
    /// when freed), so a fill some of them held is forgotten.
    pub(super) fn forget_run(start: u64, order: usize) {
        let Some(bits) = filled() else { return };
        for i in 0..1u64 << order {
            bits.clear(start + i * PAGE_SIZE);
        }
    }

    /// A frame from a zeroed pool, checked to hold zeros still.
    pub(super) fn checked_zero(z: ZeroedFrame) -> ZeroedFrame {
        if on() {
            expect(&z.0, 0, "written while in a zeroed pool");
        }
        z
    }

    fn expect(frame: &Frame, fill: u64, what: &str) {
        let mut word = [0u8; 8];
        let changed = (0..PAGE_SIZE as usize / 8).find(|&i| {
            frame.read(i * 8, &mut word);
            u64::from_ne_bytes(word) != fill
        });
        let Some(i) = changed else { return };
        if HITS.fetch_add(1, Ordering::Relaxed) >= 16 {
            return;
        }
        // The 32 bytes from the first changed word, as hex and as text.
        let mut bytes = [0u8; 32];
        let at = (i * 8).min(PAGE_SIZE as usize - bytes.len());
        frame.read(at, &mut bytes);
        let mut text = [b'.'; 32];
        for (t, b) in text.iter_mut().zip(bytes) {
            if b.is_ascii_graphic() || b == b' ' {
                *t = b;
            }
        }
        let owner = FRAMES.get().and_then(|f| f.is_out(frame.phys()));
        log::error!(
            target: "mm",
            "frame {:#x} {what}: offset {:#x} holds {:02x?} \"{}\" (on cpu{}; ownership bit {owner:?})",
            frame.phys(),
            at,
            bytes,
            core::str::from_utf8(&text).unwrap_or("?"),
            crate::cpu::current(),
        );
    }
}
