//! Physical memory at run time, the kernel's side: handing the boot memory map to the
//! frame allocator, and the zeroing policy (the on-demand zeroing task of each CPU, the
//! idle-time top-up, pausing it for tests that count frames).
//!
//! The allocator itself, its per-CPU caches and zeroed pools, and the owned `Frame`
//! type live in `panda_platform::frame` (frames are memory: only the platform layer may turn
//! a number into one). `init` runs once on the boot CPU after bring-up, when every
//! boot-time claim is recorded in the memory map: every usable and
//! bootloader-reclaimable range above 1 MiB becomes free frames, and from then on the
//! memory map is a record only.
//!
//! Each CPU's idle work zeroes frames into its pool (`zero_when_idle`), and into the
//! nearest busy CPU's once its own is full, so demand-zero faults of user threads can
//! take one in O(1). The kernel's reserve (`above_reserve`)
//! keeps user-caused allocations from taking the memory the kernel needs.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use panda_arch::percpu;
use panda_platform::frame;

pub use panda_platform::frame::{above_reserve, alloc_user as alloc_user_frame, reserve_frames};

use crate::boot::BootInfo;

static PAUSED: AtomicBool = AtomicBool::new(false);
/// Whether the zeroed pools are used at all (`mm.prezero=on|off`, default on).
static PREZERO: AtomicBool = AtomicBool::new(true);
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Frames zeroed per idle turn: small, so a task that becomes ready waits little.
const ZERO_BATCH: usize = 8;

/// Hands every free range of the boot memory map above 1 MiB to the frame allocator
/// (bootloader data is reclaimed too: by now the kernel runs on its own page tables,
/// GDT, IDT and stacks, and `BootInfo` holds copies of everything it needed from the
/// bootloader). Returns the frames it manages: 0 if the map was handed over already or
/// the kernel's tables are not active yet.
pub fn init(boot: &mut BootInfo, cpus: usize) -> u64 {
    match boot.memory_map.hand_over_free() {
        Some(free) => frame::init(cpus, free),
        None => 0,
    }
}

/// Frames zeroed per batch of the on-demand zeroing task (it yields between batches).
const DEMAND_BATCH: usize = 16;

/// CPU `cpu`'s zeroing task (spawned pinned there at boot): parked until a page fault
/// waits on the empty pool, then zeroes frames into the pool in batches — each batch's
/// refill wakes the waiting faults — yielding between batches so the CPU's other tasks
/// run meanwhile, until no fault waits. The idle work tops pools up in the background.
pub async fn zeroing_task(cpu: usize) {
    let Some(exec) = crate::executor::get() else {
        return;
    };
    loop {
        let Some(demand) = frame::pool_demand(cpu) else {
            return;
        };
        demand.await;
        while frame::pool_has_waiters(cpu) {
            IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            // A refill that finds no memory wakes the waiters with "none": they zero
            // on the spot or fail as out of memory, and the loop ends.
            let added = if above_reserve() {
                frame::refill_pool(cpu, DEMAND_BATCH)
            } else {
                frame::pool_wake_starved(cpu);
                0
            };
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            if added == 0 {
                // Nothing added (the pool is full, or memory is short): every waiter
                // must still wake and look again, or `demand` would resolve at once
                // for ever and this task would never yield (a CPU lost to one loop,
                // seen in a soak: its pinned threads never ran again).
                frame::pool_wake_starved(cpu);
                break;
            }
            exec.yield_now().await;
        }
    }
}

/// Turns the zeroed pools on or off (the `mm.prezero=` boot option, read once before
/// the executor starts). Off: no CPU zeroes frames ahead of need, and every demand-zero
/// fault zeroes its frame inline, so a benchmark can compare the two in one build.
pub fn set_prezero(on: bool) {
    PREZERO.store(on, Ordering::SeqCst);
}

/// Whether faults take frames from the zeroed pools and idle CPUs fill them.
pub fn prezero() -> bool {
    PREZERO.load(Ordering::Relaxed)
}

/// Whether zeroing is paused (`pause_zeroing`): faults then zero on the spot.
pub fn zeroing_paused() -> bool {
    PAUSED.load(Ordering::SeqCst)
}

/// The executor's idle work: tops up this CPU's zeroed pool a little, or, once it is
/// full, the pool of the nearest CPU that has room (a busy CPU never idles to fill its
/// own). Returns whether it zeroed anything (then the CPU looks for tasks again before
/// halting).
pub fn zero_when_idle() -> bool {
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let did = prezero() && !PAUSED.load(Ordering::SeqCst) && above_reserve() && {
        let cpu = percpu::current_index();
        if frame::pool_wants_frames(cpu) {
            frame::refill_pool(cpu, ZERO_BATCH) > 0
        } else {
            frame::pool_nearest_wanting(cpu)
                .is_some_and(|other| frame::refill_pool_for(other, ZERO_BATCH) > 0)
        }
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
    frame::total_free() + frame::pooled(percpu::online_count()) + crate::heap::slab_pages() as u64
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
