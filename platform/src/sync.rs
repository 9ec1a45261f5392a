//! Kernel locks: spin locks that keep answering cross-CPU calls while they wait, know
//! their place in the lock order, and report a lock that cannot be had.
//!
//! Three rules make a spinning CPU safe on a machine where CPUs call each other
//! (docs/LOCKING.md has the whole list of locks):
//! - **A waiting CPU answers calls.** A CPU waits for a lock in the crate's one waiting
//!   loop, `ipi::spin_until`, which runs whatever another CPU posted to it
//!   (`ipi::serve_calls`), interrupts on or off. So a lock holder that waits for this
//!   CPU's answer (a TLB shootdown under an address-space lock) gets it, and the two
//!   cannot deadlock.
//! - **Locks are taken in rank order.** Every lock has a rank; a CPU may take a lock
//!   only if every lock it already holds has a lower rank. Each CPU keeps the stack of
//!   ranks it holds (`order`, re-exported here: `Rank`, `order_violation`, `nested`);
//!   taking a lock out of order panics with both locks named, so a test that exercises
//!   the path finds the inversion the first time it runs, not the one time in a
//!   thousand it deadlocks. A call served from a waiting loop or an interrupt starts a
//!   fresh order (it runs on behalf of another CPU, between this CPU's steps).
//! - **A lock that cannot be had is a report.** The waiting loop calls the watchdog's
//!   `stuck_after` once it has spun for twice the watchdog's limit (`watchdog=SECONDS`,
//!   5 s by default), which stops every CPU and prints where each one is, the lock each
//!   waiter spins for included (`order::write_waiting`, from a copy of the lock's state
//!   the waiter refreshes on every attempt): a deadlock becomes a report, not a silent
//!   hang, even when every CPU is spinning with interrupts on (so every timer tick still
//!   arrives and the tick check sees nothing wrong).
//!
//! Guards must not be held across `.await` (a task may resume on another CPU, whose
//! rank stack would not know the lock): kernel code takes these locks only in
//! synchronous stretches.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::panic::Location;
use core::sync::atomic::{AtomicU32, Ordering};

use crossbeam_utils::atomic::AtomicCell;
use panda_arch::percpu;

use crate::order::{self, acquire, release};
pub use crate::order::{nested, order_violation, Rank};

/// How long a `Mutex` waiter spins before it claims the next turn (see `Mutex`).
const STARVING_AFTER_NS: u64 = 200_000;

/// A `Mutex`'s lock word and who holds it: the CPU and the line that took it (for the
/// watchdog's report of a CPU stuck waiting for the lock).
struct Owner {
    /// The lock word: the holder's CPU index + 1; 0 while free.
    cpu: AtomicU32,
    site: AtomicCell<Option<&'static Location<'static>>>,
    /// CPU index + 1 of a waiter that waited `STARVING_AFTER_NS` and has the next turn
    /// (no other CPU may take the lock while it is set); 0: none.
    favoured: AtomicU32,
}

impl Owner {
    const fn new() -> Self {
        Self {
            cpu: AtomicU32::new(0),
            site: AtomicCell::new(None),
            favoured: AtomicU32::new(0),
        }
    }

    /// Takes the lock word for CPU `me` (index + 1) if it is free and no other waiter
    /// has the next turn.
    fn try_take(&self, me: u32) -> bool {
        let favoured = self.favoured.load(Ordering::Relaxed);
        if favoured != 0 && favoured != me {
            return false;
        }
        if self.cpu.load(Ordering::Relaxed) != 0
            || self
                .cpu
                .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        if favoured == me {
            self.favoured.store(0, Ordering::Relaxed);
        }
        true
    }

    fn set(&self, site: &'static Location<'static>) {
        self.site.store(Some(site));
    }

    /// Copies the lock's state into the calling CPU's wait record (for the watchdog's
    /// report of a CPU stuck waiting for it).
    fn note(&self) {
        order::note_lock_state(
            self.cpu.load(Ordering::Relaxed),
            self.site.load(),
            self.favoured.load(Ordering::Relaxed),
        );
    }
}

/// Spins until `attempt` succeeds, recorded as waiting for the lock of rank `rank`,
/// in the crate's one waiting loop (`ipi::spin_until`: it answers cross-CPU calls
/// meanwhile and reports the lock as stuck after twice the watchdog's limit).
fn spin_until<G>(rank: &'static Rank, mut attempt: impl FnMut() -> Option<G>) -> G {
    // The uncontended path touches no wait record.
    if let Some(g) = attempt() {
        return g;
    }
    order::waiting_for(rank, || crate::ipi::spin_until(rank.name, attempt))
}

/// A ranked spin lock (see the module doc). Any waiter may take it when it is free, but
/// a waiter that has spun for `STARVING_AFTER_NS` claims the next turn, and while it
/// holds that claim no other CPU takes the lock: no CPU waits long while others take
/// the lock again and again. (A plain test-and-set lock starved a CPU for over 10 s
/// under the system-call fuzzer: a thread doing `brk` back to back on one CPU took an
/// address space's layout lock again every time before the other CPU's attempt.)
///
/// It is not a ticket lock because virtual CPUs are descheduled by their host: a
/// ticket lock hands the lock to the next waiter in line even when that waiter is not
/// running, and every waiter behind it spins until the host runs it again. At -smp 8
/// on a 2-core host, the page-table lock of one process was free most of the time yet
/// its waiters spun for about 85% of all CPU time (about 20 ms per wait, 40 ms of
/// holding per second), and the system-call fuzzer made about 30 times fewer calls
/// than at -smp 2. Linux uses a test-and-set lock in guests without paravirtual
/// spin locks for the same reason (`virt_spin_lock`).
pub struct Mutex<T> {
    rank: &'static Rank,
    /// The lock word, the holder and the waiter with the next turn.
    owner: Owner,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and a guard exists only while its
// holder owns the lock word (its compare-exchange from 0 succeeded and the guard's drop
// has not yet stored 0), so at most one CPU has it at a time.
unsafe impl<T: Send> Sync for Mutex<T> {}

impl<T> Mutex<T> {
    pub const fn new(rank: &'static Rank, value: T) -> Self {
        Self {
            rank,
            owner: Owner::new(),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the lock, answering cross-CPU calls while it waits. Panics on a lock-order
    /// inversion.
    #[track_caller]
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let site = Location::caller();
        acquire(self.rank);
        let me = percpu::current_index() as u32 + 1;
        // The uncontended path reads no clock (`now_ns` is a 128-bit division).
        if !self.owner.try_take(me) {
            self.wait_for_turn(me);
        }
        self.owner.set(site);
        MutexGuard { lock: self }
    }

    /// Spins until CPU `me` (index + 1) takes the lock, claiming the next turn after
    /// `STARVING_AFTER_NS`.
    #[cold]
    fn wait_for_turn(&self, me: u32) {
        let start = panda_arch::time::now_ns();
        spin_until(self.rank, || {
            if self.owner.try_take(me) {
                return Some(());
            }
            self.owner.note();
            if panda_arch::time::now_ns().saturating_sub(start) >= STARVING_AFTER_NS {
                // Claim the next turn (if no other waiter has it already).
                let _ = self.owner.favoured.compare_exchange(
                    0,
                    me,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            None
        });
    }

    /// Whether some CPU holds the lock now (a snapshot).
    pub fn is_locked(&self) -> bool {
        self.owner.cpu.load(Ordering::Relaxed) != 0
    }

    /// The CPU that has claimed the next turn, if any (a waiter that has spun for
    /// `STARVING_AFTER_NS`).
    pub fn next_turn(&self) -> Option<usize> {
        match self.owner.favoured.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n as usize - 1),
        }
    }

    /// Takes the lock if it is free and no waiter has claimed the next turn.
    #[track_caller]
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        let site = Location::caller();
        acquire(self.rank);
        if self.owner.try_take(percpu::current_index() as u32 + 1) {
            self.owner.set(site);
            Some(MutexGuard { lock: self })
        } else {
            release(self.rank);
            None
        }
    }
}

/// Holds a `Mutex`; releases it (and its place in the order) when dropped.
pub struct MutexGuard<'a, T> {
    lock: &'a Mutex<T>,
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the lock word holds this guard's CPU: no other guard exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`, and `&mut self` makes this the only borrow of it.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        let was = self.lock.owner.cpu.swap(0, Ordering::Release);
        // A guard exists only while the lock word holds its CPU. A free lock word here
        // (a guard of a lock that was freed and reused, or a double release) means two
        // CPUs may both be inside: stop here instead.
        if was == 0 {
            panic!(
                "lock {:?} released more often than taken",
                self.lock.rank.name
            );
        }
        release(self.lock.rank);
    }
}

/// A ranked reader-writer spin lock: readers share, a writer is alone (see the module
/// doc for waiting and ranks). Writers go first: while one waits, new readers wait
/// too, so a stream of short readers (page faults) cannot starve a layout change.
pub struct RwLock<T> {
    rank: &'static Rank,
    inner: spin::RwLock<T>,
    writers_waiting: AtomicU32,
}

impl<T> RwLock<T> {
    pub const fn new(rank: &'static Rank, value: T) -> Self {
        Self {
            rank,
            inner: spin::RwLock::new(value),
            writers_waiting: AtomicU32::new(0),
        }
    }

    pub fn read(&self) -> ReadGuard<'_, T> {
        acquire(self.rank);
        let guard = spin_until(self.rank, || {
            if self.writers_waiting.load(Ordering::Acquire) != 0 {
                return None;
            }
            self.inner.try_read()
        });
        ReadGuard {
            rank: self.rank,
            guard,
        }
    }

    pub fn write(&self) -> WriteGuard<'_, T> {
        acquire(self.rank);
        self.writers_waiting.fetch_add(1, Ordering::AcqRel);
        let guard = spin_until(self.rank, || self.inner.try_write());
        self.writers_waiting.fetch_sub(1, Ordering::AcqRel);
        WriteGuard {
            rank: self.rank,
            guard,
        }
    }
}

pub struct ReadGuard<'a, T> {
    rank: &'static Rank,
    guard: spin::RwLockReadGuard<'a, T>,
}

impl<T> Deref for ReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> Drop for ReadGuard<'_, T> {
    fn drop(&mut self) {
        release(self.rank);
    }
}

pub struct WriteGuard<'a, T> {
    rank: &'static Rank,
    guard: spin::RwLockWriteGuard<'a, T>,
}

impl<T> Deref for WriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for WriteGuard<'_, T> {
    fn drop(&mut self) {
        release(self.rank);
    }
}
