//! The zeroing policy, in one place: where a user fault's zeroed frame comes from, and
//! who zeroes frames ahead of need.
//!
//! A demand-zero fault takes a `ZeroedFrame` (`fault_frame`): from this CPU's pool in
//! O(1) (a *pool hit*); if the pool is empty and the CPU has other tasks to run, by
//! awaiting the pool — which wakes this CPU's zeroing task (`zeroing_task`) — so the
//! other tasks run meanwhile (a *pool wait*); otherwise by zeroing one on the spot
//! (`frame::alloc_user_zeroed`; with nothing else to run, waiting would only add two
//! task switches around the same zeroing). The pools are filled by each CPU's idle
//! work (`zero_when_idle`: its own pool, then the nearest busy CPU's) and by the
//! zeroing task; a pool that runs low wakes the nearest idle CPU to help.
//!
//! `mm.prezero=off` (`set_prezero`) turns the pools off (every fault zeroes inline);
//! `pause_zeroing` holds frame counts still for tests. The pools' bookkeeping is
//! `panda_mm::zero` (host-tested); the frames and the zeroing are `frame`'s.
//!
//! The scheduler is the kernel's (`panda-sched`, which this crate does not depend on):
//! the kernel connects the two calls the policy needs (`connect`) and spawns each CPU's
//! `zeroing_task` with its executor's yield.

use core::future::Future;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use panda_mm::CpuId;

use crate::frame::{self, above_reserve, ZeroedFrame};

static PAUSED: AtomicBool = AtomicBool::new(false);
/// Whether the zeroed pools are used at all (`mm.prezero=on|off`, default on).
static PREZERO: AtomicBool = AtomicBool::new(true);
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Frames zeroed per idle turn: small, so a task that becomes ready waits little.
const ZERO_BATCH: usize = 8;

/// Frames zeroed per batch of the on-demand zeroing task (it yields between batches).
const DEMAND_BATCH: usize = 16;

/// What the policy asks of the scheduler.
#[derive(Clone, Copy)]
pub struct Scheduler {
    /// Wakes the idle CPU nearest to the given one (to top up its pool).
    pub wake_idle_near: fn(CpuId),
    /// Whether the given CPU has tasks queued besides the running one.
    pub has_queued_work: fn(CpuId) -> bool,
}

static SCHEDULER: spin::Once<Scheduler> = spin::Once::new();

/// Connects the scheduler (once, at boot, before user threads run). Until then faults
/// never wait for the pool and nobody is woken to help.
pub fn connect(scheduler: Scheduler) {
    SCHEDULER.call_once(|| scheduler);
}

/// Where a fault's zeroed frame came from (the kernel counts them: `SystemInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Taken from the CPU's pool at once.
    PoolHit,
    /// Awaited from the pool while the zeroing task filled it.
    PoolWait,
    /// Zeroed on the spot, in `cycles` TSC cycles.
    ZeroedInline { cycles: u64 },
}

/// A zeroed frame for a fault on the calling CPU without waiting: a pool hit, or one
/// zeroed on the spot; `None` if the machine is out of frames (down to the reserve).
pub fn fault_frame_now() -> Option<(ZeroedFrame, Source)> {
    match pooled(crate::cpu::current()) {
        Some(z) => Some((z, Source::PoolHit)),
        None => zero_now(),
    }
}

/// A zeroed frame for a user fault on the calling CPU: from the pool, awaited from the
/// zeroing task, or zeroed on the spot (see the module's words); `None` if the machine
/// is out of frames.
pub async fn fault_frame() -> Option<(ZeroedFrame, Source)> {
    let cpu = crate::cpu::current();
    if let Some(z) = pooled(cpu) {
        return Some((z, Source::PoolHit));
    }
    let waits =
        prezero() && !zeroing_paused() && SCHEDULER.get().is_some_and(|s| (s.has_queued_work)(cpu));
    match frame::take_zeroed(cpu) {
        Some(take) if waits => match take.await {
            Some(z) => Some((z, Source::PoolWait)),
            None => zero_now(),
        },
        _ => zero_now(),
    }
}

/// A frame from CPU `cpu`'s pool, if it has one; never with the pools off
/// (`mm.prezero=off`). A pool that runs low wakes the nearest idle CPU to top it up:
/// this CPU never idles while it faults, and an idle CPU would otherwise sleep until
/// its next timer tick (10 ms, thousands of faults) while the pool runs dry.
fn pooled(cpu: CpuId) -> Option<ZeroedFrame> {
    if !prezero() {
        return None;
    }
    let (taken, wants_helper) = frame::take_for_fault(cpu);
    if wants_helper {
        if let Some(s) = SCHEDULER.get() {
            (s.wake_idle_near)(cpu);
        }
    }
    taken
}

/// A frame zeroed on the spot (the pool had none); refused below the kernel's reserve.
fn zero_now() -> Option<(ZeroedFrame, Source)> {
    let t0 = panda_arch::cpu::rdtsc();
    let frame = frame::alloc_user_zeroed()?;
    let cycles = panda_arch::cpu::rdtsc().wrapping_sub(t0);
    Some((frame, Source::ZeroedInline { cycles }))
}

/// CPU `cpu`'s zeroing task (the kernel spawns it pinned there at boot, with
/// `yield_now` its executor's yield): parked until a page fault waits on the empty
/// pool, then zeroes frames into the pool in batches — each batch's refill wakes the
/// waiting faults — yielding between batches so the CPU's other tasks run meanwhile,
/// until no fault waits. The idle work tops pools up in the background.
pub async fn zeroing_task<Y: Future<Output = ()>>(cpu: CpuId, mut yield_now: impl FnMut() -> Y) {
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
            yield_now().await;
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
        let cpu = crate::cpu::current();
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
