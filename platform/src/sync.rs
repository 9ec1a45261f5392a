//! Kernel locks: spin locks that keep answering cross-CPU calls while they wait, know
//! their place in the lock order, and report a lock that cannot be had.
//!
//! Three rules make a spinning CPU safe on a machine where CPUs call each other
//! (docs/LOCKING.md has the whole list of locks):
//! - **A waiting CPU answers calls.** While it spins for a lock, a CPU runs whatever
//!   another CPU posted to it (`ipi::serve_calls`), interrupts on or
//!   off. So a lock holder that waits for this CPU's answer (a TLB shootdown under an
//!   address-space lock) gets it, and the two cannot deadlock.
//! - **Locks are taken in rank order.** Every lock has a rank; a CPU may take a lock
//!   only if every lock it already holds has a lower rank. Each CPU keeps the stack of
//!   ranks it holds; taking a lock out of order panics with both locks named, so a test
//!   that exercises the path finds the inversion the first time it runs, not the one
//!   time in a thousand it deadlocks. A call served from a waiting loop or an interrupt
//!   starts a fresh order (it runs on behalf of another CPU, between this CPU's steps).
//! - **A lock that cannot be had is a report.** A CPU that spins for twice the
//!   watchdog's limit (`watchdog=SECONDS`, 5 s by default) calls `watchdog::stuck`,
//!   which stops every CPU and prints where each one is: a deadlock becomes a report,
//!   not a silent hang, even when every CPU is spinning with interrupts on (so every
//!   timer tick still arrives and the tick check sees nothing wrong).
//!
//! Guards must not be held across `.await` (a task may resume on another CPU, whose
//! rank stack would not know the lock): kernel code takes these locks only in
//! synchronous stretches.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::panic::Location;
use core::sync::atomic::{AtomicPtr, AtomicU16, AtomicU32, AtomicUsize, Ordering};

use panda_arch::percpu::{self, MAX_CPUS};

/// Most locks one CPU holds at once that the order check tracks.
const DEPTH: usize = 16;

/// Per CPU: the ranks of the locks it holds, in the order taken.
struct Held {
    ranks: [AtomicU16; DEPTH],
    names: [AtomicUsize; DEPTH],
    depth: AtomicUsize,
    /// Entries below this index belong to the context a served call interrupted.
    base: AtomicUsize,
}

static HELD: [Held; MAX_CPUS] = [const {
    Held {
        ranks: [const { AtomicU16::new(0) }; DEPTH],
        names: [const { AtomicUsize::new(0) }; DEPTH],
        depth: AtomicUsize::new(0),
        base: AtomicUsize::new(0),
    }
}; MAX_CPUS];

/// The calling CPU's stack of held ranks (`names` keeps a pointer to each `Rank`).
fn held() -> Option<&'static Held> {
    HELD.get(percpu::current_index())
}

/// A lock's place in the order: locks with lower `level` are taken first.
#[derive(Debug)]
pub struct Rank {
    pub level: u16,
    pub name: &'static str,
}

impl Rank {
    pub const fn new(level: u16, name: &'static str) -> Self {
        Self { level, name }
    }
}

/// The held lock that taking `rank` now would violate the order against, if any.
pub fn order_violation(rank: &Rank) -> Option<&'static Rank> {
    let h = held()?;
    let base = h.base.load(Ordering::Relaxed);
    let depth = h.depth.load(Ordering::Relaxed).min(DEPTH);
    (base..depth)
        .find(|&i| h.ranks[i].load(Ordering::Relaxed) >= rank.level)
        .map(|i| {
            let other = h.names[i].load(Ordering::Relaxed) as *const Rank;
            // SAFETY: `names` holds only pointers to `'static` `Rank`s (stored by
            // `acquire` from a `&'static Rank`).
            unsafe { &*other }
        })
}

/// Checks that `rank` may be taken now and records it as held.
fn acquire(rank: &'static Rank) {
    let Some(h) = held() else { return };
    if let Some(other) = order_violation(rank) {
        panic!(
            "lock order: taking {:?} (rank {}) while holding {:?} (rank {})",
            rank.name, rank.level, other.name, other.level
        );
    }
    let at = h.depth.fetch_add(1, Ordering::Relaxed);
    if at < DEPTH {
        h.ranks[at].store(rank.level, Ordering::Relaxed);
        h.names[at].store(rank as *const Rank as usize, Ordering::Relaxed);
    }
}

/// Forgets the most recent hold of `rank` (guards may be dropped out of order).
fn release(rank: &'static Rank) {
    let Some(h) = held() else { return };
    let depth = h.depth.load(Ordering::Relaxed);
    let base = h.base.load(Ordering::Relaxed);
    let top = depth.min(DEPTH);
    if let Some(i) = (base..top)
        .rev()
        .find(|&i| h.names[i].load(Ordering::Relaxed) == rank as *const Rank as usize)
    {
        for j in i..top - 1 {
            h.ranks[j].store(h.ranks[j + 1].load(Ordering::Relaxed), Ordering::Relaxed);
            h.names[j].store(h.names[j + 1].load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
    h.depth.store(depth.saturating_sub(1), Ordering::Relaxed);
}

/// Runs `f` (a served cross-CPU call or an interrupt handler) with a fresh lock order:
/// the locks the interrupted context holds do not count, since `f` runs between its
/// steps and finishes before it continues.
pub fn nested<R>(f: impl FnOnce() -> R) -> R {
    let Some(h) = held() else { return f() };
    let saved = h.base.load(Ordering::Relaxed);
    h.base
        .store(h.depth.load(Ordering::Relaxed), Ordering::Relaxed);
    let r = f();
    h.base.store(saved, Ordering::Relaxed);
    r
}

/// How long a `Mutex` waiter spins before it claims the next turn (see `Mutex`).
const STARVING_AFTER_NS: u64 = 200_000;

/// A `Mutex`'s lock word and who holds it: the CPU and the line that took it (for the
/// watchdog's report of a CPU stuck waiting for the lock).
struct Owner {
    /// The lock word: the holder's CPU index + 1; 0 while free.
    cpu: AtomicU32,
    site: AtomicPtr<Location<'static>>,
    /// CPU index + 1 of a waiter that waited `STARVING_AFTER_NS` and has the next turn
    /// (no other CPU may take the lock while it is set); 0: none.
    favoured: AtomicU32,
}

impl Owner {
    const fn new() -> Self {
        Self {
            cpu: AtomicU32::new(0),
            site: AtomicPtr::new(core::ptr::null_mut()),
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
        self.site.store(
            site as *const Location<'static> as *mut Location<'static>,
            Ordering::Relaxed,
        );
    }
}

/// Per CPU: the lock it is spinning for now (its name, and its owner record if it is a
/// `Mutex`), for the watchdog's report. Null while not spinning.
struct Waiting {
    name: AtomicPtr<&'static str>,
    owner: AtomicPtr<Owner>,
}

static WAITING: [Waiting; MAX_CPUS] = [const {
    Waiting {
        name: AtomicPtr::new(core::ptr::null_mut()),
        owner: AtomicPtr::new(core::ptr::null_mut()),
    }
}; MAX_CPUS];

/// Writes which lock CPU `cpu` is spinning for, if any, and who holds it (a line of the
/// watchdog's report). Runs while that CPU is stopped inside its spin, so the lock is
/// still alive.
pub fn write_waiting(w: &mut dyn core::fmt::Write, cpu: usize) -> core::fmt::Result {
    let Some(slot) = WAITING.get(cpu) else {
        return Ok(());
    };
    let name = slot.name.load(Ordering::Acquire);
    if name.is_null() {
        return Ok(());
    }
    // SAFETY: `name` points at a `&'static str` in a `Rank` (stored by `spin_until`
    // from a `&'static Rank`).
    let name = unsafe { *name };
    write!(w, "  spinning for lock {name:?}")?;
    let owner = slot.owner.load(Ordering::Acquire);
    if !owner.is_null() {
        // SAFETY: the owner record lives in the lock this CPU is stopped spinning for,
        // which stays alive while a CPU waits for it.
        let owner = unsafe { &*owner };
        let holder = owner.cpu.load(Ordering::Relaxed);
        let site = owner.site.load(Ordering::Relaxed);
        match holder {
            0 => write!(w, ", free now")?,
            n => write!(w, ", held by cpu {}", n - 1)?,
        }
        if !site.is_null() {
            // SAFETY: `site` comes from `Location::caller()`, which is `'static`.
            let site = unsafe { &*site };
            write!(w, ", last taken at {}:{}", site.file(), site.line())?;
        }
        match owner.favoured.load(Ordering::Relaxed) {
            0 => {}
            n if n as usize == cpu + 1 => write!(w, " (this CPU has the next turn)")?,
            n => write!(w, " (cpu {} has the next turn)", n - 1)?,
        }
    }
    writeln!(w)
}

/// Spins until `attempt` succeeds, answering cross-CPU calls meanwhile; reports the
/// lock as stuck after twice the watchdog's limit (never, with the watchdog off).
fn spin_until<G>(
    rank: &'static Rank,
    owner: Option<&Owner>,
    mut attempt: impl FnMut() -> Option<G>,
) -> G {
    if let Some(g) = attempt() {
        return g;
    }
    let name = rank.name;
    let slot = WAITING.get(percpu::current_index());
    // A served call may spin for another lock meanwhile: restore what it replaces.
    let saved = slot.map(|s| {
        let before = (
            s.name.load(Ordering::Relaxed),
            s.owner.load(Ordering::Relaxed),
        );
        s.name.store(
            &rank.name as *const &'static str as *mut &'static str,
            Ordering::Release,
        );
        s.owner.store(
            owner.map_or(core::ptr::null_mut(), |o| o as *const Owner as *mut Owner),
            Ordering::Release,
        );
        before
    });
    let g = spin_until_inner(name, attempt);
    if let (Some(s), Some((n, o))) = (slot, saved) {
        s.name.store(n, Ordering::Release);
        s.owner.store(o, Ordering::Release);
    }
    g
}

fn spin_until_inner<G>(name: &'static str, mut attempt: impl FnMut() -> Option<G>) -> G {
    let start = panda_arch::time::now_ns();
    let mut spins = 0u32;
    loop {
        crate::ipi::serve_calls();
        core::hint::spin_loop();
        if let Some(g) = attempt() {
            return g;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) {
            let limit = crate::watchdog::limit_ns().saturating_mul(2);
            if limit != 0 && panda_arch::time::now_ns().saturating_sub(start) > limit {
                crate::watchdog::stuck(name);
            }
        }
    }
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
        spin_until(self.rank, Some(&self.owner), || {
            if self.owner.try_take(me) {
                return Some(());
            }
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
        let guard = spin_until(self.rank, None, || {
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
        let guard = spin_until(self.rank, None, || self.inner.try_write());
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
