//! Physical memory at run time: the frame allocator with per-CPU caches and the zeroed
//! frame pools (`panda-mm`), wired to the hardware.
//!
//! `init` runs once on the boot CPU after bring-up, when every boot-time claim (kernel
//! image, modules, page tables, AP stacks, early heap) is recorded in the memory map:
//! every usable and bootloader-reclaimable range above 1 MiB becomes free frames, and
//! from then on the memory map is a record only. Frames are reached through the HHDM.
//!
//! Each CPU's idle work zeroes frames into its pool (`zero_when_idle`), so demand-zero
//! faults of user threads can take one in O(1). The kernel's reserve (`above_reserve`)
//! keeps user-caused allocations from taking the memory the kernel needs.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use panda_arch::paging::ZeroMethod;
use panda_arch::percpu;
use panda_mm::cache::Frames;
use panda_mm::zero::ZeroPools;
use panda_mm::PhysFrame;

use crate::boot::{BootInfo, MemoryKind};

static FRAMES: spin::Once<Frames> = spin::Once::new();
static ZERO: spin::Once<ZeroPools> = spin::Once::new();
static HHDM: spin::Once<u64> = spin::Once::new();

/// Frames kept for the kernel itself (see `above_reserve`).
static RESERVE: AtomicU64 = AtomicU64::new(0);

static PAUSED: AtomicBool = AtomicBool::new(false);
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Frames zeroed per idle turn: small, so a task that becomes ready waits little.
const ZERO_BATCH: usize = 8;

/// Hands every usable range above 1 MiB to the frame allocator. Returns its size.
pub fn init(boot: &BootInfo, cpus: usize) -> u64 {
    HHDM.call_once(|| boot.hhdm_offset);
    let frames = FRAMES.call_once(|| Frames::new(cpus));
    // Bootloader data is reclaimed too: by now the kernel runs on its own page
    // tables, GDT, IDT and stacks, and `BootInfo` holds copies of everything it needed
    // from the bootloader (memory map, command line, module names; module contents are
    // `KernelAndModules`, which stays).
    let free_kinds = [MemoryKind::Usable, MemoryKind::BootloaderReclaimable];
    for r in boot
        .memory_map
        .regions()
        .iter()
        .filter(|r| free_kinds.contains(&r.kind))
    {
        let start = r.start.max(0x10_0000);
        if start < r.end {
            frames.add_range(start, r.end);
        }
    }
    // Pools park at most 1/16 of memory in zeroed frames, and 256 frames per CPU.
    let per_cpu =
        (frames.total_frames() as usize / 16 / cpus.max(1)).clamp(8, panda_mm::zero::POOL_CAPACITY);
    ZERO.call_once(|| ZeroPools::with_capacity(cpus, per_cpu));
    RESERVE.store(reserve_for(frames.total_frames()), Ordering::Relaxed);
    frames.total_frames()
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
/// the kernel always has memory to end processes and free what they hold, and a
/// kernel allocation on a system-call path cannot fail. Reads a lock-free estimate
/// (frames in per-CPU caches are not counted), so it is cheap enough for every fault.
pub fn above_reserve() -> bool {
    FRAMES
        .get()
        .is_some_and(|f| f.global_free_estimate() > RESERVE.load(Ordering::Relaxed))
}

/// A frame for user memory (or a user page table): `None` below the reserve.
pub fn alloc_user_frame() -> Option<PhysFrame> {
    if !above_reserve() {
        return None;
    }
    FRAMES.get()?.alloc(percpu::current_index()).ok()
}

/// The frame allocator.
pub fn frames() -> Option<&'static Frames> {
    FRAMES.get()
}

/// The zeroed-frame pools.
pub fn zero_pools() -> Option<&'static ZeroPools> {
    ZERO.get()
}

/// The HHDM address of a frame.
pub fn virt(frame: PhysFrame) -> u64 {
    HHDM.get().copied().unwrap_or(panda_arch::HHDM_BASE) + frame.addr()
}

/// Writes zeros over a frame the caller just took from the allocator.
pub fn zero(frame: PhysFrame) {
    #[allow(unsafe_code)]
    // SAFETY: callers pass frames they own: freshly allocated, not mapped anywhere
    // else, and reached through the HHDM (which maps all usable RAM writable).
    unsafe {
        panda_arch::paging::zero_page(virt(frame))
    };
}

/// `zero` with a given method (tests check every method).
pub fn zero_with(method: ZeroMethod, frame: PhysFrame) {
    #[allow(unsafe_code)]
    // SAFETY: callers pass a frame they just took from the allocator and have not
    // mapped or shared (the in-kernel test's own frame): writing its 4096 bytes through
    // the HHDM, which maps all usable RAM writable, touches nothing anyone else uses.
    unsafe {
        panda_arch::paging::zero_page_with(method, virt(frame))
    };
}

/// Copies `bytes` into a frame the caller just took from the allocator, at `offset`.
pub fn write(frame: PhysFrame, offset: usize, bytes: &[u8]) {
    assert!(offset + bytes.len() <= 4096, "write past the frame");
    #[allow(unsafe_code)]
    // SAFETY: callers pass a frame they just took from the allocator and have not
    // mapped yet (the ELF loader); the assertion above keeps `[offset, offset + len)`
    // inside its 4096 bytes, reached through the HHDM's writable mapping of all RAM.
    unsafe {
        panda_arch::paging::write_phys(frame.addr() + offset as u64, bytes)
    };
}

/// Returns a frame to the allocator (from the calling CPU's cache).
pub fn free(frame: PhysFrame) {
    if let Some(frames) = FRAMES.get() {
        // A frame the allocator did not hand out would be a kernel bug; the error is
        // ignored rather than panicking in a free path.
        let _ = frames.free(percpu::current_index(), frame);
    }
}

/// Times each way of zeroing a frame on 32 frames (best of three rounds) and makes
/// the fastest the one `zero` uses. Returns the choice and every method's time per
/// frame in nanoseconds.
pub fn choose_zero_method() -> Option<(ZeroMethod, [(ZeroMethod, u64); 5])> {
    let frames = FRAMES.get()?;
    let cpu = percpu::current_index();
    let mut taken = [PhysFrame::from_addr(0)?; 32];
    for slot in taken.iter_mut() {
        *slot = frames.alloc(cpu).ok()?;
    }
    let mut times = [(ZeroMethod::RepStosq, u64::MAX); 5];
    for (slot, method) in times.iter_mut().zip(ZeroMethod::ALL) {
        let mut best = u64::MAX;
        for _ in 0..3 {
            let t0 = panda_arch::cpu::rdtsc();
            for &f in &taken {
                #[allow(unsafe_code)]
                // SAFETY: the frames were just allocated here and are not mapped or
                // shared: this function owns them until it frees them below.
                unsafe {
                    panda_arch::paging::zero_page_with(method, virt(f))
                };
            }
            best = best.min(panda_arch::cpu::rdtsc() - t0);
        }
        *slot = (
            method,
            panda_arch::time::ticks_to_ns(best / taken.len() as u64),
        );
    }
    for f in taken {
        let _ = frames.free(cpu, f);
    }
    let fastest = times.iter().min_by_key(|(_, ns)| *ns)?.0;
    panda_arch::paging::set_zero_method(fastest);
    Some((fastest, times))
}

/// Frames zeroed per batch of the on-demand zeroing task (it yields between batches).
const DEMAND_BATCH: usize = 16;

/// CPU `cpu`'s zeroing task (spawned pinned there at boot): parked until a page fault
/// waits on the empty pool, then zeroes frames into the pool in batches — each batch's
/// refill wakes the waiting faults — yielding between batches so the CPU's other tasks
/// run meanwhile, until no fault waits. The idle work tops pools up in the background.
pub async fn zeroing_task(cpu: usize) {
    let (Some(frames), Some(pools), Some(exec)) =
        (FRAMES.get(), ZERO.get(), crate::executor::get())
    else {
        return;
    };
    loop {
        pools.demand(cpu).await;
        while pools.has_waiters(cpu) {
            IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            // A refill that finds no memory wakes the waiters with "none": they zero
            // on the spot or fail as out of memory, and the loop ends.
            let added = if above_reserve() {
                pools.refill(cpu, frames, DEMAND_BATCH, zero)
            } else {
                pools.wake_starved(cpu);
                0
            };
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            if added == 0 {
                // Nothing added (the pool is full, or memory is short): every waiter
                // must still wake and look again, or `demand` would resolve at once
                // for ever and this task would never yield (a CPU lost to one loop,
                // seen in a soak: its pinned threads never ran again).
                pools.wake_starved(cpu);
                break;
            }
            exec.yield_now().await;
        }
    }
}

/// Whether zeroing is paused (`pause_zeroing`): faults then zero on the spot.
pub fn zeroing_paused() -> bool {
    PAUSED.load(Ordering::SeqCst)
}

/// The executor's idle work: tops up this CPU's zeroed pool a little. Returns whether
/// it zeroed anything (then the CPU looks for tasks again before halting).
pub fn zero_when_idle() -> bool {
    let (Some(frames), Some(pools)) = (FRAMES.get(), ZERO.get()) else {
        return false;
    };
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let did = !PAUSED.load(Ordering::SeqCst) && {
        let cpu = percpu::current_index();
        pools.wants_frames(cpu)
            && above_reserve()
            && pools.refill(cpu, frames, ZERO_BATCH, zero) > 0
    };
    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    did
}

/// Stops idle zeroing and waits until no CPU is in the middle of a refill, so frame
/// counts hold still (for tests that compare them with a baseline). Returns a guard
/// that resumes zeroing when dropped.
pub fn pause_zeroing() -> ZeroingPaused {
    PAUSED.store(true, Ordering::SeqCst);
    while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
        core::hint::spin_loop();
    }
    ZeroingPaused
}

/// See `pause_zeroing`.
pub struct ZeroingPaused;

impl Drop for ZeroingPaused {
    fn drop(&mut self) {
        PAUSED.store(false, Ordering::SeqCst);
    }
}

/// Frames nobody uses: free, pooled (zeroed), or kept by the heap's slabs for reuse.
/// Constant while nothing holds frames and zeroing is paused, so leak tests compare it
/// with a baseline.
pub fn frames_not_in_use() -> u64 {
    let (Some(frames), Some(pools)) = (FRAMES.get(), ZERO.get()) else {
        return 0;
    };
    let pooled: u64 = (0..percpu::online_count())
        .map(|c| pools.stats(c).available as u64)
        .sum();
    frames.total_free() + pooled + crate::heap::slab_pages() as u64
}
