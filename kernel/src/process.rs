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
use panda_arch::sync::Mutex;
use panda_arch::user::{self, Exit, FaultAccess, UserContext};
use panda_mm::elf::{self, ElfError};
use panda_mm::region::Access;
use panda_mm::MmError;
use panda_sched::JoinHandle;

use crate::aspace::{AddressSpace, FaultError};
use crate::locks;

/// The status of a process the kernel ended.
pub const KILLED: u64 = syscall::EXIT_KILLED as u64;

static NEXT_PID: AtomicU64 = AtomicU64::new(1);
static NEXT_TID: AtomicU64 = AtomicU64::new(1);

/// Most threads one process may have that are running or ended but not yet joined.
pub const MAX_THREADS: usize = 1024;
/// Most children one process may have that are running or ended but not yet waited for.
pub const MAX_CHILDREN: usize = 1024;

/// A one-shot event many tasks can await.
pub struct Event {
    fired: AtomicBool,
    waiters: Mutex<Vec<Waker>>,
}

impl Default for Event {
    fn default() -> Self {
        Self {
            fired: AtomicBool::new(false),
            waiters: Mutex::new(&locks::EVENT, Vec::new()),
        }
    }
}

impl Event {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        let waiters = core::mem::take(&mut *self.waiters.lock());
        waiters.into_iter().for_each(Waker::wake);
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Completes once the event has fired.
    pub async fn wait(&self) {
        core::future::poll_fn(|cx| {
            if self.is_fired() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.lock();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            drop(waiters);
            // Fired between the check and the registration: do not sleep on it.
            if self.is_fired() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
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

/// Removes `id`, and gives memory back once the table is mostly empty: a hash table
/// keeps its capacity when entries go, and the kernel's closing check wants the heap
/// back near its baseline after thousands of processes came and went.
fn remove_id<V>(map: &mut IdMap<V>, id: u64) -> Option<V> {
    let removed = map.remove(&id);
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
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
}

impl Drop for Reaper {
    fn drop(&mut self) {
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
    /// Children not yet reaped, killed when this process ends.
    children: Mutex<Vec<u64>>,
    reaper: Reaper,
}

impl Process {
    /// A process around `space`, registered so it can be waited for.
    pub fn new(space: Arc<AddressSpace>) -> Arc<Self> {
        Self::named(space, String::from("(kernel-built)"), 0)
    }

    fn named(space: Arc<AddressSpace>, name: String, parent: u64) -> Arc<Self> {
        let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
        let record = Arc::new(ExitRecord {
            status: AtomicU64::new(0),
            gone: Event::default(),
        });
        Arc::new_cyclic(|me| {
            let entry = Entry {
                record: record.clone(),
                process: me.clone(),
                parent,
                orphan: false,
                waited: false,
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
                reaper: Reaper { pid, record },
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

    fn thread_ended(&self, code: u64) {
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
}

impl SpawnError {
    fn to_error(self) -> Error {
        match self {
            SpawnError::NotFound => Error::NotFound,
            SpawnError::BadElf(_) => Error::InvalidArgument,
            SpawnError::OutOfMemory => Error::OutOfMemory,
        }
    }
}

/// Loads `file` into a new address space: each segment's file bytes are copied into
/// zeroed frames mapped with the segment's rights; the rest (BSS) is demand-zero.
pub fn load(file: &[u8]) -> Result<(Arc<AddressSpace>, u64), SpawnError> {
    let plan = elf::plan(file).map_err(SpawnError::BadElf)?;
    let space = AddressSpace::new().map_err(|_| SpawnError::OutOfMemory)?;
    for seg in &plan.segments {
        let (start, end) = seg.pages();
        space
            .add_segment(start, end, seg.rights)
            .map_err(|_| SpawnError::BadElf(ElfError::BadSegment("segment refused")))?;
        let (file_start, file_end) = (seg.vaddr, seg.vaddr + seg.file_size);
        let mut page = start;
        while page < file_end {
            let mut frame = crate::memory::alloc_user_frame()
                .ok_or(SpawnError::OutOfMemory)?
                .into_zeroed()
                .into_frame();
            // The part of [file_start, file_end) on this page.
            let from = file_start.max(page);
            let to = file_end.min(page + 4096);
            if from < to {
                let at = (seg.file_offset + (from - seg.vaddr)) as usize;
                let bytes = &file[at..at + (to - from) as usize];
                frame.write((from - page) as usize, bytes);
            }
            if let Err(e) = space.map_frame(page, frame, seg.rights) {
                return Err(match e {
                    MmError::OutOfMemory => SpawnError::OutOfMemory,
                    _ => SpawnError::BadElf(ElfError::BadSegment("segment refused")),
                });
            }
            page += 4096;
        }
    }
    Ok((space, plan.entry))
}

/// Starts the initrd program `path` as a new process, a child of `parent` (`None`:
/// the kernel's), whose first thread gets `arg` in `rdi` and the top of the stack
/// region in `rsp`. Returns the process.
pub fn spawn(path: &str, arg: u64, parent: Option<&Process>) -> Result<Arc<Process>, SpawnError> {
    let file = crate::initrd::find(path).ok_or(SpawnError::NotFound)?;
    if !crate::memory::above_reserve() {
        return Err(SpawnError::OutOfMemory);
    }
    if parent.is_some_and(|p| p.children.lock().len() >= MAX_CHILDREN) {
        return Err(SpawnError::OutOfMemory);
    }
    let (space, entry) = load(file).inspect_err(|e| {
        if let SpawnError::BadElf(why) = e {
            warn!(target: "user", "cannot start {path:?}: {}", why.describe());
        }
    })?;
    let process = Process::named(space, String::from(path), parent.map_or(0, |p| p.pid));
    let ctx = UserContext {
        rip: entry,
        rsp: panda_abi::INITIAL_STACK_POINTER as u64,
        rdi: arg,
        ..Default::default()
    };
    let exec = crate::executor::get().ok_or(SpawnError::OutOfMemory)?;
    // `start_thread` refuses only for lack of memory (or a full thread table, which a
    // new process cannot have).
    if start_thread(exec, &process, ctx, None).is_err() {
        // Nobody will wait for a process that never ran: reap it with its last handle.
        if let Some(entry) = PROCESSES.lock().get_mut(&process.pid) {
            entry.orphan = true;
        }
        return Err(SpawnError::OutOfMemory);
    }
    if let Some(parent) = parent {
        parent.children.lock().push(process.pid);
        // The parent began ending meanwhile and may have missed this child: end it
        // as the parent's end would have (doing it twice is harmless).
        if parent.is_ending() {
            if let Some(entry) = PROCESSES.lock().get_mut(&process.pid) {
                entry.orphan = true;
            }
            process.end(KILLED);
        }
    }
    Ok(process)
}

/// Spawns a thread of `process` from `ctx` as a task (on `cpu`, pinned, if given).
/// Returns its thread id, or `OutOfMemory` when the process has `MAX_THREADS` threads
/// not yet joined or memory is down to the kernel's reserve.
fn start_thread(
    exec: &'static panda_sched::Executor<crate::executor::Machine>,
    process: &Arc<Process>,
    ctx: UserContext,
    cpu: Option<usize>,
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
    let future = run_thread_with_id(process.clone(), ctx, tid);
    let handle = match cpu {
        Some(cpu) => exec.spawn_pinned(cpu, future),
        None => exec.spawn(future),
    };
    if let Some(slot) = process.threads.lock().get_mut(&tid) {
        *slot = Some(handle);
    }
    Ok(tid)
}

/// A thread of `process` starting from `ctx`, as a future that completes with the
/// thread's status (its exit code, the process's status if the process ended first).
pub fn run_thread(process: Arc<Process>, ctx: UserContext) -> impl Future<Output = u64> {
    let tid = NEXT_TID.fetch_add(1, Ordering::Relaxed);
    run_thread_with_id(process, ctx, tid)
}

fn run_thread_with_id(
    process: Arc<Process>,
    ctx: UserContext,
    tid: u64,
) -> impl Future<Output = u64> {
    // Counted now, not at the first poll: a sibling that exits meanwhile must not
    // see the process as threadless.
    process.live_threads.fetch_add(1, Ordering::SeqCst);
    thread_loop(process, ctx, tid)
}

/// What a system call asks of the thread loop.
enum After {
    Resume,
    ExitThread(u64),
    ExitProcess(u64),
}

/// Which timer tick of which CPU a thread's time slice started at.
fn tick_now() -> (usize, u64) {
    let cpu = panda_arch::percpu::current_index();
    let ticks = panda_arch::percpu::current().map_or(0, |c| c.ticks.load(Ordering::Relaxed));
    (cpu, ticks)
}

async fn thread_loop(process: Arc<Process>, mut ctx: UserContext, tid: u64) -> u64 {
    // A user thread's time slice ends at the next timer tick: then, before it returns
    // to user mode, it lets the other tasks of its CPU run. A thread whose system calls
    // and faults all complete at once never returns to the executor by itself, and a
    // tick rarely lands in its few user-mode instructions (a loop of cheap system calls
    // spends almost all its time in the kernel), so without this it kept its CPU's other
    // tasks (threads, the zeroing task) waiting for as long as it liked — seen in a soak
    // as a CPU whose executor did not come round for 10 s.
    let mut slice = tick_now();
    let status = loop {
        if process.is_ending() {
            break process.reaper.record.status.load(Ordering::SeqCst);
        }
        if tick_now() != slice {
            yield_once().await;
            slice = tick_now();
            continue;
        }
        // The task may have moved CPUs, or another space may have run here meanwhile.
        if !process.space.is_current() {
            process.space.activate();
        }
        match user::run(&mut ctx) {
            Exit::Syscall => match system_call(&process, tid, &mut ctx).await {
                After::Resume => {}
                After::ExitThread(code) => break code,
                After::ExitProcess(code) => {
                    process.end(code);
                    break code;
                }
            },
            Exit::PageFault { addr, access } => {
                let access = match access {
                    FaultAccess::Read => Access::Read,
                    FaultAccess::Write => Access::Write,
                    FaultAccess::Execute => Access::Execute,
                };
                let resolved = process
                    .unless_killed(process.space.handle_fault_async(addr, access))
                    .await;
                match resolved {
                    Some(Ok(())) | None => {}
                    Some(Err(e)) => {
                        warn!(
                            target: "user",
                            "pid {} ({}) thread {tid} killed: page fault at {:#x} ({access:?}, rip {:#x}): {}",
                            process.pid,
                            process.name,
                            addr,
                            ctx.rip,
                            describe(e)
                        );
                        process.end(KILLED);
                        break KILLED;
                    }
                }
            }
            // An interrupt ended the run (the timer tick, an IPI): let others run.
            Exit::Interrupt { .. } => {
                yield_once().await;
                slice = tick_now();
            }
            Exit::Exception { vector, error_code } => {
                let (mnemonic, name) = panda_arch::trap::exception_name(vector as u64);
                warn!(
                    target: "user",
                    "pid {} ({}) thread {tid} killed: {mnemonic} ({name}) at rip {:#x}, error code {:#x}",
                    process.pid,
                    process.name,
                    ctx.rip,
                    error_code
                );
                process.end(KILLED);
                break KILLED;
            }
        }
    };
    process.space.deactivate();
    process.thread_ended(status);
    status
}

fn describe(e: FaultError) -> &'static str {
    use panda_mm::region::FaultDecision::*;
    match e {
        FaultError::OutOfMemory => "out of memory",
        FaultError::Denied(ProtectionViolation) => "protection violation",
        FaultError::Denied(StackOverflow) => "stack overflow (past 16 MiB)",
        FaultError::Denied(OutsideRegions) => "outside every region",
        FaultError::Denied(DemandZero(_)) => "unexpected",
    }
}

/// Yields once to the executor.
async fn yield_once() {
    if let Some(exec) = crate::executor::get() {
        exec.yield_now().await;
    }
}

fn user_error(e: FaultError) -> Error {
    match e {
        FaultError::OutOfMemory => Error::OutOfMemory,
        FaultError::Denied(_) => Error::BadAddress,
    }
}

async fn system_call(process: &Arc<Process>, tid: u64, ctx: &mut UserContext) -> After {
    let (op, a0, a1, a2, a3) = (ctx.rax as usize, ctx.rdi, ctx.rsi, ctx.rdx, ctx.r10);
    let exec = crate::executor::get();
    let result: Result<usize, Error> = match op {
        syscall::OP_PROCESS_EXIT => return After::ExitProcess(syscall::exit_status(a0) as u64),
        syscall::OP_THREAD_EXIT => return After::ExitThread(syscall::exit_status(a0) as u64),
        syscall::OP_PROCESS_YIELD => {
            yield_once().await;
            Ok(0)
        }
        syscall::OP_PROCESS_GET_PID => Ok(process.pid as usize),
        syscall::OP_PROCESS_BRK => brk(process, a0),
        syscall::OP_PROCESS_SLEEP => match exec {
            Some(exec) => {
                process.unless_killed(exec.sleep(a0)).await;
                Ok(0)
            }
            None => Err(Error::NotPermitted),
        },
        syscall::OP_PROCESS_WAIT => wait_for_child(process, a0, None).await,
        syscall::OP_PROCESS_WAIT_TIMEOUT => wait_for_child(process, a0, Some(a1)).await,
        syscall::OP_PROCESS_KILL => kill_child(process, a0),
        syscall::OP_ENVIRONMENT_SPAWN => spawn_from_user(process, a0, a1, a2).await,
        syscall::OP_ENVIRONMENT_LOG => log_user(process, a0, a1).await,
        syscall::OP_ENVIRONMENT_TIME => Ok(panda_arch::time::now_ns() as usize),
        syscall::OP_ENVIRONMENT_INFO => info_to_user(process, a0, a1).await,
        syscall::OP_CPU_COUNT => Ok(panda_arch::percpu::online_count()),
        syscall::OP_THREAD_CURRENT_CPU => Ok(panda_arch::percpu::current_index()),
        syscall::OP_THREAD_SPAWN => match exec {
            Some(exec) => {
                let user_end = panda_abi::USER_SPACE_END as u64;
                // The stack top may be 0: a thread that never touches its stack
                // needs none. Kernel-half and non-canonical values are refused.
                if !(panda_abi::ELF_LOAD_BASE as u64..user_end).contains(&a0) || a1 > user_end {
                    Err(Error::InvalidArgument)
                } else {
                    let child = UserContext {
                        rip: a0,
                        rsp: a1,
                        rdi: a2,
                        ..Default::default()
                    };
                    start_thread(exec, process, child, None).map(|tid| tid as usize)
                }
            }
            None => Err(Error::NotPermitted),
        },
        syscall::OP_THREAD_GET_ID => Ok(tid as usize),
        syscall::OP_THREAD_SET_FS_BASE => {
            if user::valid_fs_base(a0) {
                ctx.fs_base = a0;
                Ok(0)
            } else {
                Err(Error::InvalidArgument)
            }
        }
        syscall::OP_THREAD_JOIN => join(process, tid, a0).await,
        syscall::OP_THREAD_SET_AFFINITY => match exec {
            Some(exec) if (a0 as usize) < panda_arch::percpu::online_count() => {
                exec.move_to(a0 as usize, true).await;
                Ok(0)
            }
            _ => Err(Error::InvalidArgument),
        },
        // A buffer's bookkeeping is kernel memory: refused below the reserve.
        syscall::OP_BUFFER_ALLOC if !crate::memory::above_reserve() => Err(Error::OutOfMemory),
        syscall::OP_BUFFER_ALLOC => {
            process
                .space
                .alloc_buffer(a0)
                .map(|a| a as usize)
                .map_err(|e| match e {
                    MmError::OutOfMemory => Error::OutOfMemory,
                    _ => Error::InvalidArgument,
                })
        }
        syscall::OP_BUFFER_FREE => process
            .space
            .free_buffer(a0)
            .map(|()| 0)
            .map_err(|_| Error::NotFound),
        syscall::OP_BUFFER_LOG => buffer_log(process, a0, a1).await,
        syscall::OP_FILE_READ_BUFFER => read_file(process, a0, a1, a2, a3).await,
        _ => Err(Error::UnknownOperation),
    };
    ctx.rax = syscall::encode(result) as u64;
    After::Resume
}

fn brk(process: &Process, new_end: u64) -> Result<usize, Error> {
    if new_end == 0 {
        return Ok(process.space.brk() as usize);
    }
    process
        .space
        .set_brk(new_end)
        .map(|b| b as usize)
        .map_err(|_| Error::InvalidArgument)
}

/// Copies `len` bytes of user memory at `ptr` into `out` (faulting pages in).
async fn read_user(process: &Process, ptr: u64, out: &mut [u8]) -> Result<(), Error> {
    process.space.read_user(ptr, out).await.map_err(user_error)
}

/// Writes `bytes` to user memory at `ptr`, faulting pages in as a user write would.
/// The whole destination is checked (and faulted in) before any byte is written, so a
/// destination that runs into memory the caller may not write gets `BadAddress` and is
/// left untouched. (If another thread of the process frees part of it between the two
/// passes, the write stops there with `BadAddress`.)
async fn write_user(process: &Process, ptr: u64, bytes: &[u8]) -> Result<(), Error> {
    process
        .space
        .write_user(ptr, bytes)
        .await
        .map_err(user_error)
}

async fn user_path(process: &Process, ptr: u64, len: u64) -> Result<String, Error> {
    if len == 0 || len > crate::initrd::MAX_PATH as u64 {
        return Err(Error::InvalidArgument);
    }
    let mut buf = [0u8; crate::initrd::MAX_PATH];
    read_user(process, ptr, &mut buf[..len as usize]).await?;
    core::str::from_utf8(&buf[..len as usize])
        .map(String::from)
        .map_err(|_| Error::InvalidArgument)
}

async fn spawn_from_user(process: &Process, ptr: u64, len: u64, arg: u64) -> Result<usize, Error> {
    let path = user_path(process, ptr, len).await?;
    spawn(&path, arg, Some(process))
        .map(|p| p.pid as usize)
        .map_err(SpawnError::to_error)
}

async fn wait_for_child(
    process: &Process,
    pid: u64,
    timeout_ns: Option<u64>,
) -> Result<usize, Error> {
    if pid == process.pid {
        return Err(Error::NotPermitted);
    }
    match process
        .unless_killed(wait_child(process.pid, pid, timeout_ns))
        .await
    {
        Some(Ok(status)) => {
            // Reaped: no longer a child to kill or count against the limit.
            process.children.lock().retain(|&c| c != pid);
            Ok(status as usize)
        }
        Some(Err(e)) => Err(e),
        None => Ok(0), // the caller is ending; the result is never seen
    }
}

/// Ends child `pid` of `process` as killed. `NotFound` if it is not an unreaped
/// child; killing a child that already ended (not yet waited for) does nothing.
fn kill_child(process: &Process, pid: u64) -> Result<usize, Error> {
    let child = {
        let table = PROCESSES.lock();
        let entry = table
            .get(&pid)
            .filter(|e| e.parent == process.pid && !e.orphan)
            .ok_or(Error::NotFound)?;
        entry.process.upgrade()
    };
    if let Some(child) = child {
        info!(target: "user", "pid {} ({}) killed by its parent, pid {}", child.pid, child.name, process.pid);
        child.end(KILLED);
    }
    Ok(0)
}

async fn join(process: &Process, me: u64, tid: u64) -> Result<usize, Error> {
    if tid == me {
        return Err(Error::NotPermitted);
    }
    let handle = match process.threads.lock().get_mut(&tid) {
        None => return Err(Error::NotFound),
        // Someone else is joining it.
        Some(slot) => slot.take().ok_or(Error::NotFound)?,
    };
    match process.unless_killed(handle).await {
        Some(status) => {
            remove_id(&mut process.threads.lock(), tid);
            Ok(status as usize)
        }
        None => Ok(0), // the caller is ending; the result is never seen
    }
}

/// Longest text one log call (or buffer log call) writes.
pub const MAX_LOG: u64 = 1 << 20;

async fn log_user(process: &Process, ptr: u64, len: u64) -> Result<usize, Error> {
    print_user(process, ptr, len).await
}

/// Writes user text to the console as it is (user output is the console's, not the
/// kernel log's): invalid UTF-8 shows as U+FFFD. A line the user leaves open stays
/// open; kernel lines start on a fresh line regardless (`with_console_line`).
fn console_bytes(w: &mut dyn core::fmt::Write, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        let _ = w.write_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            let _ = w.write_str("\u{fffd}");
        }
    }
}

/// Serialises user output: one write call is one piece on the console.
static USER_OUTPUT: Mutex<()> = Mutex::new(&locks::USER_OUTPUT, ());

/// Writes `[addr, addr + len)` of user memory to the console as one piece: concurrent
/// user writers never split it. The range is first faulted in as a user read would;
/// then, holding the user-output lock, it is copied out and printed a piece at a time,
/// each piece under the console lock (interrupts off for one piece only) and the
/// page-table lock. User memory is copied, never borrowed: another thread may write it
/// meanwhile, which only changes the output. If another thread unmapped a page
/// meanwhile, the output stops there and the call reports `BadAddress`.
async fn print_user(process: &Process, addr: u64, len: u64) -> Result<usize, Error> {
    if len > MAX_LOG {
        return Err(Error::InvalidArgument);
    }
    process
        .space
        .fault_in(addr, len, false)
        .await
        .map_err(user_error)?;
    let _one_writer = USER_OUTPUT.lock();
    let mut piece = [0u8; PRINT_PIECE + 3];
    // Bytes of a character cut at the end of the last piece, moved to the front.
    let mut carried = 0;
    let end = addr + len;
    let mut at = addr;
    while at < end {
        let n = ((end - at) as usize).min(PRINT_PIECE);
        if !process
            .space
            .read_mapped(at, &mut piece[carried..carried + n])
        {
            return Err(Error::BadAddress);
        }
        at += n as u64;
        let filled = carried + n;
        let keep = if at < end {
            cut_character(&piece[..filled])
        } else {
            0
        };
        panda_arch::serial::with_console(|w| console_bytes(w, &piece[..filled - keep]));
        piece.copy_within(filled - keep..filled, 0);
        carried = keep;
    }
    Ok(len as usize)
}

/// Bytes of user output copied and printed at a time.
const PRINT_PIECE: usize = 512;

/// How many bytes at the end of `bytes` are the start of a UTF-8 character that
/// continues after them (0 to 3), so a piece boundary never splits one.
fn cut_character(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xc0 == 0x80 {
            continue; // a continuation byte: look further back for the lead byte
        }
        let needed = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Writes part of a buffer to the console (like `OP_ENVIRONMENT_LOG`, but the range must
/// lie inside one live buffer).
async fn buffer_log(process: &Process, addr: u64, len: u64) -> Result<usize, Error> {
    // The same precedence as OP_ENVIRONMENT_LOG: the length first, then the address.
    if len > MAX_LOG {
        return Err(Error::InvalidArgument);
    }
    if !process.space.in_buffer(addr, len) {
        return Err(Error::BadAddress);
    }
    print_user(process, addr, len).await
}

async fn read_file(
    process: &Process,
    path_ptr: u64,
    path_len: u64,
    buffer: u64,
    len: u64,
) -> Result<usize, Error> {
    let path = user_path(process, path_ptr, path_len).await?;
    let file = crate::initrd::find(&path).ok_or(Error::NotFound)?;
    let n = (len as usize).min(file.len());
    write_user(process, buffer, &file[..n]).await?;
    Ok(n)
}

/// The machine and memory counters.
pub fn system_info() -> SystemInfo {
    use crate::aspace::{self as a, Stat};
    SystemInfo {
        cpus: panda_arch::percpu::online_count() as u64,
        memory_total: panda_arch::frame::total_frames() * 4096,
        memory_free: crate::memory::frames_not_in_use() * 4096,
        faults: a::stat(Stat::Faults),
        zero_pool_hits: a::stat(Stat::PoolHits),
        zero_pool_waits: a::stat(Stat::PoolWaits),
        zeroed_inline: a::stat(Stat::ZeroedInline),
        shootdowns: a::stat(Stat::Shootdowns),
        shootdown_ipis: a::stat(Stat::ShootdownIpis),
        tsc_hz: panda_arch::time::tsc_hz(),
        fault_handler_cycles: a::stat(Stat::ProfHandler),
        fault_classify_cycles: a::stat(Stat::ProfClassify),
        fault_zero_cycles: a::stat(Stat::ProfZero),
        fault_map_cycles: a::stat(Stat::ProfMap),
        profiled_faults: a::stat(Stat::ProfFaults),
        kernel_heap_bytes: crate::heap::live_bytes(),
    }
}

async fn info_to_user(process: &Process, ptr: u64, len: u64) -> Result<usize, Error> {
    let mut bytes = [0u8; SystemInfo::WORDS * 8];
    for (i, w) in system_info().to_words().iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let n = (len as usize).min(bytes.len());
    write_user(process, ptr, &bytes[..n]).await?;
    Ok(n)
}

/// Runs `path` as the first process and waits for it; logs and returns its status.
pub async fn run_init(path: &str, arg: u64) -> Option<u64> {
    let process = match spawn(path, arg, None) {
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
