//! System-call fuzzer: "no user program can panic, hang or leak the kernel".
//!
//! Run as init: `scripts/run.sh -smp N --cmdline "init=fuzz init.arg=ARG"`, or many
//! boots in a row with `scripts/soak.sh` (see docs/TESTING.md).
//!
//! `ARG` (decimal, as the kernel parses `init.arg`) = `modes << 48 | seconds << 32 | seed`:
//! - bits 0..31: the seed (0: take one from the TSC); every worker's PRNG derives from
//!   it, and it is printed first (`fuzz: seed 0x...`) so a failure can be rerun;
//! - bits 32..47: how long to fuzz, in seconds (0: 20 s);
//! - bits 48..55: which kinds of children to start (0: all). Bit `mode - 1` enables
//!   mode 1 fault, 2 exit-mid-call, 3 sleepers, 4 thread-flood, 5 memory, 6 random,
//!   7 race; `0x80` alone starts none (to narrow a failure down);
//! - bit 56: big thread floods (up to 100000 threads per thread-flood child instead of
//!   2000: enough to exhaust the kernel's heap);
//! - bit 57: nested fuzzers: a quarter of the children are launchers, which start a
//!   full fuzzer of their own (1 s, a random seed, every child kind but nested ones) and
//!   exit after a random delay (0 ms to 2 s), so the kernel ends the nested fuzzer as an
//!   orphan anywhere from its first instruction to its end.
//!
//! E.g. seed 0x1234 for 60 s: `init.arg=$(( (60 << 32) | 0x1234 ))` = 257698042420; the
//! same with sleeper children only: `$(( (0x04 << 48) | (60 << 32) | 0x1234 ))`.
//! Bit 63 set means a child role (the fuzzer spawns itself as misbehaving children):
//! bits 56..62 the mode, bits 32..55 a parameter (milliseconds or a count), bits 0..31
//! the child's seed.
//!
//! The parent runs one worker thread pinned per CPU; each issues random system calls
//! (every operation of `OPERATIONS` and neighbouring unknown numbers) with edge-value
//! arguments, and checks what the ABI promises (error codes, preserved registers, a few
//! results). The main thread keeps a few misbehaving children alive (faults, exit in
//! the middle of other threads' calls, sleepers ended by process exit, thread floods,
//! memory exhaustion, random calls with user-mode touches racing frees) and checks
//! their exit statuses. A watchdog thread prints progress every 5 s and names a worker
//! or child wait that stopped moving. At the end it joins everything, waits for every
//! child and exits 0 only if nothing was violated; the kernel then checks that every
//! frame came back.
//!
//! The parent never touches the heap or a buffer in user mode and uses no allocator
//! (output goes through a stack buffer; stacks and scratch memory are in .bss), so any
//! `brk` or buffer free another worker issues cannot pull memory from under it. Calls
//! that write user memory never get a destination inside its own image or stack, except
//! the calling worker's scratch area.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};

use panda_rt::abi::syscall::{self as abi, Error, EXIT_KILLED, OPERATIONS};
use panda_rt::abi::{
    BUFFER_BASE, BUFFER_MAX_SIZE, ELF_LOAD_BASE, HEAP_BASE, HEAP_LIMIT, INITIAL_STACK_POINTER,
    KERNEL_SPACE_START, PAGE_SIZE, STACK_BASE, USER_REGIONS, USER_SPACE_END,
};
use panda_rt::{entry, sys, Console};

entry!(main);

/// One line, written with one log call (no allocation).
macro_rules! say {
    ($($t:tt)*) => {{
        let mut c = Console::new();
        let _ = c.write_fmt(format_args!($($t)*));
        let _ = c.write_str("\n");
        c.flush();
    }};
}

const PAGE: u64 = PAGE_SIZE as u64;
const STACK_TOP: u64 = INITIAL_STACK_POINTER as u64;
const MAX_LOG: u64 = 1 << 20;
const INFO_BYTES: u64 = (abi::SystemInfo::WORDS * 8) as u64;
const MEMORY_BYTES: u64 = (abi::MemoryInfo::WORDS * 8) as u64;

// ---------------------------------------------------------------------------------
// Static memory: thread stacks and per-worker scratch, in .bss (demand-zero, and out of
// reach of brk and buffer frees).

const SLOTS: usize = 72;
const MAX_WORKERS: usize = 64;
const WATCHDOG_SLOT: usize = SLOTS - 1;
const SLOT_STACK: usize = 64 * 1024;
const SCRATCH: usize = 16 * 1024;

#[repr(C, align(4096))]
struct Area<const N: usize>(UnsafeCell<[u8; N]>);
// SAFETY: the areas are only ever accessed through raw pointers (thread stacks, kernel
// writes into scratch, volatile pre-touches); Rust never forms references to them.
unsafe impl<const N: usize> Sync for Area<N> {}

static STACKS: Area<{ SLOT_STACK * SLOTS }> = Area(UnsafeCell::new([0; SLOT_STACK * SLOTS]));
static SCRATCHES: Area<{ SCRATCH * MAX_WORKERS }> =
    Area(UnsafeCell::new([0; SCRATCH * MAX_WORKERS]));
/// Children touch pages of this in user mode (the parent never does).
static DOTS: &[u8; 8] = b"........";

fn stack_top(slot: usize) -> u64 {
    STACKS.0.get() as u64 + ((slot + 1) * SLOT_STACK) as u64
}

fn scratch(w: usize) -> u64 {
    SCRATCHES.0.get() as u64 + (w * SCRATCH) as u64
}

/// Writes every page of `[start, start + len)` once, so later use never faults (the
/// parent must not need a frame while a child exhausts memory).
fn pretouch(start: u64, len: u64) {
    let mut a = start;
    while a < start + len {
        // SAFETY: callers pass ranges of this program's own .bss or stack, writable,
        // while no other thread runs; the byte is written back unchanged (the stack
        // range includes live frames).
        unsafe {
            core::ptr::write_volatile(a as *mut u8, core::ptr::read_volatile(a as *const u8))
        };
        a += PAGE;
    }
}

// ---------------------------------------------------------------------------------
// Randomness.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        r.next();
        r
    }
    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------
// The raw call: every argument register set, and the ABI's promise that only rax, rcx
// and r11 change is checked on every call.

struct Outcome {
    result: isize,
    regs_kept: bool,
    /// The first register that changed: its name, what was passed, what came back.
    changed: Option<(&'static str, u64, u64)>,
}

fn raw(op: u64, a: [u64; 6], keep: [u64; 2]) -> Outcome {
    let rax: u64;
    let (o0, o1, o2, o3, o4, o5, k0, k1): (u64, u64, u64, u64, u64, u64, u64, u64);
    let (sp0, sp1): (u64, u64);
    // SAFETY: the fuzzer only passes destinations that are invalid, or its own scratch,
    // or memory it never reads as Rust objects (heap, buffers, bottom of the stack
    // region), and never ends itself (callers filter the exits); the kernel preserves
    // every register but rax, rcx and r11, and the outputs check exactly that.
    unsafe {
        core::arch::asm!(
            "mov {sp0}, rsp",
            "syscall",
            "mov {sp1}, rsp",
            sp0 = out(reg) sp0,
            sp1 = lateout(reg) sp1,
            inlateout("rax") op => rax,
            inlateout("rdi") a[0] => o0,
            inlateout("rsi") a[1] => o1,
            inlateout("rdx") a[2] => o2,
            inlateout("r10") a[3] => o3,
            inlateout("r8") a[4] => o4,
            inlateout("r9") a[5] => o5,
            inlateout("r12") keep[0] => k0,
            inlateout("r13") keep[1] => k1,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    const NAMES: [&str; 9] = ["rdi", "rsi", "rdx", "r10", "r8", "r9", "r12", "r13", "rsp"];
    let sent = [a[0], a[1], a[2], a[3], a[4], a[5], keep[0], keep[1], sp0];
    let back = [o0, o1, o2, o3, o4, o5, k0, k1, sp1];
    let changed = (0..9)
        .find(|&i| sent[i] != back[i])
        .map(|i| (NAMES[i], sent[i], back[i]));
    Outcome {
        result: rax as isize,
        regs_kept: changed.is_none(),
        changed,
    }
}

// ---------------------------------------------------------------------------------
// Thread entries: asm stubs that need no stack (so any stack value works) and a
// trampoline for Rust threads on the .bss stacks.

core::arch::global_asm!(
    r#"
    .text
    .global fuzz_stub_exit
    fuzz_stub_exit:
    mov eax, {thread_exit}
    syscall
    ud2

    .global fuzz_stub_yield
    fuzz_stub_yield:
    mov r12, rdi
    mov eax, {yield_}
    syscall
    mov eax, {time}
    syscall
    mov rdi, r12
    mov eax, {thread_exit}
    syscall
    ud2

    .global fuzz_stub_nap
    fuzz_stub_nap:
    mov r12, rdi
    mov edi, 200000
    mov eax, {sleep}
    syscall
    mov rdi, r12
    mov eax, {thread_exit}
    syscall
    ud2

    .global fuzz_stub_sleep_forever
    fuzz_stub_sleep_forever:
    mov rdi, -1
    mov eax, {sleep}
    syscall
    jmp fuzz_stub_sleep_forever

    .global fuzz_stub_spin
    fuzz_stub_spin:
    pause
    jmp fuzz_stub_spin

    .global fuzz_stub_pin_spin
    fuzz_stub_pin_spin:
    mov eax, {affinity}
    syscall
    2:
    pause
    jmp 2b

    .global fuzz_rust_entry
    fuzz_rust_entry:
    xor ebp, ebp
    and rsp, -16
    call {start}
    ud2
    "#,
    thread_exit = const abi::OP_THREAD_EXIT,
    yield_ = const abi::OP_PROCESS_YIELD,
    time = const abi::OP_ENVIRONMENT_TIME,
    sleep = const abi::OP_PROCESS_SLEEP,
    affinity = const abi::OP_THREAD_SET_AFFINITY,
    start = sym rust_thread_start,
);

extern "C" {
    fn fuzz_stub_exit();
    fn fuzz_stub_yield();
    fn fuzz_stub_nap();
    fn fuzz_stub_sleep_forever();
    fn fuzz_stub_spin();
    fn fuzz_stub_pin_spin();
    fn fuzz_rust_entry();
}

fn stub(f: unsafe extern "C" fn()) -> u64 {
    f as *const () as u64
}

/// Stubs that end by themselves with their argument as exit code.
fn ending_stubs() -> [u64; 3] {
    [
        stub(fuzz_stub_exit),
        stub(fuzz_stub_yield),
        stub(fuzz_stub_nap),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Job {
    Worker = 1,
    Watchdog,
    ChildWorker,
    Exiter,
    Blocker,
    Joiner,
    Toucher,
    Mutator,
    FaultInThread,
    Flooder,
}

impl Job {
    fn from(v: u64) -> Option<Job> {
        use Job::*;
        [
            Worker,
            Watchdog,
            ChildWorker,
            Exiter,
            Blocker,
            Joiner,
            Toucher,
            Mutator,
            FaultInThread,
            Flooder,
        ]
        .into_iter()
        .find(|j| *j as u64 == v)
    }
}

static SLOT_JOB: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static SLOT_ARG: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
/// Set by the first thread that runs a slot's job: a process runs each slot once, and a
/// slot's stack and statistics belong to one thread.
static SLOT_TAKEN: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
/// Set when `main` first runs.
static MAIN_RAN: AtomicBool = AtomicBool::new(false);

/// A thread that entered this program where it was not started: a child's random
/// thread entry can be `_start` (the ELF entry is one of the edge values) or this
/// trampoline. Run on, it would be a second thread on a stack already in use (once
/// seen as "nested fuzzers" whose registers and memory changed under them: two
/// workers on one stack); it ends at once instead.
fn stray() -> ! {
    sys::thread_exit(97)
}

extern "C" fn rust_thread_start(slot: u64) -> ! {
    let s = slot as usize;
    if s >= SLOTS || SLOT_TAKEN[s].swap(true, SeqCst) {
        stray();
    }
    let arg = SLOT_ARG[s].load(SeqCst);
    let code = match Job::from(SLOT_JOB[s].load(SeqCst)) {
        Some(Job::Worker) => worker(s, arg, false),
        Some(Job::ChildWorker) => worker(s, arg, true),
        Some(Job::Watchdog) => watchdog(),
        Some(Job::Exiter) => exiter(arg),
        Some(Job::Blocker) => blocker(s, arg),
        Some(Job::Joiner) => joiner(s),
        Some(Job::Toucher) => toucher(s, arg),
        Some(Job::Mutator) => mutator(arg),
        Some(Job::FaultInThread) => fault(arg),
        Some(Job::Flooder) => flood(arg, true),
        None => 99,
    };
    sys::thread_exit(code)
}

/// Starts `job` on the .bss stack of `slot`; its thread id.
fn start(slot: usize, job: Job, arg: u64) -> Result<u64, Error> {
    SLOT_JOB[slot].store(job as u64, SeqCst);
    SLOT_ARG[slot].store(arg, SeqCst);
    sys::thread_spawn(
        stub(fuzz_rust_entry) as usize,
        stack_top(slot) as usize,
        slot as u64,
    )
    .map(|t| t as u64)
}

// ---------------------------------------------------------------------------------
// Shared state and statistics.

static SEED: AtomicU64 = AtomicU64::new(0);
static CPUS: AtomicUsize = AtomicUsize::new(1);
static WORKERS: AtomicUsize = AtomicUsize::new(0);
static PID: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);
static DEADLINE: AtomicU64 = AtomicU64::new(0);
static START_NS: AtomicU64 = AtomicU64::new(0);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// Child modes enabled (bit `mode - 1`).
static MODES: AtomicU64 = AtomicU64::new(0x7f);
/// Most threads one thread-flood child starts.
static FLOOD_CAP: AtomicU64 = AtomicU64::new(2000);
/// Whether some children are nested fuzzers (bit 57).
static NESTED: AtomicBool = AtomicBool::new(false);
const BIG_FLOOD: u64 = 100_000;

static CALLS: [AtomicU64; MAX_WORKERS] = [const { AtomicU64::new(0) }; MAX_WORKERS];
/// Per error code (index = code, 0 unused).
static ERRORS: [AtomicU64; Error::ALL.len() + 1] =
    [const { AtomicU64::new(0) }; Error::ALL.len() + 1];
static LAST_OP: [AtomicU64; MAX_WORKERS] = [const { AtomicU64::new(0) }; MAX_WORKERS];
static LAST_A0: [AtomicU64; MAX_WORKERS] = [const { AtomicU64::new(0) }; MAX_WORKERS];
static LAST_A1: [AtomicU64; MAX_WORKERS] = [const { AtomicU64::new(0) }; MAX_WORKERS];
static WORKER_DONE: [AtomicBool; MAX_WORKERS] = [const { AtomicBool::new(false) }; MAX_WORKERS];

static CHILDREN_SPAWNED: AtomicU64 = AtomicU64::new(0);
static CHILDREN_KILLED: AtomicU64 = AtomicU64::new(0);
static SPAWN_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Pids already waited for: waiting for them again must say `NotFound`.
static REAPED: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
static REAPED_NEXT: AtomicUsize = AtomicUsize::new(0);
/// A memory-exhausting child is alive; the epoch counts such children's starts and
/// ends, so a child that lived beside one may have been killed for lack of memory.
static HOG_ACTIVE: AtomicBool = AtomicBool::new(false);
static HOG_EPOCH: AtomicU64 = AtomicU64::new(0);
/// The child the main thread is waiting for, and since when (for the watchdog).
static WAITING_PID: AtomicU64 = AtomicU64::new(0);
static WAITING_SINCE: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    sys::time_ns()
}

fn violation(what: core::fmt::Arguments<'_>) {
    let n = VIOLATIONS.fetch_add(1, SeqCst);
    if n < 30 {
        say!(
            "fuzz: VIOLATION (seed {:#x}, pid {}): {}",
            SEED.load(Relaxed),
            PID.load(Relaxed),
            what
        );
    }
}

// ---------------------------------------------------------------------------------
// Children the parent waits for.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Must be killed by the kernel.
    Killed,
    /// Must exit with this status (or be killed if it lived beside a memory hog).
    Code(u64),
    /// This status or killed.
    CodeOrKilled(u64),
    /// Should never have started (a refused executable).
    Refused,
}

#[derive(Clone, Copy)]
struct Child {
    pid: u64,
    mode: u64,
    expect: Expect,
    hog_epoch: u64,
    hog: bool,
}

const MAX_CHILDREN: usize = 32;

struct ChildTable {
    lock: AtomicBool,
    slots: UnsafeCell<[Option<Child>; MAX_CHILDREN]>,
    /// Entries reserved by a spawner that has not filled them yet.
    reserved: UnsafeCell<usize>,
}
// SAFETY: `slots` and `reserved` are only touched with `lock` held.
unsafe impl Sync for ChildTable {}

static CHILDREN: ChildTable = ChildTable {
    lock: AtomicBool::new(false),
    slots: UnsafeCell::new([None; MAX_CHILDREN]),
    reserved: UnsafeCell::new(0),
};

impl ChildTable {
    fn with<R>(&self, f: impl FnOnce(&mut [Option<Child>; MAX_CHILDREN], &mut usize) -> R) -> R {
        while self
            .lock
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
        {
            sys::yield_now();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = unsafe { f(&mut *self.slots.get(), &mut *self.reserved.get()) };
        self.lock.store(false, Release);
        r
    }

    /// Reserves room for one more child if fewer than `limit` are alive.
    fn reserve(&self, limit: usize) -> bool {
        self.with(|s, r| {
            let live = s.iter().filter(|c| c.is_some()).count() + *r;
            if live < limit.min(MAX_CHILDREN) {
                *r += 1;
                true
            } else {
                false
            }
        })
    }

    fn fill(&self, child: Option<Child>) {
        self.with(|s, r| {
            *r -= 1;
            if let Some(c) = child {
                if let Some(slot) = s.iter_mut().find(|x| x.is_none()) {
                    *slot = Some(c);
                }
            }
        })
    }

    fn take_one(&self) -> Option<Child> {
        self.with(|s, _| s.iter_mut().find(|c| c.is_some()).and_then(|c| c.take()))
    }

    fn live(&self) -> usize {
        self.with(|s, r| s.iter().filter(|c| c.is_some()).count() + *r)
    }
}

const MODE_FAULT: u64 = 1;
const MODE_EXIT_MID_CALL: u64 = 2;
const MODE_SLEEPERS: u64 = 3;
const MODE_THREAD_FLOOD: u64 = 4;
const MODE_MEMORY: u64 = 5;
const MODE_RANDOM: u64 = 6;
const MODE_RACE: u64 = 7;
/// A launcher of a full fuzzer (parent role), ended with it (bit 57 of the argument).
const MODE_NESTED: u64 = 8;
const MODE_NAMES: [&str; 9] = [
    "?",
    "fault",
    "exit-mid-call",
    "sleepers",
    "thread-flood",
    "memory",
    "random",
    "race",
    "nested",
];

fn child_arg(mode: u64, param: u64, seed: u64) -> u64 {
    1 << 63 | (mode & 0x7f) << 56 | (param & 0xff_ffff) << 32 | (seed & 0xffff_ffff)
}

/// Child modes, weighted.
fn pick_mode(rng: &mut Rng) -> u64 {
    rng.pick(&[
        MODE_FAULT,
        MODE_FAULT,
        MODE_FAULT,
        MODE_EXIT_MID_CALL,
        MODE_EXIT_MID_CALL,
        MODE_SLEEPERS,
        MODE_SLEEPERS,
        MODE_THREAD_FLOOD,
        MODE_MEMORY,
        MODE_RANDOM,
        MODE_RANDOM,
        MODE_RANDOM,
        MODE_RACE,
        MODE_RACE,
        MODE_RACE,
    ])
}

/// Spawns `fuzz` as a child in a random mode, if fewer than `limit` children are alive.
fn spawn_child(rng: &mut Rng, limit: usize) -> bool {
    let enabled = |m: u64| MODES.load(Relaxed) & 1 << (m - 1) != 0;
    let mut mode = 0;
    for _ in 0..32 {
        let m = pick_mode(rng);
        if enabled(m) {
            mode = m;
            break;
        }
    }
    if NESTED.load(Relaxed) && rng.chance(4) {
        mode = MODE_NESTED;
    }
    if mode == 0 {
        return false;
    }
    let hog = mode == MODE_MEMORY;
    if hog && HOG_ACTIVE.swap(true, SeqCst) {
        if !enabled(MODE_RANDOM) {
            return false;
        }
        mode = MODE_RANDOM;
    }
    let hog = hog && mode == MODE_MEMORY;
    if !CHILDREN.reserve(limit) {
        if hog {
            HOG_ACTIVE.store(false, SeqCst);
        }
        return false;
    }
    if hog {
        HOG_EPOCH.fetch_add(1, SeqCst);
    }
    let seed = rng.next() & 0xffff_ffff;
    let code = 1 + rng.below(200);
    let (param, expect) = match mode {
        MODE_FAULT => (rng.below(64), Expect::Killed),
        MODE_EXIT_MID_CALL => (code, Expect::Code(code)),
        MODE_SLEEPERS => (code, Expect::Code(code)),
        MODE_THREAD_FLOOD => (
            1 + rng.below(FLOOD_CAP.load(Relaxed)),
            Expect::CodeOrKilled(0),
        ),
        MODE_MEMORY => (1000 + rng.below(2000), Expect::CodeOrKilled(0)),
        MODE_RANDOM => (100 + rng.below(1500), Expect::CodeOrKilled(0)),
        // The delay before the launcher exits, in ms.
        MODE_NESTED => (
            rng.pick(&[0, 1, 2, 5, 10, 20, 50, 100, 300, 2000]),
            Expect::Code(code),
        ),
        _ => (200 + rng.below(1500), Expect::CodeOrKilled(0)),
    };
    // A launcher's exit code rides above its delay.
    let param = if mode == MODE_NESTED {
        param | code << 12
    } else {
        param
    };
    let arg = child_arg(mode, param, seed);
    let child = match sys::spawn("fuzz", arg) {
        Ok(pid) => {
            CHILDREN_SPAWNED.fetch_add(1, Relaxed);
            Some(Child {
                pid: pid as u64,
                mode,
                expect,
                hog_epoch: HOG_EPOCH.load(SeqCst),
                hog,
            })
        }
        Err(Error::OutOfMemory) => {
            SPAWN_REFUSED.fetch_add(1, Relaxed);
            None
        }
        Err(e) => {
            violation(format_args!(
                "spawning fuzz (mode {}) failed: {e:?}",
                MODE_NAMES[mode as usize]
            ));
            None
        }
    };
    if child.is_none() && hog {
        HOG_ACTIVE.store(false, SeqCst);
        HOG_EPOCH.fetch_add(1, SeqCst);
    }
    CHILDREN.fill(child);
    child.is_some()
}

/// Waits for one child and checks its status.
fn reap(c: Child) {
    WAITING_SINCE.store(now(), SeqCst);
    WAITING_PID.store(c.pid, SeqCst);
    let r = match timed_out_waits(c.pid) {
        Some(r) => r,
        None => sys::wait(c.pid),
    };
    WAITING_PID.store(0, SeqCst);
    if c.hog {
        HOG_ACTIVE.store(false, SeqCst);
        HOG_EPOCH.fetch_add(1, SeqCst);
    }
    let near_hog = HOG_ACTIVE.load(SeqCst) || HOG_EPOCH.load(SeqCst) != c.hog_epoch;
    let slot = REAPED_NEXT.fetch_add(1, Relaxed) % REAPED.len();
    REAPED[slot].store(c.pid, Relaxed);
    let status = match r {
        Ok(s) => s as u64,
        Err(e) => {
            violation(format_args!(
                "wait for child pid {} ({}) failed: {e:?}",
                c.pid, MODE_NAMES[c.mode as usize]
            ));
            return;
        }
    };
    let killed = status == EXIT_KILLED as u64;
    if killed {
        CHILDREN_KILLED.fetch_add(1, Relaxed);
    }
    let ok = match c.expect {
        Expect::Killed => killed,
        // Children beside a memory hog fault too (exit-mid-call allocates, brk's and
        // reads files): when memory runs out the kernel must end the hog (the largest
        // process) and let them wait for its frames, never end them instead. A nested
        // fuzzer may still end killed near a hog (its own hog's tree is its own).
        Expect::Code(code) => status == code || (killed && near_hog && c.mode == MODE_NESTED),
        Expect::CodeOrKilled(code) => status == code || killed,
        Expect::Refused => false,
    };
    if !ok {
        violation(format_args!(
            "child pid {} (mode {}) ended with status {:#x}, expected {}{}",
            c.pid,
            MODE_NAMES[c.mode as usize],
            status,
            match c.expect {
                Expect::Killed => "killed",
                Expect::Code(_) => "its exit code",
                Expect::CodeOrKilled(_) => "0 or killed",
                Expect::Refused => "no process at all (the executable should be refused)",
            },
            if near_hog {
                " (beside a memory hog)"
            } else {
                ""
            }
        ));
    }
}

/// Many timed-out waits: before its blocking wait the reaper looks at the child a few
/// hundred times (`OP_PROCESS_WAIT_TIMEOUT` with 0 and with short time-outs), each of
/// which must time out or return the status (the child ended meanwhile: the wait's
/// registration races the child's end). Every abandoned wait must leave nothing in the
/// kernel; the closing heap check of the run says whether they did. Returns the
/// status once a look got it.
fn timed_out_waits(pid: u64) -> Option<Result<usize, Error>> {
    for i in 0..256u64 {
        let timeout = if i % 8 == 7 { 10_000 * (i % 5) } else { 0 };
        match sys::wait_timeout(pid, timeout) {
            Err(Error::TimedOut) => {}
            r => return Some(r),
        }
    }
    None
}

// ---------------------------------------------------------------------------------
// Argument values.

fn edge_values() -> [u64; 48] {
    let r = |i: usize| USER_REGIONS[i].1;
    let (elf, heap, buf, stack) = (r(0), r(1), r(2), r(3));
    [
        0,
        1,
        u64::MAX,
        2,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        1 << 32,
        1 << 63,
        i64::MAX as u64,
        elf.start as u64 - PAGE,
        elf.start as u64,
        elf.start as u64 + PAGE,
        elf.end as u64 - PAGE,
        elf.end as u64 - 1,
        heap.start as u64,
        heap.start as u64 + PAGE,
        heap.start as u64 - 1,
        heap.end as u64 - PAGE,
        heap.end as u64 - 1,
        buf.start as u64,
        buf.start as u64 - PAGE,
        buf.start as u64 + PAGE,
        buf.start as u64 + 1,
        buf.end as u64 - PAGE,
        buf.end as u64 - 1,
        buf.end as u64,
        buf.end as u64 + PAGE,
        stack.start as u64 - PAGE,
        stack.start as u64 - 1,
        stack.start as u64,
        stack.start as u64 + PAGE,
        stack.end as u64 - PAGE,
        stack.end as u64 - 8,
        stack.end as u64,
        stack.end as u64 + PAGE,
        USER_SPACE_END as u64 - PAGE,
        USER_SPACE_END as u64 - 1,
        USER_SPACE_END as u64,
        KERNEL_SPACE_START as u64,
        0xffff_ffff_8000_0000,
        0xffff_ffff_ffff_f000,
        0x8000_0000_0000,
        0x1234_5678_9abc_def0,
        0x1000,
        0xfff,
        MAX_LOG + 1,
        BUFFER_MAX_SIZE as u64 + 1,
    ]
}

/// Any value: edges, page-aligned random, random in a region, fully random, small.
fn any_value(rng: &mut Rng, edges: &[u64]) -> u64 {
    match rng.below(10) {
        0..=3 => rng.pick(edges),
        4 => rng.next() & 0x7fff_ffff_f000,
        5 => {
            let (_, reg) = USER_REGIONS[rng.below(USER_REGIONS.len() as u64) as usize];
            reg.start as u64 + rng.below((reg.len() as u64 / PAGE).min(1 << 20)) * PAGE
        }
        6 => BUFFER_BASE as u64 + rng.below(2048) * PAGE + rng.pick(&[0, 0, 1, PAGE - 1]),
        7 => rng.next(),
        8 => rng.below(4096),
        _ => rng.pick(edges).wrapping_add(rng.below(16)).wrapping_sub(8),
    }
}

/// A pointer the kernel may read but where no access can map anything (below the ELF
/// base, the stack guard, or outside the user half).
fn surely_invalid(a: u64) -> bool {
    a < ELF_LOAD_BASE as u64
        || a >= USER_SPACE_END as u64
        || (STACK_BASE as u64 - PAGE..STACK_BASE as u64).contains(&a)
}

/// Whether the kernel may write `[a, a + len)` without harming the parent: it starts at
/// a surely invalid address (nothing is written), or lies inside the worker's scratch,
/// or stays clear of the program's image and the top of the stack region.
fn safe_dest(a: u64, len: u64, w: usize) -> bool {
    if surely_invalid(a) {
        return true;
    }
    let end = a.saturating_add(len);
    let s = scratch(w);
    if a >= s && end <= s + SCRATCH as u64 {
        return true;
    }
    let overlaps = |lo: u64, hi: u64| a < hi && lo < end;
    !overlaps(ELF_LOAD_BASE as u64, HEAP_BASE as u64) && !overlaps(STACK_TOP - (4 << 20), STACK_TOP)
}

/// A length for a console write: short (the console stays readable) or too long.
fn log_len(rng: &mut Rng, ptr: u64) -> u64 {
    if surely_invalid(ptr) && rng.chance(2) {
        return rng.pick(&[4096, MAX_LOG, MAX_LOG - 1, 1 << 16, u64::MAX - ptr + 1]);
    }
    match rng.below(10) {
        0..=4 => 0,
        5 if rng.chance(4) => 1 + rng.below(8),
        5 => 0,
        _ => rng.pick(&[MAX_LOG + 1, 1 << 21, 1 << 32, u64::MAX, u64::MAX - ptr + 1]),
    }
}

const PATHS: [&str; 10] = [
    "fuzz",
    "bad-wx.elf",
    "bad-truncated.elf",
    "bad-kernel-half.elf",
    "bad-entry.elf",
    "hello.txt",
    "nope",
    "fuzz/",
    "\u{fffd}",
    "init/../init",
];
static LONG_PATH: [u8; 300] = [b'a'; 300];
static BAD_UTF8: [u8; 4] = [0xff, 0xfe, 0xc0, 0x80];

/// A path argument pair: mostly the listed names, sometimes bad pointers or lengths.
///
/// For spawns (`for_spawn`), `fuzz` is left out (the caller starts real children
/// itself) and the names are rarer: each refused one costs a kernel log line.
fn path_args(rng: &mut Rng, edges: &[u64], for_spawn: bool) -> (u64, u64, usize) {
    let first = if for_spawn { 1 } else { 0 };
    let names = if rng.chance(if for_spawn { 24 } else { 2 }) {
        4
    } else {
        0
    };
    match rng.below(4) + names {
        0 => (PATHS[6].as_ptr() as u64, PATHS[6].len() as u64, 6),
        4..=7 => {
            let i = first + rng.below((PATHS.len() - first) as u64) as usize;
            (PATHS[i].as_ptr() as u64, PATHS[i].len() as u64, i)
        }
        1 => (
            LONG_PATH.as_ptr() as u64,
            rng.pick(&[0, 255, 256, 300, 1 << 20]),
            usize::MAX,
        ),
        2 => (BAD_UTF8.as_ptr() as u64, 1 + rng.below(4), usize::MAX),
        _ => {
            let p = any_value(rng, edges);
            let len = rng.pick(&[0, 1, 4, 255, 256, u64::MAX]);
            // Readable garbage might spell a program's name: only surely invalid ones.
            if surely_invalid(p) {
                (p, len, usize::MAX)
            } else {
                (KERNEL_SPACE_START as u64, len, usize::MAX)
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The fuzzing loop.

struct Worker {
    w: usize,
    cpu: usize,
    rng: Rng,
    dangerous: bool,
    edges: [u64; 48],
    invalid_ops: [u64; 64],
    n_invalid: usize,
    bufs: [(u64, u64); 32],
    n_bufs: usize,
    tids: [(u64, u64); 16],
    n_tids: usize,
    joined: [u64; 8],
    last_time: u64,
    calls: u64,
    pid: u64,
    cpus: usize,
}

fn invalid_ops() -> ([u64; 64], usize) {
    let mut out = [0u64; 64];
    let mut n = 0;
    let mut add = |op: u64| {
        if !OPERATIONS.contains(&(op as usize)) && n < out.len() && !out[..n].contains(&op) {
            out[n] = op;
            n += 1;
        }
    };
    for op in OPERATIONS {
        add(op as u64 - 1);
        add(op as u64 + 1);
    }
    for area in 1..=7u64 {
        add(area << 16);
        add((area << 16) + 0x100);
        add((area << 16) | 0xffff);
    }
    for op in [
        0,
        u64::MAX,
        1 << 63,
        0xffff_ffff,
        (1 << 32) | abi::OP_PROCESS_GET_PID as u64,
        abi::OP_PROCESS_GET_PID as u64 | 0x8000_0000,
    ] {
        add(op);
    }
    (out, n)
}

impl Worker {
    fn new(w: usize, cpu: usize, seed: u64, dangerous: bool) -> Self {
        let (invalid_ops, n_invalid) = invalid_ops();
        Worker {
            w,
            cpu,
            rng: Rng::new(seed, w as u64 + 1),
            dangerous,
            edges: edge_values(),
            invalid_ops,
            n_invalid,
            bufs: [(0, 0); 32],
            n_bufs: 0,
            tids: [(0, 0); 16],
            n_tids: 0,
            joined: [0; 8],
            last_time: 0,
            calls: 0,
            pid: sys::pid(),
            cpus: sys::cpu_count(),
        }
    }

    fn any(&mut self) -> u64 {
        any_value(&mut self.rng, &self.edges)
    }

    /// Issues one call, counts it and checks the ABI's general promises.
    fn call(&mut self, op: u64, a: [u64; 4]) -> isize {
        let extra = [self.rng.next(), self.rng.next()];
        let keep = [self.rng.next(), self.rng.next()];
        if self.w < MAX_WORKERS {
            LAST_OP[self.w].store(op, Relaxed);
            LAST_A0[self.w].store(a[0], Relaxed);
            LAST_A1[self.w].store(a[1], Relaxed);
        }
        let o = raw(op, [a[0], a[1], a[2], a[3], extra[0], extra[1]], keep);
        self.calls += 1;
        if self.w < MAX_WORKERS {
            CALLS[self.w].fetch_add(1, Relaxed);
        }
        if o.result < 0 {
            match Error::from_result(o.result) {
                Some(e) => {
                    ERRORS[e as usize].fetch_add(1, Relaxed);
                }
                None => violation(format_args!(
                    "op {op:#x} ({:#x}, {:#x}, {:#x}, {:#x}) returned {}: no such error code",
                    a[0], a[1], a[2], a[3], o.result
                )),
            }
        }
        if let (false, Some((name, sent, back))) = (o.regs_kept, o.changed) {
            violation(format_args!(
                "op {op:#x} ({:#x}, {:#x}, {:#x}, {:#x}) changed a register other than rax, rcx, r11: {name} {sent:#x} -> {back:#x} (worker {}, thread {}, result {})",
                a[0], a[1], a[2], a[3], self.w, sys::thread_id(), o.result
            ));
        }
        o.result
    }

    fn expect(&self, ok: bool, op: u64, a: [u64; 4], r: isize, what: &str) {
        if !ok {
            violation(format_args!(
                "op {op:#x} ({:#x}, {:#x}, {:#x}, {:#x}) returned {r} ({:#x}): {what}",
                a[0], a[1], a[2], a[3], r as u64
            ));
        }
    }

    fn remember_buffer(&mut self, addr: u64, size: u64) {
        if self.n_bufs == self.bufs.len() {
            let (old, _) = self.bufs[0];
            self.bufs.copy_within(1.., 0);
            self.n_bufs -= 1;
            self.call(abi::OP_BUFFER_FREE as u64, [old, 0, 0, 0]);
        }
        self.bufs[self.n_bufs] = (addr, size);
        self.n_bufs += 1;
    }

    fn join_oldest(&mut self) {
        if self.n_tids == 0 {
            return;
        }
        let (tid, arg) = self.tids[0];
        self.tids.copy_within(1.., 0);
        self.n_tids -= 1;
        let a = [tid, 0, 0, 0];
        let r = self.call(abi::OP_THREAD_JOIN as u64, a);
        self.expect(
            r >= 0 && r as u64 == arg & 0xffff_ffff,
            abi::OP_THREAD_JOIN as u64,
            a,
            r,
            "joining a thread that exits with its argument",
        );
        self.joined[self.calls as usize % self.joined.len()] = tid;
    }

    fn repin(&mut self) {
        let _ = sys::set_affinity(self.cpu);
    }

    /// A destination for a kernel write of `len` bytes, never harming the parent.
    fn dest(&mut self, len: u64) -> u64 {
        let a = match self.rng.below(6) {
            0 => scratch(self.w) + self.rng.below(SCRATCH as u64),
            1 if self.n_bufs > 0 => {
                let (b, s) = self.bufs[self.rng.below(self.n_bufs as u64) as usize];
                b + self.rng.below(s.max(1))
            }
            2 => HEAP_BASE as u64 + self.rng.below(1 << 24),
            _ => self.any(),
        };
        // Children too: a write into their own stacks would fake violations.
        if safe_dest(a, len, self.w) {
            a
        } else {
            KERNEL_SPACE_START as u64
        }
    }

    fn one(&mut self) {
        let rng = &mut self.rng;
        if rng.chance(12) {
            let op = if rng.chance(4) {
                rng.next() | 1 << 40
            } else {
                self.invalid_ops[rng.below(self.n_invalid as u64) as usize]
            };
            let a = [self.any(), self.any(), self.any(), self.any()];
            let r = self.call(op, a);
            self.expect(
                r == Error::UnknownOperation.to_result(),
                op,
                a,
                r,
                "want UnknownOperation",
            );
            return;
        }
        let op = OPERATIONS[rng.below(OPERATIONS.len() as u64) as usize];
        match op {
            abi::OP_PROCESS_EXIT | abi::OP_THREAD_EXIT => {
                if self.dangerous && self.rng.chance(200) {
                    // Exit code 0: the parent expects 0 (or killed) from these children.
                    let a = [0, 0, 0, 0];
                    self.call(op as u64, a);
                }
            }
            abi::OP_PROCESS_YIELD
            | abi::OP_ENVIRONMENT_TIME
            | abi::OP_CPU_COUNT
            | abi::OP_THREAD_CURRENT_CPU
            | abi::OP_PROCESS_GET_PID => {
                let a = [self.any(), self.any(), self.any(), self.any()];
                let r = self.call(op as u64, a);
                let ok = match op {
                    abi::OP_PROCESS_YIELD => r == 0,
                    abi::OP_ENVIRONMENT_TIME => {
                        let ok = r >= 0 && r as u64 >= self.last_time;
                        self.last_time = r as u64;
                        ok
                    }
                    abi::OP_CPU_COUNT => r as usize == self.cpus,
                    abi::OP_THREAD_CURRENT_CPU => {
                        (r as usize) < self.cpus && (self.dangerous || r as usize == self.cpu)
                    }
                    _ => r as u64 == self.pid,
                };
                self.expect(ok, op as u64, a, r, "wrong result");
            }
            // Waits and kills only ever name pids that are not live children of this
            // process (any thread of the parent may reap or kill its children, and the
            // main thread waits for them itself).
            abi::OP_PROCESS_WAIT | abi::OP_PROCESS_WAIT_TIMEOUT | abi::OP_PROCESS_KILL => {
                let reaped = REAPED[self.rng.below(REAPED.len() as u64) as usize].load(Relaxed);
                let pid = match self.rng.below(5) {
                    0 => self.pid,
                    1 => 0,
                    2 => u64::MAX,
                    3 if reaped != 0 => reaped,
                    _ => self.rng.next() | 1 << 40,
                };
                let a = [pid, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                let want = if pid == self.pid && op != abi::OP_PROCESS_KILL {
                    Error::NotPermitted
                } else {
                    Error::NotFound
                };
                self.expect(
                    r == want.to_result(),
                    op as u64,
                    a,
                    r,
                    "want NotPermitted/NotFound",
                );
            }
            abi::OP_PROCESS_BRK => {
                let b = match self.rng.below(8) {
                    0 => 0,
                    1 => HEAP_BASE as u64 + self.rng.below(1 << 26),
                    2 => (HEAP_BASE as u64 + self.rng.below(1 << 26)) & !(PAGE - 1),
                    3 => self.rng.pick(&[
                        HEAP_BASE as u64,
                        HEAP_BASE as u64 - 1,
                        HEAP_BASE as u64 + 1,
                        HEAP_LIMIT as u64,
                        HEAP_LIMIT as u64 + 1,
                        HEAP_LIMIT as u64 - 1,
                        HEAP_LIMIT as u64 - PAGE,
                    ]),
                    _ => self.any(),
                };
                let a = [b, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                let in_heap = (HEAP_BASE as u64..=HEAP_LIMIT as u64).contains(&(r as u64));
                let ok = if r < 0 {
                    r == Error::InvalidArgument.to_result()
                        && !(HEAP_BASE as u64..HEAP_LIMIT as u64).contains(&b)
                        || r == Error::OutOfMemory.to_result()
                } else {
                    in_heap
                };
                self.expect(
                    ok,
                    op as u64,
                    a,
                    r,
                    "brk result outside the heap or wrong error",
                );
            }
            abi::OP_PROCESS_SLEEP => {
                let mut ns = match self.rng.below(4) {
                    0 => 0,
                    1 => 1,
                    2 => self.rng.below(2_000_000),
                    _ => self.any(),
                };
                if !self.dangerous || self.rng.below(4) != 0 {
                    ns %= 5_000_000;
                }
                let a = [ns, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                self.expect(r == 0, op as u64, a, r, "sleep returns 0");
            }
            abi::OP_ENVIRONMENT_SPAWN
            | abi::OP_ENVIRONMENT_SPAWN_ARGS
            | abi::OP_ENVIRONMENT_SPAWN_LIMITED => self.spawn_op(),
            abi::OP_ENVIRONMENT_LOG => {
                let p = if self.rng.chance(3) {
                    DOTS.as_ptr() as u64
                } else {
                    self.any()
                };
                let len = log_len(&mut self.rng, p);
                let len = if p == DOTS.as_ptr() as u64 && len <= 8 {
                    len
                } else if !surely_invalid(p) && len <= MAX_LOG {
                    len.min(1)
                } else {
                    len
                };
                let a = [p, len, self.any(), 0];
                let r = self.call(op as u64, a);
                let ok = if len > MAX_LOG {
                    r == Error::InvalidArgument.to_result() || r == Error::BadAddress.to_result()
                } else if surely_invalid(p) && len > 0 {
                    r == Error::BadAddress.to_result()
                } else {
                    r < 0 || r as u64 <= len
                };
                self.expect(ok, op as u64, a, r, "log result");
            }
            abi::OP_PROCESS_MEMORY => {
                let len = match self.rng.below(4) {
                    0 => MEMORY_BYTES,
                    1 => self.rng.below(MEMORY_BYTES + 16),
                    _ => self.any(),
                };
                let pid = match self.rng.below(3) {
                    0 => 0,
                    1 => sys::pid(),
                    _ => self.any(),
                };
                let d = self.dest(len.min(MEMORY_BYTES));
                let a = [pid, d, len, 0];
                let r = self.call(op as u64, a);
                let ok = r < 0 || (r as u64 <= len && r as u64 <= MEMORY_BYTES);
                self.expect(
                    ok,
                    op as u64,
                    a,
                    r,
                    "memory info wrote more than asked or than exists",
                );
            }
            abi::OP_ENVIRONMENT_INFO => {
                let len = match self.rng.below(4) {
                    0 => INFO_BYTES,
                    1 => self.rng.below(INFO_BYTES + 16),
                    _ => self.any(),
                };
                let d = self.dest(len.min(INFO_BYTES));
                let a = [d, len, self.any(), 0];
                let r = self.call(op as u64, a);
                let ok = r < 0 || (r as u64 <= len && r as u64 <= INFO_BYTES);
                self.expect(
                    ok,
                    op as u64,
                    a,
                    r,
                    "info wrote more than asked or than exists",
                );
            }
            abi::OP_BUFFER_ALLOC => {
                let size = match self.rng.below(8) {
                    0 => self.rng.below(1 << 16),
                    1 => self.rng.below(1 << 24),
                    2 => self.rng.pick(&[0, 1, PAGE - 1, PAGE, PAGE + 1]),
                    3 => self.rng.pick(&[
                        BUFFER_MAX_SIZE as u64,
                        BUFFER_MAX_SIZE as u64 + 1,
                        BUFFER_MAX_SIZE as u64 - PAGE,
                        u64::MAX,
                        1 << 31,
                    ]),
                    _ => self.any(),
                };
                let a = [size, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                if r >= 0 {
                    let addr = r as u64;
                    let end = addr.saturating_add(size.next_multiple_of(PAGE));
                    let ok = addr.is_multiple_of(PAGE)
                        && addr >= BUFFER_BASE as u64
                        && end <= (BUFFER_BASE + BUFFER_MAX_SIZE) as u64
                        && size != 0;
                    self.expect(
                        ok,
                        op as u64,
                        a,
                        r,
                        "buffer outside the region or misaligned",
                    );
                    self.remember_buffer(addr, size);
                } else {
                    let ok = r == Error::OutOfMemory.to_result()
                        || r == Error::InvalidArgument.to_result();
                    self.expect(ok, op as u64, a, r, "want OutOfMemory/InvalidArgument");
                }
            }
            abi::OP_BUFFER_FREE => {
                let addr = if self.n_bufs > 0 && self.rng.chance(2) {
                    let i = self.rng.below(self.n_bufs as u64) as usize;
                    let (b, _) = self.bufs[i];
                    self.bufs.copy_within(i + 1.., i);
                    self.n_bufs -= 1;
                    b
                } else if self.rng.chance(2) {
                    BUFFER_BASE as u64 + self.rng.below(256) * PAGE
                } else {
                    self.any()
                };
                let a = [addr, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                let ok = r == 0 || r == Error::NotFound.to_result();
                self.expect(ok, op as u64, a, r, "want 0 or NotFound");
            }
            abi::OP_BUFFER_LOG => {
                let p = if self.n_bufs > 0 && self.rng.chance(2) {
                    let (b, s) = self.bufs[self.rng.below(self.n_bufs as u64) as usize];
                    b + self.rng.pick(&[0, 1, s.saturating_sub(1), s, PAGE - 1])
                } else {
                    self.any()
                };
                let len = log_len(&mut self.rng, p);
                let a = [p, len, self.any(), 0];
                let r = self.call(op as u64, a);
                let ok = r < 0 || r as u64 <= len;
                self.expect(ok, op as u64, a, r, "buffer log result");
            }
            abi::OP_THREAD_SPAWN => self.thread_op(),
            abi::OP_THREAD_JOIN => {
                if self.n_tids > 0 && self.rng.chance(3) {
                    self.join_oldest();
                    return;
                }
                let joined = self.joined[self.rng.below(self.joined.len() as u64) as usize];
                let tid = match self.rng.below(4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 if joined != 0 => joined,
                    _ => self.rng.next() | 1 << 40,
                };
                let a = [tid, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                self.expect(
                    r == Error::NotFound.to_result(),
                    op as u64,
                    a,
                    r,
                    "want NotFound",
                );
            }
            abi::OP_THREAD_SET_AFFINITY => {
                let cpu = match self.rng.below(4) {
                    0 => self.cpu as u64,
                    1 => self.rng.below(self.cpus as u64),
                    2 => self
                        .rng
                        .pick(&[self.cpus as u64, self.cpus as u64 + 1, 255, 256]),
                    _ => self.any(),
                };
                let a = [cpu, self.any(), 0, 0];
                let r = self.call(op as u64, a);
                let ok = if cpu < self.cpus as u64 {
                    r == 0
                } else {
                    r == Error::InvalidArgument.to_result()
                };
                self.expect(ok, op as u64, a, r, "affinity result");
                if r == 0 && cpu != self.cpu as u64 {
                    self.repin();
                }
            }
            abi::OP_FILE_READ_BUFFER => {
                let (p, plen, _) = path_args(&mut self.rng, &self.edges, false);
                let len = match self.rng.below(4) {
                    0 => self.rng.below(SCRATCH as u64),
                    1 => self.rng.pick(&[0, 1, PAGE, 1 << 20, u64::MAX]),
                    _ => self.any(),
                };
                let d = self.dest(len);
                let a = [p, plen, d, len];
                let r = self.call(op as u64, a);
                let ok = r < 0 || r as u64 <= len;
                self.expect(ok, op as u64, a, r, "read more than asked");
            }
            _ => {
                let a = [self.any(), self.any(), self.any(), self.any()];
                self.call(op as u64, a);
            }
        }
    }

    fn spawn_op(&mut self) {
        // Half the time with an argument block: any pointer, any length (and a third
        // of those with a memory limit: the random r9).
        let (op, a3) = if self.rng.chance(2) {
            (abi::OP_ENVIRONMENT_SPAWN as u64, 0)
        } else {
            let len = self.rng.pick(&[0, 1, 4, 4096, 65536, 65537, u64::MAX]);
            let op = if self.rng.chance(3) {
                abi::OP_ENVIRONMENT_SPAWN_LIMITED
            } else {
                abi::OP_ENVIRONMENT_SPAWN_ARGS
            };
            (op as u64, len)
        };
        let (p, len, which) = path_args(&mut self.rng, &self.edges, true);
        let a = [p, len, self.any(), a3];
        // Now and then a real child, through the table the main thread waits on.
        if !self.dangerous && self.rng.chance(40) {
            let limit = 2 + self.cpus / 2;
            spawn_child(&mut self.rng, limit);
            return;
        }
        if self.dangerous && which == 0 {
            return; // children start no grandchildren
        }
        let r = self.call(op, a);
        if r >= 0 {
            // Nothing but `fuzz` may start; wait for it so it cannot outlive us.
            let c = Child {
                pid: r as u64,
                mode: 0,
                expect: Expect::Refused,
                hog_epoch: 0,
                hog: false,
            };
            violation(format_args!(
                "spawning {:?} (arg {:#x}) started pid {}; it should be refused",
                PATHS.get(which),
                a[2],
                r
            ));
            if !self.dangerous {
                reap(c);
            }
        }
    }

    fn thread_op(&mut self) {
        let op = abi::OP_THREAD_SPAWN as u64;
        if self.dangerous && self.rng.chance(100) {
            // Anything at all: most of these end the child process.
            let a = [self.any(), self.any(), self.any(), 0];
            self.call(op, a);
            return;
        }
        if self.n_tids == self.tids.len() {
            self.join_oldest();
        }
        let entry = self.rng.pick(&ending_stubs());
        // The stubs never use their stack, so any user-half value will do.
        let mut stack = self.any();
        if stack >= USER_SPACE_END as u64 && !self.dangerous {
            stack &= USER_SPACE_END as u64 - 1;
        }
        let arg = self.any();
        let a = [entry, stack, arg, 0];
        let r = self.call(op, a);
        // The kernel refuses a stack top above USER_SPACE_END up front.
        let bad_stack = stack > USER_SPACE_END as u64;
        if r >= 0 {
            self.expect(!bad_stack, op, a, r, "a bad stack top was accepted");
            self.tids[self.n_tids] = (r as u64, arg);
            self.n_tids += 1;
        } else {
            self.expect(
                r == Error::OutOfMemory.to_result()
                    || (bad_stack && r == Error::InvalidArgument.to_result()),
                op,
                a,
                r,
                "thread spawn failed",
            );
        }
    }

    /// User-mode touches of the process's own buffers and heap (children only: a
    /// buffer freed or a break moved meanwhile ends the child, which is allowed).
    fn touch(&mut self) {
        let a = if self.n_bufs > 0 && self.rng.chance(2) {
            let (b, s) = self.bufs[self.rng.below(self.n_bufs as u64) as usize];
            b + self.rng.below(s.max(1))
        } else {
            let Ok(brk) = sys::brk(0) else { return };
            if brk as u64 <= HEAP_BASE as u64 {
                return;
            }
            HEAP_BASE as u64 + self.rng.below(brk as u64 - HEAP_BASE as u64)
        };
        // SAFETY: a byte of this child's own buffer or heap; if another thread frees
        // it meanwhile the kernel ends the child, which is one of the outcomes tested.
        unsafe { core::ptr::write_volatile(a as *mut u8, 1) };
    }

    /// A buffer (or heap pages) the kernel fills, then freed (or the break lowered):
    /// unmapping pages that are really mapped, so the call runs a TLB shootdown to
    /// every CPU of the process.
    fn populate_and_release(&mut self) {
        let len = PAGE * (1 + self.rng.below(16));
        let path = if self.rng.chance(2) {
            "fuzz"
        } else {
            "hello.txt"
        };
        let (p, plen) = (path.as_ptr() as u64, path.len() as u64);
        if self.rng.chance(2) {
            let r = self.call(abi::OP_BUFFER_ALLOC as u64, [len, 0, 0, 0]);
            if r > 0 {
                self.call(abi::OP_FILE_READ_BUFFER as u64, [p, plen, r as u64, len]);
                self.call(abi::OP_BUFFER_FREE as u64, [r as u64, 0, 0, 0]);
            }
        } else {
            let base = HEAP_BASE as u64 + self.rng.below(1 << 24) / PAGE * PAGE;
            self.call(abi::OP_PROCESS_BRK as u64, [base + len, 0, 0, 0]);
            self.call(abi::OP_FILE_READ_BUFFER as u64, [p, plen, base, len]);
            self.call(abi::OP_PROCESS_BRK as u64, [base, 0, 0, 0]);
        }
    }

    fn finish(&mut self) {
        while self.n_tids > 0 {
            self.join_oldest();
        }
        for i in 0..self.n_bufs {
            self.call(abi::OP_BUFFER_FREE as u64, [self.bufs[i].0, 0, 0, 0]);
        }
        self.n_bufs = 0;
    }
}

fn worker(slot: usize, arg: u64, dangerous: bool) -> u64 {
    let cpus = sys::cpu_count();
    let cpu = slot % cpus;
    if !dangerous && sys::set_affinity(cpu).is_err() {
        violation(format_args!(
            "worker {slot} could not pin itself to cpu {cpu}"
        ));
    }
    let mut wk = Worker::new(slot, cpu, arg, dangerous);
    let deadline = DEADLINE.load(SeqCst);
    loop {
        for _ in 0..64 {
            if wk.rng.chance(16) {
                wk.populate_and_release();
            }
            wk.one();
            if dangerous && wk.rng.chance(8) {
                wk.touch();
            }
        }
        if STOP.load(Relaxed) || now() >= deadline {
            break;
        }
    }
    wk.finish();
    if slot < MAX_WORKERS {
        WORKER_DONE[slot].store(true, SeqCst);
    }
    0
}

fn watchdog() -> u64 {
    let workers = WORKERS.load(SeqCst);
    let mut prev = [0u64; MAX_WORKERS];
    let mut since = [now(); MAX_WORKERS];
    let mut reported = [false; MAX_WORKERS];
    let mut wait_reported = 0;
    let mut next_progress = START_NS.load(SeqCst) + 5_000_000_000;
    const STUCK_NS: u64 = 30_000_000_000;
    loop {
        let before = now();
        sys::sleep_ns(500_000_000);
        let t = now();
        if t - before > 5_000_000_000 {
            // Not a violation by itself (sleeps have no upper bound), but worth seeing.
            say!(
                "fuzz: SLOW: the watchdog slept 500 ms and woke after {} ms",
                (t - before) / 1_000_000
            );
        }
        let all_done = (0..workers).all(|w| WORKER_DONE[w].load(SeqCst));
        for w in 0..workers {
            let c = CALLS[w].load(Relaxed);
            if c != prev[w] || WORKER_DONE[w].load(Relaxed) {
                prev[w] = c;
                since[w] = t;
            } else if t.saturating_sub(since[w]) > STUCK_NS && !reported[w] {
                reported[w] = true;
                violation(format_args!(
                    "STUCK: worker {w} (cpu {w}) made no call for {} s; in op {:#x} ({:#x}, {:#x})",
                    (t.saturating_sub(since[w])) / 1_000_000_000,
                    LAST_OP[w].load(Relaxed),
                    LAST_A0[w].load(Relaxed),
                    LAST_A1[w].load(Relaxed)
                ));
            }
        }
        let pid = WAITING_PID.load(SeqCst);
        if pid != 0
            && pid != wait_reported
            && t.saturating_sub(WAITING_SINCE.load(SeqCst)) > STUCK_NS
        {
            wait_reported = pid;
            violation(format_args!(
                "STUCK: waiting for child pid {pid} for {} s",
                (t.saturating_sub(WAITING_SINCE.load(SeqCst))) / 1_000_000_000
            ));
        }
        if t >= next_progress {
            next_progress += 5_000_000_000;
            progress(t);
        }
        if STOP.load(SeqCst) && all_done {
            return 0;
        }
    }
}

fn total_calls() -> u64 {
    CALLS.iter().map(|c| c.load(Relaxed)).sum()
}

fn progress(t: u64) {
    let e = |err: Error| ERRORS[err as usize].load(Relaxed);
    let errors: u64 = ERRORS.iter().map(|c| c.load(Relaxed)).sum();
    say!(
        "fuzz: t={}s calls={} children={} killed={} errors={} (inval {} oom {} notfound {} badaddr {} unknownop {} notperm {} timedout {} limit {}) violations={}",
        (t - START_NS.load(Relaxed)) / 1_000_000_000,
        total_calls(),
        CHILDREN_SPAWNED.load(Relaxed),
        CHILDREN_KILLED.load(Relaxed),
        errors,
        e(Error::InvalidArgument),
        e(Error::OutOfMemory),
        e(Error::NotFound),
        e(Error::BadAddress),
        e(Error::UnknownOperation),
        e(Error::NotPermitted),
        e(Error::TimedOut),
        e(Error::LimitReached),
        VIOLATIONS.load(Relaxed)
    );
}

// ---------------------------------------------------------------------------------
// The parent.

fn main(arg: u64) -> u64 {
    if MAIN_RAN.swap(true, SeqCst) {
        stray();
    }
    PID.store(sys::pid(), SeqCst);
    if arg >> 63 == 1 {
        return child(arg);
    }
    let mut seed = arg & 0xffff_ffff;
    if seed == 0 {
        let t = sys::rdtsc() ^ now();
        seed = (t ^ (t >> 32)) & 0xffff_ffff;
        if seed == 0 {
            seed = 1;
        }
    }
    let modes = (arg >> 48) & 0xff;
    MODES.store(if modes == 0 { 0x7f } else { modes & 0x7f }, SeqCst);
    if arg >> 56 & 1 == 1 {
        FLOOD_CAP.store(BIG_FLOOD, SeqCst);
    }
    NESTED.store(arg >> 57 & 1 == 1, SeqCst);
    let mut seconds = (arg >> 32) & 0xffff;
    if seconds == 0 {
        seconds = 20;
    }
    if sys::pid() != 1 {
        seconds = seconds.min(2); // started by someone else: stay short
    }
    SEED.store(seed, SeqCst);
    let cpus = sys::cpu_count();
    let workers = cpus.min(MAX_WORKERS);
    CPUS.store(cpus, SeqCst);
    WORKERS.store(workers, SeqCst);
    say!(
        "fuzz: seed {seed:#x} seconds {seconds} cpus {cpus} workers {workers} children {:#x} (rerun: init=fuzz init.arg={})",
        MODES.load(SeqCst),
        arg & 3 << 56 | modes << 48 | seconds << 32 | seed
    );

    // Everything the parent will touch, touched now (see `pretouch`).
    pretouch(STACK_TOP - (256 << 10), 256 << 10);
    for slot in (0..workers).chain([WATCHDOG_SLOT]) {
        pretouch(stack_top(slot) - SLOT_STACK as u64, SLOT_STACK as u64);
    }
    pretouch(scratch(0), (SCRATCH * workers) as u64);

    let start_ns = now();
    START_NS.store(start_ns, SeqCst);
    let deadline = start_ns + seconds * 1_000_000_000;
    DEADLINE.store(deadline, SeqCst);
    let mut rng = Rng::new(seed, 0);

    let mut tids = [0u64; MAX_WORKERS];
    for (w, tid) in tids.iter_mut().enumerate().take(workers) {
        match start(w, Job::Worker, seed) {
            Ok(t) => *tid = t,
            Err(e) => {
                say!("fuzz: FAIL cannot start worker {w}: {e:?}");
                return 1;
            }
        }
    }
    let watchdog = match start(WATCHDOG_SLOT, Job::Watchdog, 0) {
        Ok(t) => t,
        Err(e) => {
            say!("fuzz: FAIL cannot start the watchdog: {e:?}");
            return 1;
        }
    };

    // Keep a few misbehaving children alive until the deadline.
    let limit = 2 + cpus / 4;
    while now() < deadline {
        if CHILDREN.live() < limit && spawn_child(&mut rng, limit) {
            continue;
        }
        match CHILDREN.take_one() {
            Some(c) => reap(c),
            None => sys::sleep_ns(10_000_000),
        }
    }
    STOP.store(true, SeqCst);
    for (w, tid) in tids.iter().enumerate().take(workers) {
        match sys::thread_join(*tid) {
            Ok(0) => {}
            r => violation(format_args!("worker {w} (tid {tid}) ended with {r:?}")),
        }
    }
    // Children workers started after the loop: wait for all of them.
    loop {
        match CHILDREN.take_one() {
            Some(c) => reap(c),
            None if CHILDREN.live() == 0 => break,
            None => sys::yield_now(),
        }
    }
    if let Err(e) = sys::thread_join(watchdog) {
        violation(format_args!("watchdog join: {e:?}"));
    }
    let seconds_run = (now() - start_ns) / 1_000_000_000;
    progress(now());
    let v = VIOLATIONS.load(SeqCst);
    say!(
        "fuzz: done seed {seed:#x} calls={} children={} killed={} refused={} seconds={seconds_run} violations={v}",
        total_calls(),
        CHILDREN_SPAWNED.load(SeqCst),
        CHILDREN_KILLED.load(SeqCst),
        SPAWN_REFUSED.load(SeqCst),
    );
    if v == 0 {
        0
    } else {
        say!("fuzz: FAIL {v} violations (seed {seed:#x})");
        1
    }
}

// ---------------------------------------------------------------------------------
// Children.

fn child(arg: u64) -> u64 {
    let mode = (arg >> 56) & 0x7f;
    let param = (arg >> 32) & 0xff_ffff;
    let seed = arg & 0xffff_ffff;
    SEED.store(seed, SeqCst);
    let mut rng = Rng::new(seed, 0x5eed);
    let cpus = sys::cpu_count();
    CPUS.store(cpus, SeqCst);
    match mode {
        MODE_FAULT => {
            if param % 4 == 3 {
                // Fault in a second thread while this one is blocked in the kernel.
                let _ = start(0, Job::FaultInThread, param / 4);
                let _ = start(1, Job::Blocker, rng.next());
                sys::sleep_ns(u64::MAX);
                200
            } else {
                fault(param / 4)
            }
        }
        MODE_EXIT_MID_CALL => {
            let n = 1 + rng.below(4) as usize;
            for s in 0..n {
                let _ = start(s, Job::Blocker, rng.next());
            }
            let _ = start(n, Job::Exiter, param | (rng.below(20_000_000)) << 8);
            if rng.chance(2) {
                sys::sleep_ns(u64::MAX);
            } else {
                let me = start(n + 1, Job::Blocker, rng.next()).unwrap_or(0);
                let _ = sys::thread_join(me);
                sys::sleep_ns(u64::MAX);
            }
            201
        }
        MODE_SLEEPERS => {
            for _ in 0..1 + rng.below(8) {
                let _ = sys::thread_spawn(stub(fuzz_stub_sleep_forever) as usize, 0, rng.next());
            }
            if rng.chance(2) {
                let _ = sys::thread_spawn(stub(fuzz_stub_spin) as usize, 0, 0);
            }
            if rng.chance(2) {
                // Two threads joining each other: neither can ever end by itself.
                let a = start(0, Job::Joiner, 0);
                let b = start(1, Job::Joiner, 0);
                if let (Ok(a), Ok(b)) = (a, b) {
                    PEER[0].store(b, SeqCst);
                    PEER[1].store(a, SeqCst);
                }
            }
            sys::sleep_ns(rng.below(30_000_000));
            sys::exit(param)
        }
        MODE_THREAD_FLOOD => {
            if rng.chance(3) {
                // Threads that pin themselves to one CPU and spin in user mode, for up
                // to 2 s: the scheduler must keep that CPU's other threads, timers and
                // the watchdog's idea of progress going (a pinned flood once stopped
                // the machine).
                let cpu = rng.below(cpus as u64);
                let mut n = 0;
                while n < param.min(BIG_FLOOD)
                    && sys::thread_spawn(stub(fuzz_stub_pin_spin) as usize, 0, cpu).is_ok()
                {
                    n += 1;
                }
                sys::sleep_ns(rng.below(2_000_000_000));
            } else {
                flood(param.min(BIG_FLOOD), rng.chance(2));
            }
            0
        }
        MODE_MEMORY => memory_hog(&mut rng, param),
        MODE_RANDOM => {
            DEADLINE.store(now() + param.min(3000) * 1_000_000, SeqCst);
            let n = 1 + rng.below(cpus.min(4) as u64) as usize;
            for s in 0..n {
                let _ = start(s, Job::ChildWorker, rng.next());
            }
            sys::sleep_ns(param.min(3000) * 1_000_000);
            if VIOLATIONS.load(SeqCst) > 0 {
                100
            } else {
                0
            }
        }
        MODE_RACE => race(&mut rng, param.min(3000)),
        MODE_NESTED => {
            // A full fuzzer (parent role: 1 s, every child kind, no nesting), left to
            // the kernel: this process exits after `param & 0xfff` ms without waiting,
            // which ends the nested fuzzer (an orphan) wherever it is by then. Its
            // violations go to the console like everyone's.
            let _ = sys::spawn("fuzz", 1 << 32 | rng.next() & 0xffff_ffff);
            sys::sleep_ns((param & 0xfff) * 1_000_000);
            param >> 12
        }
        _ => 0,
    }
}

/// The thread each `Joiner` joins (set by the main thread after both started).
static PEER: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

fn joiner(slot: usize) -> u64 {
    loop {
        let t = PEER[slot % 2].load(SeqCst);
        if t != 0 {
            let _ = sys::thread_join(t);
            return 0;
        }
        sys::sleep_ns(1_000_000);
    }
}

/// Sleeps a little, then ends the whole process from this thread while the others are
/// in the middle of calls. `arg`: the exit code in the low 8 bits, the delay above.
fn exiter(arg: u64) -> u64 {
    sys::sleep_ns(arg >> 8);
    sys::exit(arg & 0xff)
}

/// Something that keeps this thread in or near the kernel.
fn blocker(slot: usize, arg: u64) -> u64 {
    let mut rng = Rng::new(arg, slot as u64);
    match rng.below(9) {
        0 => sys::sleep_ns(10_000_000_000),
        1 => {
            let t = sys::thread_spawn(stub(fuzz_stub_sleep_forever) as usize, 0, 0);
            if let Ok(t) = t {
                let _ = sys::thread_join(t as u64);
            }
        }
        2 => loop {
            sys::yield_now();
        },
        3 => loop {
            if let Ok(b) = sys::buffer_alloc(1 + rng.below(1 << 20) as usize) {
                let _ = sys::read_file("hello.txt", b, 4096);
                // SAFETY: this thread's own live buffer.
                unsafe { core::ptr::write_volatile(b as *mut u8, 1) };
                let _ = sys::buffer_free(b);
            }
        },
        4 => loop {
            let b = HEAP_BASE + (1 + rng.below(64) as usize) * PAGE_SIZE;
            let _ = sys::brk(b);
            let _ = sys::read_file("fuzz", HEAP_BASE, b - HEAP_BASE);
        },
        5 => loop {
            let _ = sys::log(&DOTS[..0]);
            let _ = sys::info();
        },
        // Long calls the process ends in the middle of (the exiter's delay is at most
        // 20 ms): a brk shrink of 16 MiB of touched heap (eight unmap batches), and a
        // 1 MiB log (the console must go to the next writer at once).
        7 => loop {
            const SIZE: usize = 16 << 20;
            let plenty = sys::info().is_ok_and(|i| i.memory_free > 4 * SIZE as u64);
            if plenty && sys::brk(HEAP_BASE + SIZE).is_ok() {
                for page in (HEAP_BASE..HEAP_BASE + SIZE).step_by(PAGE_SIZE) {
                    // SAFETY: the heap just grown; nothing else of this process uses it.
                    unsafe { core::ptr::write_volatile(page as *mut u8, 1) };
                }
            }
            let _ = sys::brk(HEAP_BASE);
        },
        8 => {
            const LEN: usize = 1 << 20;
            if let Ok(b) = sys::buffer_alloc(LEN) {
                // SAFETY: this thread's own live buffer of LEN bytes.
                unsafe {
                    core::ptr::write_bytes(b as *mut u8, b'.', LEN);
                    for line in (b + 127..b + LEN).step_by(128) {
                        core::ptr::write_volatile(line as *mut u8, b'\n');
                    }
                }
                loop {
                    let _ = sys::buffer_log(b, LEN);
                }
            }
        }
        _ => loop {
            core::hint::spin_loop();
        },
    }
    0
}

/// Faults in one of several ways; must never return.
fn fault(kind: u64) -> u64 {
    // SAFETY: every branch deliberately faults or executes a privileged instruction;
    // the kernel must end this process. Nothing after the fault runs.
    unsafe {
        match kind % 16 {
            0 => core::ptr::write_volatile(core::ptr::null_mut::<u64>(), 1),
            1 => core::ptr::write_volatile(KERNEL_SPACE_START as *mut u64, 1),
            2 => {
                core::ptr::read_volatile(0xffff_ffff_8000_0000u64 as *const u64);
            }
            3 => {
                // Execute data: a `ret` in .bss is not executable.
                let p = scratch(0) as *mut u8;
                core::ptr::write_volatile(p, 0xc3);
                let f: extern "C" fn() = core::mem::transmute(p);
                f();
            }
            4 => {
                core::ptr::read_volatile(0x8000_0000_0000u64 as *const u64);
            }
            5 => core::arch::asm!("ud2"),
            6 => core::arch::asm!("hlt"),
            7 => core::arch::asm!("int3"),
            8 => {
                core::arch::asm!("xor edx, edx", "xor eax, eax", "div rax", out("rax") _, out("rdx") _)
            }
            9 => core::ptr::write_volatile(fault as *const () as *mut u8, 0x90),
            10 => core::ptr::write_volatile((STACK_BASE - 8) as *mut u64, 1),
            11 => core::arch::asm!("jmp {}", in(reg) 0xffff_ffff_8000_0000u64),
            12 => core::arch::asm!("jmp {}", in(reg) 0x8000_0000_0000u64),
            13 => core::arch::asm!("int 0x80"),
            14 => core::arch::asm!("mov rax, cr3", out("rax") _),
            _ => core::arch::asm!("mov rsp, 8", "push rax"),
        }
    }
    sys::log(b"fuzz child: a fault did not end the process\n").ok();
    77
}

/// Spawns up to `cap` threads (sleeping forever, or ending at once) until a spawn fails.
fn flood(cap: u64, forever: bool) -> u64 {
    let entry = if forever {
        stub(fuzz_stub_sleep_forever)
    } else {
        stub(fuzz_stub_exit)
    };
    let mut n = 0;
    while n < cap && sys::thread_spawn(entry as usize, 0, n).is_ok() {
        n += 1;
    }
    0
}

fn memory_hog(rng: &mut Rng, ms: u64) -> u64 {
    let deadline = now() + ms.min(4000) * 1_000_000;
    if rng.chance(2) {
        // Threads keep coming while frames run out: the kernel's own allocations for
        // them must fail cleanly too.
        let _ = start(0, Job::Flooder, 4000);
    }
    let mut touched = 0u64;
    let use_heap = rng.chance(3);
    loop {
        let size = (1 + rng.below(64)) << 20;
        let base = if use_heap {
            let Ok(old) = sys::brk(0) else { return 0 };
            if sys::brk(old + size as usize).is_err() {
                return 0;
            }
            old as u64
        } else {
            match sys::buffer_alloc(size as usize) {
                Ok(b) => b as u64,
                Err(_) => return 0,
            }
        };
        let mut a = base;
        while a < base + size {
            // SAFETY: a page of the buffer or heap just added; running out of frames
            // here ends the process, which is the point.
            unsafe { core::ptr::write_volatile(a as *mut u8, 1) };
            a += PAGE;
            touched += 1;
            if touched.is_multiple_of(1024) && now() >= deadline {
                return 0;
            }
        }
    }
}

static RACE_BUFS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
const RACE_BUF: usize = 256 * 1024;
const RACE_HEAP: u64 = 1 << 20;

fn race(rng: &mut Rng, ms: u64) -> u64 {
    for b in &RACE_BUFS {
        if let Ok(a) = sys::buffer_alloc(RACE_BUF) {
            b.store(a as u64, SeqCst);
        }
    }
    let _ = sys::brk(HEAP_BASE + RACE_HEAP as usize);
    let cpus = sys::cpu_count();
    let n = cpus.clamp(2, 8);
    DEADLINE.store(now() + ms * 1_000_000, SeqCst);
    let _ = start(0, Job::Mutator, rng.next());
    for s in 1..n {
        let _ = start(s, Job::Toucher, rng.next());
    }
    sys::sleep_ns(ms * 1_000_000);
    0
}

/// Frees and re-allocates buffers and moves the break while the touchers write them.
fn mutator(arg: u64) -> u64 {
    let mut rng = Rng::new(arg, 1);
    let _ = sys::set_affinity(0);
    while now() < DEADLINE.load(Relaxed) {
        let b = &RACE_BUFS[rng.below(RACE_BUFS.len() as u64) as usize];
        let a = b.load(SeqCst);
        if a != 0 {
            let _ = sys::buffer_free(a as usize);
            if !rng.chance(500) {
                // First fit: usually the same address comes back.
                let n = sys::buffer_alloc(RACE_BUF).map(|x| x as u64).unwrap_or(0);
                b.store(n, SeqCst);
            } else {
                b.store(0, SeqCst);
            }
        }
        // Rarely, and only the top half: touchers hitting the gap end the child, and
        // the race should usually last its whole time.
        if rng.chance(64) {
            let _ = sys::brk(HEAP_BASE + (RACE_HEAP / 2 + rng.below(RACE_HEAP / 2)) as usize);
            let _ = sys::brk(HEAP_BASE + RACE_HEAP as usize);
        }
    }
    0
}

fn toucher(slot: usize, arg: u64) -> u64 {
    let mut rng = Rng::new(arg, slot as u64);
    let cpus = sys::cpu_count();
    let _ = sys::set_affinity(slot % cpus);
    while now() < DEADLINE.load(Relaxed) {
        for _ in 0..64 {
            let a = if rng.chance(3) {
                HEAP_BASE as u64 + rng.below(RACE_HEAP)
            } else {
                let b = RACE_BUFS[rng.below(RACE_BUFS.len() as u64) as usize].load(SeqCst);
                if b == 0 {
                    continue;
                }
                b + rng.below(RACE_BUF as u64)
            };
            // SAFETY: this child's buffer or heap, possibly freed meanwhile by the
            // mutator: then the kernel ends the child, an allowed outcome.
            unsafe { core::ptr::write_volatile(a as *mut u8, 1) };
        }
    }
    0
}
