//! Lock-order state, per CPU: the ranks of the locks a CPU holds (checked on every
//! take), where a served call starts a fresh order (`nested`), and which lock a CPU is
//! spinning for now (for the watchdog's report).
//!
//! This is the bottom of the lock machinery: it imports nothing of this crate. `sync`
//! (the locks) records takes and releases here; `ipi` runs every served call inside
//! `nested`; the watchdog's report prints `write_waiting`'s line through the reporter
//! `ipi::init` registers.
//!
//! Everything here is plain data in atomics: ranks and call sites are `'static`
//! references kept in lock-free `AtomicCell`s, and what a CPU waits for is a copy of
//! the lock's state (holder, site, next turn) refreshed by the waiter on every attempt,
//! never a pointer into the lock. So any CPU may read any CPU's record at any time.

use core::panic::Location;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crossbeam_utils::atomic::AtomicCell;
use panda_arch::percpu::{self, MAX_CPUS};

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

// The records below are read from NMI and report paths and written from any context:
// they must never fall back to `AtomicCell`'s internal lock. A pointer-sized
// `Option<&'static T>` (null is `None`) is one `AtomicUsize` inside.
const _: () = assert!(AtomicCell::<Option<&'static Rank>>::is_lock_free());
const _: () = assert!(AtomicCell::<Option<&'static Location<'static>>>::is_lock_free());

/// Most locks one CPU holds at once that the order check tracks.
const DEPTH: usize = 16;

/// Per CPU: the locks it holds, in the order taken.
struct Held {
    ranks: [AtomicCell<Option<&'static Rank>>; DEPTH],
    depth: AtomicUsize,
    /// Entries below this index belong to the context a served call interrupted.
    base: AtomicUsize,
}

static HELD: [Held; MAX_CPUS] = [const {
    Held {
        ranks: [const { AtomicCell::new(None) }; DEPTH],
        depth: AtomicUsize::new(0),
        base: AtomicUsize::new(0),
    }
}; MAX_CPUS];

/// The calling CPU's stack of held ranks.
fn held() -> Option<&'static Held> {
    HELD.get(percpu::current_index())
}

/// The held lock that taking `rank` now would violate the order against, if any.
pub fn order_violation(rank: &Rank) -> Option<&'static Rank> {
    let h = held()?;
    let base = h.base.load(Ordering::Relaxed);
    let depth = h.depth.load(Ordering::Relaxed).min(DEPTH);
    (base..depth)
        .filter_map(|i| h.ranks[i].load())
        .find(|held| held.level >= rank.level)
}

/// Checks that `rank` may be taken now (panics naming both locks otherwise) and
/// records it as held.
pub(crate) fn acquire(rank: &'static Rank) {
    let Some(h) = held() else { return };
    if let Some(other) = order_violation(rank) {
        panic!(
            "lock order: taking {:?} (rank {}) while holding {:?} (rank {})",
            rank.name, rank.level, other.name, other.level
        );
    }
    let at = h.depth.fetch_add(1, Ordering::Relaxed);
    if at < DEPTH {
        h.ranks[at].store(Some(rank));
    }
}

/// Forgets the most recent hold of `rank` (guards may be dropped out of order).
pub(crate) fn release(rank: &'static Rank) {
    let Some(h) = held() else { return };
    let depth = h.depth.load(Ordering::Relaxed);
    let base = h.base.load(Ordering::Relaxed);
    let top = depth.min(DEPTH);
    if let Some(i) = (base..top)
        .rev()
        .find(|&i| h.ranks[i].load().is_some_and(|r| core::ptr::eq(r, rank)))
    {
        for j in i..top - 1 {
            h.ranks[j].store(h.ranks[j + 1].load());
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

/// `Waiting::holder` when the lock does not say who holds it (a reader-writer lock).
const HOLDER_UNKNOWN: u32 = u32::MAX;

/// Per CPU: the lock it is spinning for now, as plain data copied from the lock (for
/// the watchdog's report). `rank` is `None` while not spinning.
struct Waiting {
    rank: AtomicCell<Option<&'static Rank>>,
    /// The holder's CPU index + 1; 0: free at the last attempt; `HOLDER_UNKNOWN`.
    holder: AtomicU32,
    /// Where the holder took it, if the lock records that.
    site: AtomicCell<Option<&'static Location<'static>>>,
    /// CPU index + 1 of the waiter with the next turn; 0: none.
    next_turn: AtomicU32,
}

static WAITING: [Waiting; MAX_CPUS] = [const {
    Waiting {
        rank: AtomicCell::new(None),
        holder: AtomicU32::new(0),
        site: AtomicCell::new(None),
        next_turn: AtomicU32::new(0),
    }
}; MAX_CPUS];

/// A copy of one CPU's `Waiting` record, to put back when a nested wait ends.
type WaitCopy = (
    Option<&'static Rank>,
    u32,
    Option<&'static Location<'static>>,
    u32,
);

/// Runs `f` (a spin for the lock of rank `rank`) with the calling CPU recorded as
/// waiting for that lock; the holder is unknown until `note_lock_state`. A call served
/// from inside `f` may wait for another lock meanwhile: the record it replaces is put
/// back when it ends.
pub(crate) fn waiting_for<G>(rank: &'static Rank, f: impl FnOnce() -> G) -> G {
    let Some(w) = WAITING.get(percpu::current_index()) else {
        return f();
    };
    let saved: WaitCopy = (
        w.rank.load(),
        w.holder.load(Ordering::Relaxed),
        w.site.load(),
        w.next_turn.load(Ordering::Relaxed),
    );
    w.holder.store(HOLDER_UNKNOWN, Ordering::Relaxed);
    w.site.store(None);
    w.next_turn.store(0, Ordering::Relaxed);
    w.rank.store(Some(rank));
    let g = f();
    let (rank, holder, site, next_turn) = saved;
    w.rank.store(rank);
    w.holder.store(holder, Ordering::Relaxed);
    w.site.store(site);
    w.next_turn.store(next_turn, Ordering::Relaxed);
    g
}

/// Records, for the calling CPU's current wait, what the lock said at its last attempt:
/// the holder's CPU index + 1 (0: free), where it was taken, and the CPU index + 1 of
/// the waiter with the next turn (0: none).
pub(crate) fn note_lock_state(
    holder: u32,
    site: Option<&'static Location<'static>>,
    next_turn: u32,
) {
    if let Some(w) = WAITING.get(percpu::current_index()) {
        w.holder.store(holder, Ordering::Relaxed);
        w.site.store(site);
        w.next_turn.store(next_turn, Ordering::Relaxed);
    }
}

/// Writes which lock CPU `cpu` is spinning for, if any, and who held it at that CPU's
/// last attempt (a line of the watchdog's report). It reads only copied values and
/// `'static` references, so it is sound for any `cpu` at any time; the line is exact
/// when `cpu` is stopped (as in a report) and may be one attempt old otherwise.
pub fn write_waiting(w: &mut dyn core::fmt::Write, cpu: usize) -> core::fmt::Result {
    let Some(slot) = WAITING.get(cpu) else {
        return Ok(());
    };
    let Some(rank) = slot.rank.load() else {
        return Ok(());
    };
    write!(w, "  spinning for lock {:?}", rank.name)?;
    match slot.holder.load(Ordering::Relaxed) {
        HOLDER_UNKNOWN => return writeln!(w),
        0 => write!(w, ", free now")?,
        n => write!(w, ", held by cpu {}", n - 1)?,
    }
    if let Some(site) = slot.site.load() {
        write!(w, ", last taken at {}:{}", site.file(), site.line())?;
    }
    match slot.next_turn.load(Ordering::Relaxed) {
        0 => {}
        n if n as usize == cpu + 1 => write!(w, " (this CPU has the next turn)")?,
        n => write!(w, " (cpu {} has the next turn)", n - 1)?,
    }
    writeln!(w)
}
