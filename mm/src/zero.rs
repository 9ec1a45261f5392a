//! Per-CPU pools of zeroed frames.
//!
//! A demand-zero page fault needs a frame full of zeros. Zeroing 4 KiB on the fault path
//! costs time the faulting thread waits for, so each CPU keeps a pool of frames zeroed
//! ahead of need by its idle work (`refill`). `try_take` is O(1) from the caller's pool;
//! `take` is a future that resolves once a frame is available, which is what the fault
//! path awaits when the pool is empty.
//!
//! A CPU whose own pool is full may zero frames for another CPU's pool (`refill_from`,
//! with `nearest_wanting` to pick the pool): a busy CPU never idles, so without help
//! its pool stays empty and every fault it takes zeroes inline.
//!
//! `ZeroedFrame` can only be made here, by `refill` right after the kernel's zeroing
//! function ran on the frame: the fault path cannot map a dirty frame by mistake.

use alloc::vec::Vec;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::task::{Context, Poll, Waker};

use crossbeam_utils::CachePadded;

use crate::cache::Frames;
use crate::{CpuId, MmError, PhysFrame, MAX_CPUS};

/// A frame known to hold only zeros.
#[derive(Debug, PartialEq, Eq)]
pub struct ZeroedFrame(PhysFrame);

impl ZeroedFrame {
    /// The frame (for mapping it).
    pub fn frame(&self) -> PhysFrame {
        self.0
    }

    /// Gives up the zeroed guarantee, e.g. once it is mapped or to free it.
    pub fn into_frame(self) -> PhysFrame {
        self.0
    }
}

/// Frames one CPU's pool holds at first, by default.
pub const POOL_CAPACITY: usize = 256;

/// The most a pool's limit grows to, by default (8 MiB of frames per CPU).
pub const POOL_MAX_CAPACITY: usize = 2048;

/// A pool that fills up this many times in a row with no take finding it empty in
/// between halves its limit (not below its starting capacity).
pub const SHRINK_AFTER_QUIET_FILLS: u32 = 64;

/// A pool below half its limit asks for a helper on its first take and then once
/// every this many takes while it stays low (`wants_helper`): often enough that a
/// helper that was busy elsewhere is asked again soon, rarely enough that the asking
/// (a look at every CPU's idle flag, perhaps an IPI) stays off most faults.
pub const HELP_EVERY: u32 = 16;

struct Pool {
    frames: Vec<PhysFrame>,
    /// Waiting takes, by key: a take that is dropped while waiting (its fault's process
    /// ended) removes its own waker, so the list holds only takes that still exist.
    waiters: Vec<(u64, Waker)>,
    /// The key the next waiting take gets.
    next_key: u64,
    /// The CPU's zeroing task, parked until a taker has to wait (`demand`).
    zeroer: Option<Waker>,
}

struct CpuPool {
    pool: spin::Mutex<Pool>,
    /// Set when a refill found no free frame: waiters then give up instead of waiting
    /// for a refill that cannot come. Cleared by the next refill that adds frames.
    starved: AtomicBool,
    /// Takes (hits and misses) while the pool was below half its limit; every
    /// `HELP_EVERY`-th sets `help`.
    low_takes: AtomicU32,
    /// The pool ran low and asks for a helper (`wants_helper` answers it once).
    help: AtomicBool,
    /// How many frames the pool holds at most now: sized to the demand (see
    /// `ZeroPools::with_limits`).
    limit: AtomicUsize,
    /// A take found the pool empty since it was last full.
    ran_dry: AtomicBool,
    /// Fills to the limit in a row with no take finding the pool empty in between.
    quiet_fills: AtomicU32,
    /// Times this pool's waiters were woken (by a refill, or as starved).
    wakes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    zeroed: AtomicU64,
    /// Of `zeroed`, frames another CPU zeroed into this pool.
    from_others: AtomicU64,
}

/// Counters of one CPU's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub available: usize,
    pub hits: u64,
    pub misses: u64,
    pub zeroed: u64,
    /// Of `zeroed`, frames other CPUs zeroed into this pool (`refill_from`).
    pub from_others: u64,
    /// How many frames the pool may hold now (its limit, sized to the demand).
    pub limit: usize,
}

/// The zeroed-frame pools of every CPU.
pub struct ZeroPools {
    cpus: Vec<CachePadded<CpuPool>>,
    capacity: usize,
    max: usize,
}

impl ZeroPools {
    /// Pools of `POOL_CAPACITY` frames for CPUs `0..cpus`.
    pub fn new(cpus: usize) -> Self {
        Self::with_capacity(cpus, POOL_CAPACITY)
    }

    /// Pools of at most `capacity` frames each, never more.
    pub fn with_capacity(cpus: usize, capacity: usize) -> Self {
        Self::with_limits(cpus, capacity, capacity)
    }

    /// Pools sized to the demand: each starts at `capacity` frames; a pool that a take
    /// found empty since it was last full doubles its limit at its next fill (up to
    /// `max`), and one that fills `SHRINK_AFTER_QUIET_FILLS` times in a row without
    /// running dry halves it (down to `capacity`). So a CPU whose bursts of faults
    /// outgrow its pool gets a pool that holds a burst, when idle time refills it, and
    /// gives the frames back when the bursts stop. The kernel scales both bounds to
    /// memory, so many CPUs on a small machine do not park much of it in pools. Each
    /// pool's list is allocated for `max` up front: it never grows on the kernel heap.
    pub fn with_limits(cpus: usize, capacity: usize, max: usize) -> Self {
        let capacity = capacity.max(1);
        let max = max.max(capacity);
        Self {
            capacity,
            max,
            cpus: (0..cpus.clamp(1, MAX_CPUS))
                .map(|_| {
                    CachePadded::new(CpuPool {
                        pool: spin::Mutex::new(Pool {
                            frames: Vec::with_capacity(max),
                            waiters: Vec::new(),
                            next_key: 0,
                            zeroer: None,
                        }),
                        starved: AtomicBool::new(false),
                        low_takes: AtomicU32::new(0),
                        help: AtomicBool::new(false),
                        limit: AtomicUsize::new(capacity),
                        ran_dry: AtomicBool::new(false),
                        quiet_fills: AtomicU32::new(0),
                        wakes: AtomicU64::new(0),
                        hits: AtomicU64::new(0),
                        misses: AtomicU64::new(0),
                        zeroed: AtomicU64::new(0),
                        from_others: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    /// Frames each pool holds at first (and at least, as its limit).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// CPU `cpu`'s limit now: how many frames its pool may hold.
    pub fn limit(&self, cpu: CpuId) -> usize {
        self.cpu(cpu).limit.load(Ordering::Relaxed)
    }

    /// CPU `cpu`'s pool (an index past the pools is a kernel bug: it panics, never
    /// borrows another CPU's pool).
    fn cpu(&self, cpu: CpuId) -> &CpuPool {
        &self.cpus[cpu.index()]
    }

    /// A zeroed frame from CPU `cpu`'s pool, if it has one. O(1).
    pub fn try_take(&self, cpu: CpuId) -> Option<ZeroedFrame> {
        let c = self.cpu(cpu);
        let (frame, left) = {
            let mut pool = c.pool.lock();
            let frame = pool.frames.pop();
            (frame, pool.frames.len())
        };
        if frame.is_none() {
            c.ran_dry.store(true, Ordering::Relaxed);
        }
        if left < c.limit.load(Ordering::Relaxed) / 2
            && c.low_takes
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(HELP_EVERY)
        {
            c.help.store(true, Ordering::Relaxed);
        }
        match frame {
            Some(f) => {
                c.hits.fetch_add(1, Ordering::Relaxed);
                Some(ZeroedFrame(f))
            }
            None => {
                c.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// A future for a zeroed frame from CPU `cpu`'s pool: ready at once on a hit,
    /// otherwise woken by the next `refill` of that pool. Resolves to `None` when a
    /// refill found memory exhausted.
    pub fn take(&self, cpu: CpuId) -> TakeZeroed<'_> {
        TakeZeroed {
            pools: self,
            cpu,
            counted: false,
            seen_wakes: 0,
            key: None,
        }
    }

    /// Tops CPU `cpu`'s pool up by at most `budget` frames taken from `frames` and
    /// zeroed by `zero` (which must write zeros over the whole frame). Returns how many
    /// were added; wakes the tasks waiting for one.
    pub fn refill(
        &self,
        cpu: CpuId,
        frames: &Frames,
        budget: usize,
        zero: impl FnMut(PhysFrame),
    ) -> usize {
        self.refill_from(cpu, cpu, frames, budget, zero)
    }

    /// `refill` of CPU `cpu`'s pool done by CPU `source`: the frames come from
    /// `source`'s frame cache (its own, uncontended), are zeroed by `source`, and only
    /// the push takes `cpu`'s pool lock. Returns how many were added; wakes `cpu`'s
    /// waiters.
    pub fn refill_from(
        &self,
        cpu: CpuId,
        source: CpuId,
        frames: &Frames,
        budget: usize,
        mut zero: impl FnMut(PhysFrame),
    ) -> usize {
        let c = self.cpu(cpu);
        let limit = c.limit.load(Ordering::Relaxed);
        let room = limit.saturating_sub(c.pool.lock().frames.len()).min(budget);
        let mut added = 0;
        for _ in 0..room {
            let Ok(frame) = frames.alloc(source) else {
                break;
            };
            // Zero outside the pool's lock: takers are not held up by it.
            zero(frame);
            // Another CPU may have filled the pool meanwhile (its owner and idle
            // helpers refill it at once): the capacity is a bound, so the frame goes
            // back rather than past it (a pool's list must not grow either: it would
            // reallocate on the kernel heap).
            let mut pool = c.pool.lock();
            if pool.frames.len() >= limit {
                drop(pool);
                let _ = frames.free(source, frame);
                break;
            }
            pool.frames.push(frame);
            let full = pool.frames.len() >= limit;
            drop(pool);
            added += 1;
            if full {
                self.resize_when_full(c, limit);
            }
        }
        c.zeroed.fetch_add(added as u64, Ordering::Relaxed);
        if source != cpu {
            c.from_others.fetch_add(added as u64, Ordering::Relaxed);
        }
        // Wake the waiters if there is a frame for them, or if there will be none (no
        // free memory): either way they must look again.
        let starved = added == 0 && room > 0;
        c.starved.store(starved, Ordering::SeqCst);
        if added > 0 || starved {
            c.wakes.fetch_add(1, Ordering::SeqCst);
            let waiters = core::mem::take(&mut c.pool.lock().waiters);
            for (_, w) in waiters {
                w.wake();
            }
        }
        added
    }

    /// The pool just reached its limit `limit`: double the limit if a take found the
    /// pool empty since it was last full (the demand between two fills outgrew it), or
    /// halve it after `SHRINK_AFTER_QUIET_FILLS` quiet fills. Frames above a lowered
    /// limit stay and are taken first.
    fn resize_when_full(&self, c: &CpuPool, limit: usize) {
        if c.ran_dry.swap(false, Ordering::Relaxed) {
            c.quiet_fills.store(0, Ordering::Relaxed);
            c.limit.store((limit * 2).min(self.max), Ordering::Relaxed);
        } else if c.quiet_fills.fetch_add(1, Ordering::Relaxed) + 1 >= SHRINK_AFTER_QUIET_FILLS {
            c.quiet_fills.store(0, Ordering::Relaxed);
            c.limit
                .store((limit / 2).max(self.capacity), Ordering::Relaxed);
        }
    }

    /// Tells CPU `cpu`'s waiters that no frame is coming (the caller decided not to
    /// refill, e.g. memory is down to the kernel's reserve): they wake and look again,
    /// finding the pool starved.
    pub fn wake_starved(&self, cpu: CpuId) {
        let c = self.cpu(cpu);
        c.starved.store(true, Ordering::SeqCst);
        c.wakes.fetch_add(1, Ordering::SeqCst);
        let waiters = core::mem::take(&mut c.pool.lock().waiters);
        for (_, w) in waiters {
            w.wake();
        }
    }

    /// A future for CPU `cpu`'s zeroing task: resolves when a `take` is waiting on the
    /// empty pool (at once if one already is). The task then refills the pool, which
    /// wakes the waiters, and yields between batches so the CPU's other work runs.
    pub fn demand(&self, cpu: CpuId) -> Demand<'_> {
        Demand { pools: self, cpu }
    }

    /// Whether a `take` waits on CPU `cpu`'s pool.
    pub fn has_waiters(&self, cpu: CpuId) -> bool {
        !self.cpu(cpu).pool.lock().waiters.is_empty()
    }

    /// Returns every pooled frame of every CPU to `frames` (e.g. before counting).
    pub fn drain(&self, frames: &Frames) -> Result<usize, MmError> {
        let mut n = 0;
        // The pools are built for at most MAX_CPUS CPUs: the zip covers them all.
        for (cpu, c) in CpuId::all(MAX_CPUS).zip(self.cpus.iter()) {
            let taken = core::mem::take(&mut c.pool.lock().frames);
            n += taken.len();
            for f in taken {
                frames.free(cpu, f)?;
            }
        }
        Ok(n)
    }

    /// A fault's take: `try_take` and `wants_helper` in one call, so the fault path
    /// reaches the pool once: the frame, if the pool had one, and whether to wake a
    /// helper now.
    pub fn take_for_fault(&self, cpu: CpuId) -> (Option<ZeroedFrame>, bool) {
        let frame = self.try_take(cpu);
        (frame, self.wants_helper(cpu))
    }

    /// Whether CPU `cpu`'s pool ran low (below half its limit) and asks for a helper
    /// now: true once at its first low take and then once every `HELP_EVERY` low takes
    /// (this call answers the request). A busy CPU never idles, so its pool is filled
    /// only by idle CPUs; it calls this after each take and, on true, wakes the nearest
    /// idle CPU, which would otherwise sleep until its next timer tick while the pool
    /// runs dry.
    pub fn wants_helper(&self, cpu: CpuId) -> bool {
        let c = self.cpu(cpu);
        c.help.load(Ordering::Relaxed) && c.help.swap(false, Ordering::Relaxed)
    }

    /// Whether CPU `cpu`'s pool has room (the idle task uses it to decide to zero).
    pub fn wants_frames(&self, cpu: CpuId) -> bool {
        let c = self.cpu(cpu);
        c.pool.lock().frames.len() < c.limit.load(Ordering::Relaxed)
    }

    /// The CPU nearest to `cpu` (by number: `cpu + 1`, `cpu - 1`, `cpu + 2`, ...,
    /// wrapping round) whose pool has room, other than `cpu` itself: whom an idle CPU
    /// with a full pool zeroes for. `None` if every other pool is full.
    pub fn nearest_wanting(&self, cpu: CpuId) -> Option<CpuId> {
        let n = self.cpus.len();
        assert!(
            cpu.index() < n,
            "cpu {cpu} has no zeroed pool (there are {n})"
        );
        crate::cpus_nearest_first(cpu, n).find(|&c| self.wants_frames(c))
    }

    pub fn stats(&self, cpu: CpuId) -> PoolStats {
        let c = self.cpu(cpu);
        PoolStats {
            available: c.pool.lock().frames.len(),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            zeroed: c.zeroed.load(Ordering::Relaxed),
            from_others: c.from_others.load(Ordering::Relaxed),
            limit: c.limit.load(Ordering::Relaxed),
        }
    }
}

/// See `ZeroPools::take`.
pub struct TakeZeroed<'a> {
    pools: &'a ZeroPools,
    cpu: CpuId,
    counted: bool,
    /// The pool's wake count when this take last registered as a waiter.
    seen_wakes: u64,
    /// The key of this take's entry in the pool's waiters, once it registered (the
    /// entry may since have gone with a wake).
    key: Option<u64>,
}

impl Future for TakeZeroed<'_> {
    type Output = Option<ZeroedFrame>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ZeroedFrame>> {
        let c = self.pools.cpu(self.cpu);
        let mut pool = c.pool.lock();
        if let Some(f) = pool.frames.pop() {
            drop(pool);
            if !self.counted {
                c.hits.fetch_add(1, Ordering::Relaxed);
            }
            return Poll::Ready(Some(ZeroedFrame(f)));
        }
        if self.counted && c.wakes.load(Ordering::SeqCst) != self.seen_wakes {
            // Woken since it waited, and the pool is empty again: a refill found no
            // memory, or other takers on this CPU got the new frames first. Waiting
            // again could go on for ever under steady demand (a soak saw a thread wait
            // over 30 s): the caller zeroes a frame itself instead.
            return Poll::Ready(None);
        }
        self.seen_wakes = c.wakes.load(Ordering::SeqCst);
        // Register under the pool lock: a refill after this point sees the waker. A
        // take polled again while still registered swaps its waker in place.
        let key = self.key;
        let mut replaced = None;
        match pool.waiters.iter_mut().find(|(k, _)| Some(*k) == key) {
            Some((_, w)) => {
                if !w.will_wake(cx.waker()) {
                    replaced = Some(core::mem::replace(w, cx.waker().clone()));
                }
            }
            None => {
                let key = pool.next_key;
                pool.next_key += 1;
                pool.waiters.push((key, cx.waker().clone()));
                self.key = Some(key);
            }
        }
        // And call the CPU's zeroing task, if it is parked.
        let zeroer = pool.zeroer.take();
        drop(pool);
        // Dropped with the lock released: dropping a waker may free a task whose
        // future holds another take of this pool.
        drop(replaced);
        if let Some(z) = zeroer {
            z.wake();
        }
        if !self.counted {
            self.counted = true;
            c.misses.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Pending
    }
}

impl Drop for TakeZeroed<'_> {
    /// A take dropped while waiting (its task was cancelled: the fault's process ended)
    /// takes its waker out of the pool's list; the list would otherwise keep it, and
    /// the task it names, until the next wake.
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let removed = {
            let mut pool = self.pools.cpu(self.cpu).pool.lock();
            let removed = pool
                .waiters
                .iter()
                .position(|(k, _)| *k == key)
                .map(|i| pool.waiters.swap_remove(i));
            if pool.waiters.is_empty() {
                pool.waiters = Vec::new();
            }
            removed
        };
        drop(removed);
    }
}

/// See `ZeroPools::demand`.
pub struct Demand<'a> {
    pools: &'a ZeroPools,
    cpu: CpuId,
}

impl Future for Demand<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut pool = self.pools.cpu(self.cpu).pool.lock();
        if !pool.waiters.is_empty() {
            return Poll::Ready(());
        }
        pool.zeroer = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_id(i: usize) -> CpuId {
        CpuId::new(i).unwrap()
    }
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};
    use std::task::Wake;

    /// A fake physical memory: frame -> first byte, so "dirty" is observable.
    struct Memory(Mutex<HashMap<u64, u8>>);
    impl Memory {
        fn new() -> Self {
            Self(Mutex::new(HashMap::new()))
        }
        fn dirty(&self, f: PhysFrame) {
            self.0.lock().unwrap().insert(f.addr(), 0xaa);
        }
        fn zero(&self, f: PhysFrame) {
            self.0.lock().unwrap().insert(f.addr(), 0);
        }
        fn is_zero(&self, f: PhysFrame) -> bool {
            self.0.lock().unwrap().get(&f.addr()).copied().unwrap_or(0) == 0
        }
    }

    fn frames(n: u64) -> Frames {
        let f = Frames::new(2);
        f.add_range(0x200_0000, 0x200_0000 + n * 4096);
        f
    }

    /// 64 frames, each dirtied once through a normal allocation cycle on CPU 0 (so
    /// they sit in CPU 0's cache, dirty), and the memory that records it.
    fn dirty_frames() -> (Frames, Memory) {
        let (frames, mem) = (frames(64), Memory::new());
        let all: Vec<_> = (0..64).map(|_| frames.alloc(cpu_id(0)).unwrap()).collect();
        for &f in &all {
            mem.dirty(f);
        }
        for f in all {
            frames.free(cpu_id(0), f).unwrap();
        }
        (frames, mem)
    }

    #[test]
    fn refilled_frames_are_zero_even_after_reuse() {
        let ((frames, mem), pools) = (dirty_frames(), ZeroPools::new(2));
        assert_eq!(pools.refill(cpu_id(0), &frames, 16, |f| mem.zero(f)), 16);
        for _ in 0..16 {
            let z = pools.try_take(cpu_id(0)).expect("pool has frames");
            assert!(mem.is_zero(z.frame()), "pool handed out a dirty frame");
        }
        assert!(pools.try_take(cpu_id(0)).is_none());
        let s = pools.stats(cpu_id(0));
        assert_eq!((s.hits, s.misses, s.zeroed), (16, 1, 16));
    }

    #[test]
    fn pools_are_per_cpu_and_bounded() {
        let (frames, pools) = (frames(1024), ZeroPools::new(2));
        assert_eq!(
            pools.refill(cpu_id(1), &frames, 10_000, |_| {}),
            POOL_CAPACITY
        );
        assert!(!pools.wants_frames(cpu_id(1)));
        assert!(
            pools.try_take(cpu_id(0)).is_none(),
            "CPU 0 took from CPU 1's pool"
        );
        assert!(pools.try_take(cpu_id(1)).is_some());
        assert_eq!(pools.drain(&frames).unwrap(), POOL_CAPACITY - 1);
    }

    #[test]
    fn refill_stops_cleanly_when_memory_runs_out() {
        let (frames, pools) = (frames(10), ZeroPools::new(1));
        assert_eq!(pools.refill(cpu_id(0), &frames, 100, |_| {}), 10);
        assert_eq!(pools.refill(cpu_id(0), &frames, 100, |_| {}), 0);
        pools.drain(&frames).unwrap();
        assert_eq!(frames.total_free(), 10);
    }

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn take_waits_for_a_refill_and_is_woken_by_it() {
        let (frames, pools) = (frames(8), ZeroPools::new(1));
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pools.take(cpu_id(0));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        pools.refill(cpu_id(0), &frames, 1, |_| {});
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "refill did not wake the waiter (once)"
        );
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(Some(_))
        ));
        assert_eq!(
            pools.stats(cpu_id(0)).misses,
            1,
            "a waiting take counts one miss"
        );
    }

    #[test]
    fn a_take_dropped_while_waiting_leaves_no_waiter() {
        let pools = ZeroPools::new(1);
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let other = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let other_waker = Waker::from(other.clone());
        // Many takes waiting, each polled twice (the second time with another waker,
        // as after a task moved), then dropped without a refill: a cancelled fault.
        for _ in 0..100 {
            let mut fut = pools.take(cpu_id(0));
            assert!(Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            assert!(Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&other_waker))
                .is_pending());
            assert!(pools.has_waiters(cpu_id(0)));
            assert_eq!(
                pools.cpu(cpu_id(0)).pool.lock().waiters.len(),
                1,
                "one entry per take"
            );
            drop(fut);
            assert!(
                !pools.has_waiters(cpu_id(0)),
                "a dropped take left its waker"
            );
        }
        assert_eq!(
            Arc::strong_count(&count),
            2,
            "a waker kept alive (the test's own)"
        );
        assert_eq!(
            Arc::strong_count(&other),
            2,
            "a waker kept alive (the test's own)"
        );
        // Dropping one of two waiting takes leaves the other's entry.
        let (mut a, mut b) = (pools.take(cpu_id(0)), pools.take(cpu_id(0)));
        assert!(Pin::new(&mut a)
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert!(Pin::new(&mut b)
            .poll(&mut Context::from_waker(&other_waker))
            .is_pending());
        drop(a);
        let left = pools.cpu(cpu_id(0)).pool.lock().waiters.len();
        assert_eq!(left, 1);
        let frames = frames(4);
        pools.refill(cpu_id(0), &frames, 1, |_| {});
        assert_eq!(
            other.0.load(Ordering::SeqCst),
            1,
            "the remaining take was woken"
        );
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "the dropped take was woken"
        );
        assert!(matches!(
            Pin::new(&mut b).poll(&mut Context::from_waker(&other_waker)),
            Poll::Ready(Some(_))
        ));
    }

    #[test]
    fn a_woken_take_that_finds_the_frames_gone_gives_up_instead_of_waiting_again() {
        let (frames, pools) = (frames(8), ZeroPools::new(1));
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pools.take(cpu_id(0));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        pools.refill(cpu_id(0), &frames, 1, |_| {});
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the refill woke the waiter"
        );
        // Another fault on this CPU takes the new frame before the waiter runs.
        let stolen = pools.try_take(cpu_id(0)).expect("the refilled frame");
        assert!(
            matches!(Pin::new(&mut fut).poll(&mut cx), Poll::Ready(None)),
            "a woken waiter must not wait again (it zeroes its own frame)"
        );
        let _ = stolen;
    }

    #[test]
    fn a_waiting_take_gives_up_when_memory_is_exhausted() {
        let (frames, pools) = (frames(1), ZeroPools::new(1));
        let only = frames.alloc(cpu_id(0)).unwrap();
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pools.take(cpu_id(0));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(pools.refill(cpu_id(0), &frames, 4, |_| {}), 0);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the waiter was not told");
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(None)
        ));
        frames.free(cpu_id(0), only).unwrap();
        assert_eq!(
            pools.refill(cpu_id(0), &frames, 4, |_| {}),
            1,
            "memory is back"
        );
    }

    #[test]
    fn a_waiting_take_calls_the_parked_zeroer() {
        let (frames, pools) = (frames(8), ZeroPools::new(2));
        let zeroer = Arc::new(CountWake(AtomicUsize::new(0)));
        let zeroer_waker = Waker::from(zeroer.clone());
        let mut zcx = Context::from_waker(&zeroer_waker);
        let mut demand = pools.demand(cpu_id(0));
        assert!(
            Pin::new(&mut demand).poll(&mut zcx).is_pending(),
            "demand without a taker"
        );
        let taker = Arc::new(CountWake(AtomicUsize::new(0)));
        let taker_waker = Waker::from(taker.clone());
        let mut tcx = Context::from_waker(&taker_waker);
        // A take on the other CPU's pool does not concern this zeroer.
        let mut other = pools.take(cpu_id(1));
        assert!(Pin::new(&mut other).poll(&mut tcx).is_pending());
        assert_eq!(zeroer.0.load(Ordering::SeqCst), 0, "woken for another CPU");
        let mut take = pools.take(cpu_id(0));
        assert!(Pin::new(&mut take).poll(&mut tcx).is_pending());
        assert_eq!(
            zeroer.0.load(Ordering::SeqCst),
            1,
            "the waiting take did not call the zeroer"
        );
        assert!(pools.has_waiters(cpu_id(0)));
        assert!(Pin::new(&mut demand).poll(&mut zcx).is_ready());
        pools.refill(cpu_id(0), &frames, 2, |_| {});
        assert!(!pools.has_waiters(cpu_id(0)));
        assert!(matches!(
            Pin::new(&mut take).poll(&mut tcx),
            Poll::Ready(Some(_))
        ));
    }

    #[test]
    fn capacity_cpu_numbers_and_wanting_frames() {
        let (frames, pools) = (frames(64), ZeroPools::with_capacity(2, 3));
        assert_eq!(pools.capacity(), 3);
        assert_eq!(
            ZeroPools::with_capacity(1, 0).capacity(),
            1,
            "at least one frame"
        );
        assert_eq!(ZeroPools::new(1).capacity(), POOL_CAPACITY);
        assert!(pools.wants_frames(cpu_id(0)) && pools.wants_frames(cpu_id(1)));
        assert_eq!(pools.refill(cpu_id(1), &frames, 2, |_| {}), 2);
        assert!(pools.wants_frames(cpu_id(1)), "2 of 3");
        assert_eq!(
            pools.refill(cpu_id(1), &frames, 10, |_| {}),
            1,
            "up to capacity"
        );
        assert!(!pools.wants_frames(cpu_id(1)) && pools.wants_frames(cpu_id(0)));
        assert_eq!(pools.stats(cpu_id(1)).available, 3);
        assert!(pools.try_take(cpu_id(1)).is_some());
        assert_eq!(pools.stats(cpu_id(1)).available, 2);
        assert_eq!(pools.drain(&frames).unwrap(), 2);
    }

    /// CPU 0 zeroes into CPU 1's pool: the frames come from CPU 0's cache, land in
    /// CPU 1's pool (not CPU 0's), are zeroed, wake CPU 1's waiter, and count as
    /// zeroed by another CPU.
    #[test]
    fn refill_from_fills_another_cpus_pool_from_the_sources_cache() {
        let ((frames, mem), pools) = (dirty_frames(), ZeroPools::new(2));
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pools.take(cpu_id(1));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        let cached_before = (
            frames.stats(cpu_id(0)).cached,
            frames.stats(cpu_id(1)).cached,
        );
        assert_eq!(
            pools.refill_from(cpu_id(1), cpu_id(0), &frames, 8, |f| mem.zero(f)),
            8
        );
        assert_eq!(
            (
                frames.stats(cpu_id(0)).cached,
                frames.stats(cpu_id(1)).cached
            ),
            (cached_before.0 - 8, cached_before.1),
            "the frames must come from the source CPU's cache"
        );
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "CPU 1's waiter not woken"
        );
        assert_eq!(
            pools.stats(cpu_id(0)).available,
            0,
            "landed in the source's pool"
        );
        let s = pools.stats(cpu_id(1));
        assert_eq!((s.available, s.zeroed, s.from_others), (8, 8, 8));
        while let Some(z) = pools.try_take(cpu_id(1)) {
            assert!(
                mem.is_zero(z.frame()),
                "another CPU's refill left a dirty frame"
            );
        }
        assert_eq!(pools.refill(cpu_id(0), &frames, 2, |_| {}), 2);
        assert_eq!(
            pools.stats(cpu_id(0)).from_others,
            0,
            "an own refill is not another's"
        );
        assert_eq!(pools.stats(cpu_id(1)).from_others, 8);
    }

    /// Two refills of one pool at once (its owner and an idle helper) never take it
    /// past its capacity: the one that finds it full gives its frame back.
    #[test]
    fn concurrent_refills_never_overfill_a_pool() {
        let (frames, pools) = (frames(64), ZeroPools::with_capacity(2, 3));
        let total = frames.total_free();
        let mut first = true;
        let added = pools.refill_from(cpu_id(1), cpu_id(0), &frames, 3, |_| {
            if core::mem::take(&mut first) {
                // Meanwhile CPU 1 fills its own pool.
                assert_eq!(pools.refill(cpu_id(1), &frames, 3, |_| {}), 3);
            }
        });
        assert_eq!(added, 0, "the helper pushed into a full pool");
        assert_eq!(pools.stats(cpu_id(1)).available, 3, "past the capacity");
        assert_eq!(
            frames.total_free() + 3,
            total,
            "the helper's frame did not go back"
        );
    }

    /// The nearest other CPU with room, by number in both directions, wrapping; never
    /// the CPU itself; none when every other pool is full.
    #[test]
    fn nearest_wanting_is_the_closest_other_pool_with_room() {
        let frames = Frames::new(5);
        frames.add_range(0x200_0000, 0x200_0000 + 1024 * 4096);
        let pools = ZeroPools::with_capacity(5, 2);
        assert_eq!(pools.nearest_wanting(cpu_id(2)), Some(cpu_id(3)));
        pools.refill(cpu_id(3), &frames, 2, |_| {});
        assert_eq!(
            pools.nearest_wanting(cpu_id(2)),
            Some(cpu_id(1)),
            "3 is full: 1 is as near"
        );
        pools.refill(cpu_id(1), &frames, 2, |_| {});
        assert_eq!(pools.nearest_wanting(cpu_id(2)), Some(cpu_id(4)));
        assert_eq!(
            pools.nearest_wanting(cpu_id(0)),
            Some(cpu_id(4)),
            "wraps round: 4 is next to 0"
        );
        pools.refill(cpu_id(4), &frames, 2, |_| {});
        assert_eq!(pools.nearest_wanting(cpu_id(2)), Some(cpu_id(0)));
        pools.refill(cpu_id(0), &frames, 2, |_| {});
        assert_eq!(
            pools.nearest_wanting(cpu_id(2)),
            None,
            "only cpu 2 itself has room"
        );
        assert_eq!(pools.nearest_wanting(cpu_id(0)), Some(cpu_id(2)));
        assert_eq!(
            ZeroPools::new(1).nearest_wanting(CpuId::BOOT),
            None,
            "no other CPU"
        );
    }

    /// A pool asks for a helper only once it is below half full: at its first low take,
    /// then once every `HELP_EVERY` low takes (misses count: an empty pool is low), and
    /// each request is answered once.
    #[test]
    fn a_low_pool_asks_for_a_helper_once_every_few_takes() {
        let frames = Frames::new(1);
        frames.add_range(0x200_0000, 0x200_0000 + 1024 * 4096);
        let pools = ZeroPools::with_capacity(1, 8);
        pools.refill(cpu_id(0), &frames, 8, |_| {});
        for left in (4..8).rev() {
            assert!(pools.try_take(cpu_id(0)).is_some());
            assert!(
                !pools.wants_helper(cpu_id(0)),
                "{left} of 8 left: not low yet"
            );
        }
        assert!(pools.try_take(cpu_id(0)).is_some());
        assert!(
            pools.wants_helper(cpu_id(0)),
            "3 of 8 left: low, first take asks"
        );
        assert!(!pools.wants_helper(cpu_id(0)), "a request is answered once");
        let mut asked = 0;
        for _ in 0..HELP_EVERY * 3 {
            let _ = pools.try_take(cpu_id(0));
            asked += usize::from(pools.wants_helper(cpu_id(0)));
        }
        assert_eq!(asked, 3, "once every HELP_EVERY low takes, misses included");
        assert_eq!(pools.stats(cpu_id(0)).available, 0);
        // Refilled above half: quiet again.
        pools.refill(cpu_id(0), &frames, 8, |_| {});
        let _ = pools.try_take(cpu_id(0));
        assert!(!pools.wants_helper(cpu_id(0)));
    }

    /// A fault's one call (`take_for_fault`) answers both questions as the two calls
    /// do: the frame, and the helper request at the first low take, once.
    #[test]
    fn a_faults_take_says_when_to_wake_a_helper() {
        let frames = Frames::new(1);
        frames.add_range(0x200_0000, 0x200_0000 + 1024 * 4096);
        let pools = ZeroPools::with_capacity(1, 8);
        pools.refill(cpu_id(0), &frames, 8, |_| {});
        let asks: [bool; 5] = core::array::from_fn(|_| {
            let (frame, help) = pools.take_for_fault(cpu_id(0));
            assert!(frame.is_some());
            help
        });
        assert_eq!(asks, [false, false, false, false, true]);
        let (frame, help) = pools.take_for_fault(cpu_id(0));
        assert!(frame.is_some() && !help, "a request is answered once");
    }

    /// A pool's limit follows the demand: a pool found empty since it was last full
    /// doubles its limit at its next fill, up to the maximum; quiet fills (no take found
    /// it empty) halve it after `SHRINK_AFTER_QUIET_FILLS` of them, down to the start.
    #[test]
    fn a_pool_that_runs_dry_grows_and_a_quiet_one_shrinks_back() {
        let frames = Frames::new(1);
        frames.add_range(0x200_0000, 0x200_0000 + 1024 * 4096);
        let pools = ZeroPools::with_limits(1, 4, 16);
        let fill = |pools: &ZeroPools| pools.refill(cpu_id(0), &frames, 64, |_| {});
        // Takes one frame and gives it back to the allocator (the test runs many fills).
        let take = |pools: &ZeroPools| match pools.try_take(cpu_id(0)) {
            Some(z) => frames.free(cpu_id(0), z.into_frame()).is_ok(),
            None => false,
        };
        let drain = |pools: &ZeroPools| while take(pools) {};
        assert_eq!(fill(&pools), 4);
        assert_eq!(pools.limit(cpu_id(0)), 4, "no take ran it dry yet");
        // Emptied, but no take found it empty: no growth.
        for _ in 0..4 {
            assert!(take(&pools));
        }
        assert_eq!(fill(&pools), 4);
        assert_eq!(pools.limit(cpu_id(0)), 4);
        // Found empty: the next fill doubles the limit, each time, up to 16.
        for want in [8, 16, 16] {
            drain(&pools);
            fill(&pools);
            assert_eq!(pools.limit(cpu_id(0)), want);
        }
        assert_eq!(fill(&pools), 0, "full at 16");
        assert_eq!(pools.stats(cpu_id(0)).available, 16);
        // Quiet fills (emptied without running dry) shrink it after enough of them.
        for i in 0..SHRINK_AFTER_QUIET_FILLS * 2 {
            while pools.stats(cpu_id(0)).available > 0 {
                assert!(take(&pools));
            }
            fill(&pools);
            let want = match i + 1 {
                n if n < SHRINK_AFTER_QUIET_FILLS => 16,
                n if n < SHRINK_AFTER_QUIET_FILLS * 2 => 8,
                _ => 4,
            };
            assert_eq!(pools.limit(cpu_id(0)), want, "after {} quiet fills", i + 1);
        }
        // A fixed-size pool never grows.
        let fixed = ZeroPools::with_capacity(1, 4);
        fixed.refill(cpu_id(0), &frames, 64, |_| {});
        while let Some(z) = fixed.try_take(cpu_id(0)) {
            frames.free(cpu_id(0), z.into_frame()).unwrap();
        }
        fixed.refill(cpu_id(0), &frames, 64, |_| {});
        assert_eq!(fixed.limit(cpu_id(0)), 4);
    }

    /// A CPU number past the last is a kernel bug: it panics, never borrows another
    /// CPU's pool.
    #[test]
    #[should_panic]
    fn a_cpu_number_past_the_last_panics() {
        let _ = ZeroPools::new(2).try_take(cpu_id(2));
    }

    /// A take served at once counts a hit; one that had to wait counts a miss and no
    /// hit when it is served.
    #[test]
    fn hits_and_misses_of_take() {
        let (frames, pools) = (frames(8), ZeroPools::new(1));
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        pools.refill(cpu_id(0), &frames, 1, |_| {});
        let mut now = pools.take(cpu_id(0));
        assert!(matches!(
            Pin::new(&mut now).poll(&mut cx),
            Poll::Ready(Some(_))
        ));
        assert_eq!(
            (pools.stats(cpu_id(0)).hits, pools.stats(cpu_id(0)).misses),
            (1, 0)
        );
        let mut later = pools.take(cpu_id(0));
        assert!(Pin::new(&mut later).poll(&mut cx).is_pending());
        pools.refill(cpu_id(0), &frames, 1, |_| {});
        assert!(matches!(
            Pin::new(&mut later).poll(&mut cx),
            Poll::Ready(Some(_))
        ));
        assert_eq!(
            (pools.stats(cpu_id(0)).hits, pools.stats(cpu_id(0)).misses),
            (1, 1)
        );
    }

    /// A refill that adds nothing because it was given no budget (or the pool has no
    /// room) is not news for the waiters: they keep waiting. `wake_starved` is: they
    /// wake and give up.
    #[test]
    fn only_a_real_refill_or_starvation_wakes_the_waiters() {
        let (frames, pools) = (frames(8), ZeroPools::new(1));
        let count = Arc::new(CountWake(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut fut = pools.take(cpu_id(0));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(pools.refill(cpu_id(0), &frames, 0, |_| {}), 0);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            0,
            "woken by an empty refill"
        );
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert!(pools.has_waiters(cpu_id(0)));
        pools.wake_starved(cpu_id(0));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "not woken as starved");
        assert!(!pools.has_waiters(cpu_id(0)));
        assert!(matches!(
            Pin::new(&mut fut).poll(&mut cx),
            Poll::Ready(None)
        ));
        assert_eq!(frames.total_free(), 8, "starvation took no frame");
    }
}
