//! User processes and threads as executor tasks.
//!
//! A thread is a future: `run_thread` loops on `user::run`, which enters ring 3 and
//! returns at the thread's next trap on the executor's own stack; the future then
//! handles the trap — a system call (which may await: sleep, wait, join), a page fault
//! (resolved in the process's address space, awaiting a zeroed frame if the pool is
//! empty, or the end of the process), an interrupt (the timer tick makes the thread
//! yield, so others on the CPU get their turn) — and goes round again. Between traps the
//! thread's whole state is its `UserContext`; a blocked thread owns no kernel stack.
//!
//! A process is an address space, its threads and an exit record. It ends when a thread
//! calls `OP_PROCESS_EXIT`, when the kernel kills it (a fault it cannot resolve), or
//! when its last thread exits. Its other threads stop at their next trap (every running
//! thread traps at least at each timer tick) or, if blocked, are woken by the kill
//! event. The waiter learns the status only once the last thread's future is gone and
//! the address space with it, so "waited" means "every frame is back".

use core::hash::{BuildHasherDefault, Hasher};

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::future::Future;
use core::pin::pin;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::task::{Poll, Waker};
use hashbrown::HashMap;

use futures_util::future::Either;

use log::{info, warn};
use panda_abi::syscall::{self, Error, SystemInfo};
use panda_arch::user::{self, Exit, UserContext};
use panda_mm::account::{Account, UNLIMITED};
use panda_mm::elf::{self, ElfError};
use panda_mm::region::Access;
use panda_mm::MmError;
use panda_platform::sync::Mutex;
use panda_platform::vm::UserRange;
use panda_sched::JoinHandle;

use crate::aspace::{AddressSpace, FaultError};
use crate::locks;

mod loader;
mod oom;
mod syscalls;
mod thread;

pub use loader::load;
pub use oom::{oom_kills, out_of_frames};
pub use thread::run_thread;

/// Gives the address spaces the process side of their memory limits and of running
/// out of frames (`oom`): called once at boot, before any process or test faults.
pub fn init() {
    crate::aspace::set_limit_policy(oom::limit_policy());
}

/// The status of a process the kernel ended.
pub const KILLED: u64 = syscall::EXIT_KILLED as u64;

static NEXT_PID: AtomicU64 = AtomicU64::new(1);
static NEXT_TID: AtomicU64 = AtomicU64::new(1);

/// Most threads one process may have that are running or ended but not yet joined.
pub const MAX_THREADS: usize = 1024;
/// Most children one process may have that are running or ended but not yet waited for.
pub const MAX_CHILDREN: usize = 1024;
/// Most processes one tree (a process the kernel started and all its descendants) may
/// hold, running or ended but not yet reaped (`panda_abi::syscall::MAX_TREE_PROCESSES`).
pub const MAX_TREE_PROCESSES: usize = syscall::MAX_TREE_PROCESSES;

/// The processes of one tree: counted from a spawn's start (before its first await, so
/// concurrent spawns cannot overshoot) until the process is reaped.
struct Tree {
    processes: AtomicUsize,
    /// A refusal was logged (once per tree: a fork bomb is refused thousands of times).
    refusal_logged: AtomicBool,
}

/// One process's place in its tree's count, given back when dropped: held by the
/// spawn until the process exists, then by its `Entry` in the pid table, so it goes
/// when the process is reaped (or, as an orphan, when it is gone).
struct TreeSlot(Arc<Tree>);

impl TreeSlot {
    /// The first process of a new tree.
    fn root() -> Self {
        TreeSlot(Arc::new(Tree {
            processes: AtomicUsize::new(1),
            refusal_logged: AtomicBool::new(false),
        }))
    }

    /// A place in `tree`, unless it holds `MAX_TREE_PROCESSES` already.
    fn reserve(tree: &Arc<Tree>) -> Option<Self> {
        tree.processes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_TREE_PROCESSES).then_some(n + 1)
            })
            .ok()?;
        Some(TreeSlot(tree.clone()))
    }
}

impl Drop for TreeSlot {
    fn drop(&mut self) {
        self.0.processes.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A place in a parent's list of children, taken before the spawn's first await (so
/// concurrent spawns from the parent's threads cannot overshoot `MAX_CHILDREN`, the
/// check and the insert being one step under the lock) and given back if the spawn
/// fails.
struct ChildSlot<'a> {
    parent: &'a Process,
    pid: u64,
    kept: bool,
}

impl<'a> ChildSlot<'a> {
    fn reserve(parent: &'a Process, pid: u64) -> Option<Self> {
        let mut children = parent.children.lock();
        if children.len() >= MAX_CHILDREN {
            return None;
        }
        children.push(pid);
        Some(ChildSlot {
            parent,
            pid,
            kept: false,
        })
    }
}

impl Drop for ChildSlot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let pid = self.pid;
            self.parent.children.lock().retain(|&c| c != pid);
        }
    }
}
/// Kernel bytes a thread is charged to its process's memory account for (its task,
/// future and saved registers: an estimate, docs/MEMORY.md).
pub const THREAD_BYTES: u64 = 2048;

/// A one-shot event many tasks can await.
///
/// Each waiting future owns its registration: `wait` returns an `EventWait` that
/// registers its waker under a key of its own on its first pending poll, swaps the
/// waker in place when polled with another, and removes it when dropped. A wait that
/// loses a race (a timed-out wait for a child, a sleep that ends before the kill event)
/// therefore leaves nothing behind: the list only ever holds wakers of futures that
/// still exist. (It used to be a `Vec` that only `fire` emptied: every abandoned wait
/// left its waker, and with it the waiting task's structure, until the event fired —
/// for a long-running child, until the end of the process.)
pub struct Event {
    fired: AtomicBool,
    waiters: Mutex<Waiters>,
}

/// An event's registered wakers by key. A B-tree frees its nodes as entries leave, and
/// an emptied map is replaced, so no capacity outlives the waits.
#[derive(Default)]
struct Waiters {
    next_key: u64,
    wakers: BTreeMap<u64, Waker>,
}

impl Default for Event {
    fn default() -> Self {
        Self {
            fired: AtomicBool::new(false),
            waiters: Mutex::new(&locks::EVENT, Waiters::default()),
        }
    }
}

impl Event {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        // Woken (and dropped) with the lock released: dropping a waker can free a task
        // whose future holds a wait on this very event, whose drop takes the lock.
        let waiters = core::mem::take(&mut self.waiters.lock().wakers);
        waiters.into_values().for_each(Waker::wake);
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Completes once the event has fired. Dropping the future before then removes
    /// its waker.
    pub fn wait(&self) -> EventWait<'_> {
        EventWait {
            event: self,
            key: None,
        }
    }

    /// Wakers registered now (the in-kernel tests check that abandoned waits leave
    /// none).
    pub fn waiters(&self) -> usize {
        self.waiters.lock().wakers.len()
    }
}

/// See `Event::wait`.
pub struct EventWait<'a> {
    event: &'a Event,
    /// The key of this future's registered waker, once it has one.
    key: Option<u64>,
}

impl Future for EventWait<'_> {
    type Output = ();

    fn poll(mut self: core::pin::Pin<&mut Self>, cx: &mut core::task::Context<'_>) -> Poll<()> {
        if self.event.is_fired() {
            return Poll::Ready(());
        }
        let mut replaced = None;
        {
            let mut waiters = self.event.waiters.lock();
            match self.key.and_then(|k| waiters.wakers.get_mut(&k)) {
                Some(w) => {
                    if !w.will_wake(cx.waker()) {
                        replaced = Some(core::mem::replace(w, cx.waker().clone()));
                    }
                }
                // First poll, or the entry went with a `fire` (then the check below
                // sees the event fired).
                None => {
                    let key = waiters.next_key;
                    waiters.next_key += 1;
                    waiters.wakers.insert(key, cx.waker().clone());
                    self.key = Some(key);
                }
            }
        }
        drop(replaced);
        // Fired between the check and the registration: do not sleep on it.
        if self.event.is_fired() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for EventWait<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let removed = {
            let mut waiters = self.event.waiters.lock();
            let removed = waiters.wakers.remove(&key);
            if waiters.wakers.is_empty() {
                // An emptied B-tree keeps its root node: give it back.
                waiters.wakers = BTreeMap::new();
            }
            removed
        };
        // Dropped with the lock released (see `fire`).
        drop(removed);
    }
}

/// What a waiter of a process sees: its status, once it is entirely gone.
struct ExitRecord {
    status: AtomicU64,
    gone: Event,
}

/// A process as its parent sees it, from its start until it is reaped.
struct Entry {
    record: Arc<ExitRecord>,
    /// To kill it (empty once it is gone).
    process: Weak<Process>,
    /// Its parent's pid (0: the kernel, for init).
    parent: u64,
    /// Its parent has ended, so nobody will wait: the entry goes as soon as the process
    /// is gone.
    orphan: bool,
    /// A thread of the parent is waiting for it (only one may).
    waited: bool,
    /// Its place in its tree's count, given back with the entry.
    _tree_slot: TreeSlot,
}

/// Hashes pids and tids, which are small sequential numbers: one multiplication by a
/// 64-bit odd constant (Fibonacci hashing) spreads them over the table's buckets, and
/// unlike the default hasher it can be built in a `static`.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A table keyed by pid or tid.
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

const fn id_map<V>() -> IdMap<V> {
    HashMap::with_hasher(BuildHasherDefault::new())
}

/// Removes `id`, and gives memory back once the table is empty or mostly so: a hash table
/// keeps its capacity when entries go, and the kernel's closing check wants the heap
/// back near its baseline after thousands of processes came and went.
fn remove_id<V>(map: &mut IdMap<V>, id: u64) -> Option<V> {
    let removed = map.remove(&id);
    if map.is_empty() || (map.capacity() > 64 && map.len() * 4 < map.capacity()) {
        map.shrink_to(map.len() * 2);
    }
    removed
}

/// Live and not yet reaped processes, by pid. A process is reaped when its parent's
/// wait returns its status, or, if its parent ended first, when it is gone.
static PROCESSES: Mutex<IdMap<Entry>> = Mutex::new(&locks::PROCESSES, id_map());

/// Publishes the exit record when dropped: the last field of `Process`, so it drops
/// after the address space (fields drop in declaration order). An orphan's entry goes
/// with it.
struct Reaper {
    pid: u64,
    record: Arc<ExitRecord>,
    /// The process's memory account: nothing may be left charged to it by now.
    account: Arc<Account>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let left = self.account.own();
        if left != 0 {
            crate::aspace::note_account_error();
            log::error!(target: "mm", "memory account of pid {}: {left} bytes still charged when it is gone", self.pid);
        }
        let removed = {
            let mut table = PROCESSES.lock();
            self.record.gone.fire();
            if table.get(&self.pid).is_some_and(|e| e.orphan) {
                remove_id(&mut table, self.pid)
            } else {
                None
            }
        };
        drop(removed);
    }
}

/// A process: an address space, threads and an exit record.
pub struct Process {
    pub pid: u64,
    pub name: String,
    pub space: Arc<AddressSpace>,
    ending: AtomicBool,
    kill: Event,
    live_threads: AtomicUsize,
    /// Threads not yet joined: tid -> their task's handle (`None` while one is joining).
    threads: Mutex<IdMap<Option<JoinHandle<u64>>>>,
    /// Children not yet reaped (and spawns under way), killed when this process ends.
    children: Mutex<Vec<u64>>,
    /// The tree it belongs to, whose count its children join.
    tree: Arc<Tree>,
    /// Threads charged to the memory account (`THREAD_BYTES` each), not yet ended.
    thread_charges: AtomicU64,
    reaper: Reaper,
    /// The process's scheduling group: its threads share each CPU as one (docs/
    /// SCHEDULING.md), and it accounts their CPU time. `None` only before the executor
    /// exists.
    pub(crate) sched: Option<Arc<panda_sched::Group>>,
}

impl Process {
    /// A process around `space`, registered so it can be waited for.
    pub fn new(space: Arc<AddressSpace>) -> Arc<Self> {
        let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
        Self::named(
            space,
            String::from("(kernel-built)"),
            0,
            pid,
            TreeSlot::root(),
        )
    }

    fn named(
        space: Arc<AddressSpace>,
        name: String,
        parent: u64,
        pid: u64,
        tree_slot: TreeSlot,
    ) -> Arc<Self> {
        let tree = tree_slot.0.clone();
        let record = Arc::new(ExitRecord {
            status: AtomicU64::new(0),
            gone: Event::default(),
        });
        space.account().set_id(pid);
        let account = space.account().clone();
        Arc::new_cyclic(|me| {
            let entry = Entry {
                record: record.clone(),
                process: me.clone(),
                parent,
                orphan: false,
                waited: false,
                _tree_slot: tree_slot,
            };
            PROCESSES.lock().insert(pid, entry);
            Self {
                pid,
                name,
                space,
                ending: AtomicBool::new(false),
                kill: Event::default(),
                live_threads: AtomicUsize::new(0),
                threads: Mutex::new(&locks::THREADS, id_map()),
                children: Mutex::new(&locks::CHILDREN, Vec::new()),
                tree,
                thread_charges: AtomicU64::new(0),
                reaper: Reaper {
                    pid,
                    record,
                    account,
                },
                sched: crate::executor::get().map(|e| e.new_group()),
            }
        })
    }

    /// Ends the process with `status` (the first call decides): every thread stops at
    /// its next trap or wake-up, and its children (and theirs) are killed: no process
    /// outlives its parent, so everything a program started ends when it does.
    pub fn end(&self, status: u64) {
        let mut doomed = self.mark_ending(status);
        // Iteratively, not recursively: a chain of thousands of processes must not
        // need thousands of kernel stack frames.
        while let Some(child) = doomed.pop() {
            doomed.extend(child.mark_ending(KILLED));
        }
    }

    /// The first call records `status`, fires the kill event and returns the children
    /// still alive (now orphans) for the caller to end; later calls return nothing.
    fn mark_ending(&self, status: u64) -> Vec<Arc<Process>> {
        if self.ending.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        self.reaper.record.status.store(status, Ordering::SeqCst);
        self.kill.fire();
        let children = core::mem::take(&mut *self.children.lock());
        let mut alive = Vec::new();
        let mut gone = Vec::new();
        {
            let mut table = PROCESSES.lock();
            for pid in children {
                let Some(entry) = table.get_mut(&pid) else {
                    continue;
                };
                if entry.record.gone.is_fired() {
                    gone.extend(remove_id(&mut table, pid));
                } else {
                    entry.orphan = true;
                    alive.extend(entry.process.upgrade());
                }
            }
        }
        drop(gone);
        alive
    }

    pub fn is_ending(&self) -> bool {
        self.ending.load(Ordering::SeqCst)
    }

    /// Charges a thread about to start to the memory account (`OutOfMemory` past the
    /// limit). Given back when a thread ends (`thread_ended`) or by the caller if the
    /// thread does not start.
    fn charge_thread(&self) -> Result<(), Error> {
        self.space
            .account()
            .try_charge(THREAD_BYTES)
            .map_err(|_| Error::OutOfMemory)?;
        self.thread_charges.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Gives a thread's charge back (if threads are charged: the in-kernel tests run
    /// threads they did not charge).
    fn uncharge_thread(&self) {
        let charged = self
            .thread_charges
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if charged.is_ok() && self.space.account().uncharge(THREAD_BYTES).is_err() {
            crate::aspace::note_account_error();
        }
    }

    /// The process's memory account.
    pub fn account(&self) -> &Arc<Account> {
        self.space.account()
    }

    fn thread_ended(&self, code: u64) {
        self.uncharge_thread();
        if self.live_threads.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.end(code);
        }
    }

    /// `fut`, unless the process ends first (then `None`).
    async fn unless_killed<F: Future>(&self, fut: F) -> Option<F::Output> {
        first(fut, self.kill.wait()).await
    }
}

/// A parent's claim on waiting for a child: released if the wait is abandoned (timed
/// out, or the waiter's process ends), so another thread may wait later.
struct WaitClaim {
    pid: u64,
    done: bool,
}

impl Drop for WaitClaim {
    fn drop(&mut self) {
        if !self.done {
            if let Some(entry) = PROCESSES.lock().get_mut(&self.pid) {
                entry.waited = false;
            }
        }
    }
}

/// Waits for child `pid` of `parent` (0: the kernel) to be gone (all threads ended,
/// every frame back) and returns its status; the child is then reaped, so a second wait
/// finds nothing. With `timeout_ns`, gives up after that long (0: only looks).
///
/// Errors: `NotFound` if `pid` is not an unreaped child of `parent` (another process's
/// children are not visible); `NotPermitted` if another thread is already waiting for
/// it; `TimedOut`.
pub async fn wait_child(parent: u64, pid: u64, timeout_ns: Option<u64>) -> Result<u64, Error> {
    let record = {
        let mut table = PROCESSES.lock();
        let entry = table
            .get_mut(&pid)
            .filter(|e| e.parent == parent && !e.orphan)
            .ok_or(Error::NotFound)?;
        if entry.waited {
            return Err(Error::NotPermitted);
        }
        entry.waited = true;
        entry.record.clone()
    };
    let mut claim = WaitClaim { pid, done: false };
    match timeout_ns {
        None => record.gone.wait().await,
        Some(ns) => {
            let exec = crate::executor::get().ok_or(Error::NotPermitted)?;
            if first(record.gone.wait(), exec.sleep(ns)).await.is_none() && !record.gone.is_fired()
            {
                return Err(Error::TimedOut);
            }
        }
    }
    claim.done = true;
    let reaped = remove_id(&mut PROCESSES.lock(), pid);
    drop(reaped);
    Ok(record.status.load(Ordering::SeqCst))
}

/// `a`'s output if it completes first (or both at once: `a` is polled first), `None`
/// if `b` does.
async fn first<A: Future, B: Future>(a: A, b: B) -> Option<A::Output> {
    match futures_util::future::select(pin!(a), pin!(b)).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

/// Why a program could not be started.
#[derive(Clone, Copy, Debug)]
pub enum SpawnError {
    NotFound,
    BadElf(ElfError),
    OutOfMemory,
    /// The parent's tree holds `MAX_TREE_PROCESSES` processes.
    LimitReached,
    /// A memory limit above the parent's.
    LimitAboveParent,
}

impl SpawnError {
    fn to_error(self) -> Error {
        match self {
            SpawnError::NotFound => Error::NotFound,
            SpawnError::BadElf(_) => Error::InvalidArgument,
            SpawnError::OutOfMemory => Error::OutOfMemory,
            SpawnError::LimitReached => Error::LimitReached,
            SpawnError::LimitAboveParent => Error::InvalidArgument,
        }
    }
}

/// A checked argument block (`panda_abi::args`): NUL-terminated UTF-8 strings, at most
/// `MAX_ARGS_BYTES` long, holding `count` arguments.
pub struct Args<'a> {
    block: &'a [u8],
    count: usize,
}

impl<'a> Args<'a> {
    /// No arguments beyond the path.
    pub const NONE: Args<'static> = Args {
        block: &[],
        count: 0,
    };

    /// `block` if it is a valid argument block (`InvalidArgument` otherwise).
    pub fn new(block: &'a [u8]) -> Result<Self, Error> {
        let count = panda_abi::args::check_block(block)?;
        Ok(Args { block, count })
    }
}

/// A zeroed kernel buffer of `len` bytes, or `None` if the heap cannot have it (a
/// user-sized allocation must not end the kernel).
pub(crate) fn try_zeroed(len: usize) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, 0);
    Some(v)
}

/// Writes the argument image (argv pointers and strings, `panda_abi::args`) at the top
/// of `space`'s stack region; returns `(argc, argv)`, argv being the initial `rsp`.
async fn place_args(
    space: &AddressSpace,
    path: &str,
    args: &Args<'_>,
) -> Result<(u64, u64), SpawnError> {
    let len = panda_abi::args::image_len(path.len(), args.block.len(), args.count);
    let mut image = try_zeroed(len).ok_or(SpawnError::OutOfMemory)?;
    let top = panda_abi::INITIAL_STACK_POINTER as u64;
    let (argc, argv) =
        panda_abi::args::write_image(top, path.as_bytes(), args.block, args.count, &mut image);
    // The stack region is demand-zero: this faults its top pages in, in the new space.
    // (The image lies below the initial stack pointer, in the user half.)
    let to = UserRange::new(argv, image.len() as u64).ok_or(SpawnError::OutOfMemory)?;
    space
        .write_user(to, &image)
        .await
        .map_err(|_| SpawnError::OutOfMemory)?;
    Ok((argc, argv))
}

/// Spawns a thread of `process` from `ctx` as a task (on `cpu`, pinned, if given).
/// Returns its thread id, or `OutOfMemory` when the process has `MAX_THREADS` threads
/// not yet joined or memory is down to the kernel's reserve.
fn start_thread(
    exec: &'static panda_sched::Executor<crate::executor::Machine>,
    process: &Arc<Process>,
    ctx: UserContext,
    cpu: Option<panda_mm::CpuId>,
) -> Result<u64, Error> {
    if !crate::memory::above_reserve() {
        return Err(Error::OutOfMemory);
    }
    // The slot is taken before the task exists, so concurrent spawns cannot overshoot
    // the limit; the handle fills it once the task is spawned.
    let tid = {
        let mut threads = process.threads.lock();
        if threads.len() >= MAX_THREADS {
            return Err(Error::OutOfMemory);
        }
        let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
        threads.insert(tid, None);
        tid
    };
    let future = thread::run_thread_with_id(process.clone(), ctx, tid);
    let handle = match (&process.sched, cpu) {
        (Some(group), cpu) => exec.spawn_in(group, cpu, cpu.is_some(), future),
        (None, Some(cpu)) => exec.spawn_pinned(cpu, future),
        (None, None) => exec.spawn(future),
    };
    if let Some(slot) = process.threads.lock().get_mut(&tid) {
        *slot = Some(handle);
    }
    Ok(tid)
}

/// Starts the initrd program `path` as a new process, a child of `parent` (`None`:
/// the kernel's). Its first thread starts with `rdi` = `arg`, `rsi` = argc, `rdx` =
/// argv and `rsp` = argv: the argument image (the path, then `args`) sits at the top
/// of its stack region. Returns the process.
///
/// Its memory account is a child of the parent's with `limit` bytes (`None`: the
/// parent's limit; above it: `LimitAboveParent`), or for init a root with `limit`
/// (`None`: unlimited, bounded by the machine). Everything the load, the argument
/// image and the first thread take is charged to it: a limit too small for them is
/// `OutOfMemory`.
pub async fn spawn(
    path: &str,
    arg: u64,
    args: &Args<'_>,
    parent: Option<&Process>,
    limit: Option<u64>,
) -> Result<Arc<Process>, SpawnError> {
    let file = crate::initrd::find(path).ok_or(SpawnError::NotFound)?;
    let account = match parent {
        Some(p) => Account::child(p.account(), limit).map_err(|_| SpawnError::LimitAboveParent)?,
        None => Account::root(limit.unwrap_or(UNLIMITED)),
    };
    if !crate::memory::above_reserve() {
        return Err(SpawnError::OutOfMemory);
    }
    // Both limits are taken before the first await (loading and placing the arguments
    // may wait): a check there and an insert after it let concurrent spawns from the
    // parent's threads overshoot.
    let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
    let tree_slot = match parent {
        None => TreeSlot::root(),
        Some(p) => TreeSlot::reserve(&p.tree).ok_or_else(|| {
            if !p.tree.refusal_logged.swap(true, Ordering::Relaxed) {
                warn!(target: "user", "pid {} ({}) cannot start {path:?}: its process tree holds {MAX_TREE_PROCESSES} processes (LimitReached; logged once per tree)", p.pid, p.name);
            }
            SpawnError::LimitReached
        })?,
    };
    let mut child_slot = match parent {
        None => None,
        Some(p) => Some(ChildSlot::reserve(p, pid).ok_or(SpawnError::OutOfMemory)?),
    };
    let (space, entry) = load(file, account).inspect_err(|e| {
        if let SpawnError::BadElf(why) = e {
            warn!(target: "user", "cannot start {path:?}: {}", why.describe());
        }
    })?;
    let (argc, argv) = place_args(&space, path, args).await?;
    let process = Process::named(
        space,
        String::from(path),
        parent.map_or(0, |p| p.pid),
        pid,
        tree_slot,
    );
    let ctx = UserContext {
        rip: entry,
        rsp: argv,
        rdi: arg,
        rsi: argc,
        rdx: argv,
        ..Default::default()
    };
    let exec = crate::executor::get().ok_or(SpawnError::OutOfMemory)?;
    // `start_thread` refuses only for lack of memory (or a full thread table, which a
    // new process cannot have).
    let started = process.charge_thread().and_then(|()| {
        start_thread(exec, &process, ctx, None).inspect_err(|_| process.uncharge_thread())
    });
    if started.is_err() {
        // Nobody will wait for a process that never ran: reap it with its last handle.
        if let Some(entry) = PROCESSES.lock().get_mut(&process.pid) {
            entry.orphan = true;
        }
        return Err(SpawnError::OutOfMemory);
    }
    if let Some(slot) = child_slot.as_mut() {
        slot.kept = true;
    }
    if let Some(parent) = parent {
        // The parent began ending meanwhile and may have missed this child (it takes
        // its list of children once): end it as the parent's end would have (doing it
        // twice is harmless).
        if parent.is_ending() {
            if let Some(entry) = PROCESSES.lock().get_mut(&process.pid) {
                entry.orphan = true;
            }
            process.end(KILLED);
        }
    }
    Ok(process)
}

/// Runs `path` as the first process and waits for it; logs and returns its status.
pub async fn run_init(path: &str, arg: u64, args: &Args<'_>) -> Option<u64> {
    let process = match spawn(path, arg, args, None, None).await {
        Ok(p) => p,
        Err(SpawnError::NotFound) => {
            let mut names = String::new();
            crate::initrd::for_each_file(|name, _| {
                if !names.is_empty() {
                    names.push_str(", ");
                }
                names.push_str(name);
            });
            log::error!(target: "user", "cannot start init {path:?}: no such file in the initrd (it holds: {names})");
            return None;
        }
        Err(e) => {
            log::error!(target: "user", "cannot start init {path:?}: {e:?}");
            return None;
        }
    };
    let pid = process.pid;
    drop(process);
    info!(target: "user", "started {path:?} as pid {pid}");
    let status = wait_child(0, pid, None).await.ok()?;
    if status == KILLED {
        warn!(target: "user", "init {path:?} (pid {pid}) was killed");
    } else {
        info!(target: "user", "init {path:?} (pid {pid}) exited with status {status}");
    }
    Some(status)
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
