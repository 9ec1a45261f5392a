//! The demand-zero fault benchmark, independent of the OS it runs on.
//!
//! One source for both sides of the comparison: `faultbench` (Panda, over `panda-rt`)
//! and `faultbench-linux` (Linux, over raw system calls and `std`) implement [`Os`] and
//! call [`run`] or [`worker`]. Everything measured — what is touched, how it is timed,
//! how it is reported — is here.
//!
//! Modes (each worker pinned to its own CPU):
//! - `heap`: grow the break by a chunk, write one byte per 4 KiB page, shrink back,
//!   repeat. With threads (one address space) the break is shared: each round the
//!   leader grows it by one chunk per worker, every worker touches its own chunk, and
//!   the leader shrinks it back (so the shrink's TLB shootdown reaches every CPU);
//! - `buffer`: allocate a buffer (Panda `OP_BUFFER_ALLOC`, Linux anonymous `mmap`) of
//!   one chunk, touch every page, free it, repeat;
//! - `stack`: start a thread with a 16 MiB demand-paged stack, touch 15 MiB of it from
//!   the top down, end it, repeat;
//! - `bursty`: allocate a buffer of `burst` pages, touch every page, free it, then
//!   sleep `gap_ms` (the CPU idles), repeat: requests arriving at a server, where an
//!   idle CPU has time to zero frames ahead of the next burst. Its faults/s counts the
//!   gaps too; what matters is the latency of the burst's faults.
//!
//! Before the workers start, the run times the null system call (`Os::null_call`, the
//! cheapest round trip into the kernel and back) on CPU 0: the floor a fault's latency
//! is compared with.
//!
//! Each first touch is timed with the TSC; a log-linear histogram keeps the latency
//! distribution (buckets 1/32 of a power of two wide: percentiles within about 3%).
//! After `warmup_ms` the counters reset and the run lasts `run_ms`. Each worker prints
//! one JSON line; the run prints one more with the kernel's counter deltas, if any.

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use panda_abi::syscall::SystemInfo;

pub const PAGE: usize = panda_abi::PAGE_SIZE;
/// Stack mode: each thread's stack, and how much of it is touched.
pub const STACK_SIZE: usize = 16 << 20;
pub const STACK_TOUCH: usize = 15 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Heap,
    Buffer,
    Stack,
    Bursty,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Heap => "heap",
            Mode::Buffer => "buffer",
            Mode::Stack => "stack",
            Mode::Bursty => "bursty",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// Workers are processes (one address space each) rather than threads.
    pub processes: bool,
    pub workers: usize,
    pub warmup_ms: u64,
    pub run_ms: u64,
    pub chunk_mib: usize,
    /// Bursty mode: faults per burst, and the idle gap after each burst.
    pub burst: usize,
    pub gap_ms: u64,
}

/// Bursty mode's gap is encoded in steps of this many milliseconds (4 bits: 0..75).
pub const GAP_STEP_MS: u64 = 5;

impl Config {
    /// Packs the configuration (and a worker index, for a worker process) into the one
    /// integer Panda passes a program: bits 0-1 and 4 mode (0 heap, 1 buffer, 2 stack,
    /// 4 bursty; 3 is Panda's latency probe), 2 processes, 3 worker role, 8-15 workers,
    /// 16-31 run time in 10 ms, 32-43 chunk MiB (bursty: pages per burst), 44-51
    /// worker index, 52-59 warm-up in 10 ms, 60-63 bursty's gap in `GAP_STEP_MS`.
    pub fn encode(&self, worker: Option<usize>) -> u64 {
        let mode = match self.mode {
            Mode::Heap => 0,
            Mode::Buffer => 1,
            Mode::Stack => 2,
            Mode::Bursty => 1 << 4,
        };
        let (size, gap) = match self.mode {
            Mode::Bursty => (self.burst as u64, self.gap_ms / GAP_STEP_MS),
            _ => (self.chunk_mib as u64, 0),
        };
        mode | (self.processes as u64) << 2
            | (worker.is_some() as u64) << 3
            | (self.workers as u64 & 0xff) << 8
            | ((self.run_ms / 10) & 0xffff) << 16
            | (size & 0xfff) << 32
            | (worker.unwrap_or(0) as u64 & 0xff) << 44
            | ((self.warmup_ms / 10) & 0xff) << 52
            | (gap & 0xf) << 60
    }

    pub fn decode(v: u64) -> (Config, Option<usize>) {
        let mode = match (v & 3) | (v >> 4 & 1) << 2 {
            1 => Mode::Buffer,
            2 => Mode::Stack,
            4 => Mode::Bursty,
            _ => Mode::Heap,
        };
        let size = (((v >> 32) & 0xfff) as usize).max(1);
        let bursty = mode == Mode::Bursty;
        let cfg = Config {
            mode,
            processes: v & 4 != 0,
            workers: (((v >> 8) & 0xff) as usize).max(1),
            run_ms: ((v >> 16) & 0xffff) * 10,
            chunk_mib: if bursty { 1 } else { size },
            warmup_ms: ((v >> 52) & 0xff) * 10,
            burst: if bursty { size } else { 0 },
            gap_ms: if bursty { (v >> 60) * GAP_STEP_MS } else { 0 },
        };
        let worker = (v & 8 != 0).then_some(((v >> 44) & 0xff) as usize);
        (cfg, worker)
    }
}

/// What the benchmark needs from the OS.
pub trait Os: Sync {
    fn name(&self) -> &'static str;
    fn tsc_hz(&self) -> u64;
    fn cpu_count(&self) -> usize;
    /// Pins the calling thread to `cpu`.
    fn pin(&self, cpu: usize) -> bool;
    /// Moves the break (0 queries it); the new break.
    fn brk(&self, new: usize) -> Option<usize>;
    /// `len` bytes of demand-zero memory, and their release.
    fn map(&self, len: usize) -> Option<usize>;
    fn unmap(&self, addr: usize, len: usize);
    /// Runs `f` on a new thread with a `stack`-byte stack.
    fn spawn_thread(&self, stack: usize, f: Box<dyn FnOnce() + Send>) -> Option<u64>;
    fn join_thread(&self, handle: u64) -> bool;
    /// Starts worker `index` of `cfg` as a process; waits for it.
    fn spawn_worker(&self, cfg: &Config, index: usize) -> Option<u64>;
    fn wait_worker(&self, handle: u64) -> bool;
    fn print(&self, line: &str);
    /// The kernel's counters (`OP_ENVIRONMENT_INFO` on Panda; none on Linux).
    fn counters(&self) -> Option<SystemInfo>;
    /// Blocks the calling thread for `ms` milliseconds (its CPU may idle).
    fn sleep_ms(&self, ms: u64);
    /// The cheapest system call there is (Panda `OP_PROCESS_GET_PID`, Linux `getpid`),
    /// made directly (no library cache): the round-trip floor.
    fn null_call(&self);
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter, allowed in user mode on both OSes.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    ((hi as u64) << 32) | lo as u64
}

#[inline(always)]
fn touch(addr: usize) {
    // SAFETY: the caller passes an address of memory it just mapped (a grown heap, a
    // buffer, its own stack below the live frames): the write faults a page in.
    unsafe { (addr as *mut u8).write_volatile(1) };
}

const SUB_BITS: u32 = 5;
const BUCKETS: usize = 64 + (64 - 6) * 32;

/// A log-linear histogram of TSC cycles.
pub struct Histogram {
    counts: Vec<u32>,
    pub total: u64,
    pub max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: alloc::vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 64 {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let sub = (v >> (exp - SUB_BITS)) & 31;
        64 + (exp as usize - 6) * 32 + sub as usize
    }

    /// The smallest value of bucket `i`.
    fn lower(i: usize) -> u64 {
        if i < 64 {
            return i as u64;
        }
        let exp = (i - 64) / 32 + 6;
        let sub = ((i - 64) % 32) as u64;
        (1u64 << exp) + (sub << (exp as u32 - SUB_BITS))
    }

    #[inline(always)]
    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// Adds `other`'s samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn reset(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.total = 0;
        self.max = 0;
    }

    /// The value at quantile `q` (0..=1), as its bucket's lower bound.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64 * q) as u64).min(self.total - 1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen > rank {
                return Self::lower(i);
            }
        }
        self.max
    }

    /// Non-empty buckets as `[[lower_cycles, count], ...]`.
    pub fn json(&self) -> String {
        let mut s = String::from("[");
        for (i, &c) in self.counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            if s.len() > 1 {
                s.push(',');
            }
            s.push_str(&format!("[{},{}]", Self::lower(i), c));
        }
        s.push(']');
        s
    }
}

/// One worker's result.
pub struct Result_ {
    pub worker: usize,
    pub cpu: usize,
    pub faults: u64,
    pub cycles: u64,
    pub hist: Histogram,
}

/// A reusable spinning barrier for `n` threads (yields while waiting).
struct Barrier {
    n: usize,
    arrived: AtomicUsize,
    generation: AtomicU64,
}

impl Barrier {
    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.arrived.store(0, Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                core::hint::spin_loop();
            }
        }
    }
}

/// Shared state of a threads-mode heap run.
struct SharedHeap {
    barrier: Barrier,
    base: AtomicUsize,
    stop: AtomicU64,
}

/// Touches `[start, start + len)` one page at a time, timing each first touch.
#[inline(never)]
fn touch_range(start: usize, len: usize, hist: &mut Histogram) -> u64 {
    let mut n = 0;
    let mut page = start;
    while page < start + len {
        let t0 = rdtsc();
        touch(page);
        let t1 = rdtsc();
        hist.record(t1.wrapping_sub(t0));
        page += PAGE;
        n += 1;
    }
    n
}

/// Touches `STACK_TOUCH` bytes of the calling thread's stack, top down, timing each
/// first touch.
#[inline(never)]
fn touch_own_stack(hist: &mut Histogram) -> u64 {
    let rsp: usize;
    // SAFETY: reads the stack pointer.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    // Start a few pages below the live frames, end well above the stack's bottom.
    let top = (rsp - 4 * PAGE) & !(PAGE - 1);
    let bottom = top - (STACK_TOUCH - 8 * PAGE);
    let mut n = 0;
    let mut page = top;
    while page > bottom {
        let t0 = rdtsc();
        touch(page);
        let t1 = rdtsc();
        hist.record(t1.wrapping_sub(t0));
        page -= PAGE;
        n += 1;
    }
    n
}

fn phase_deadline(os: &dyn Os, ms: u64) -> u64 {
    rdtsc() + os.tsc_hz() / 1000 * ms
}

/// One worker in its own address space (processes mode), or a buffer/stack worker
/// thread: loops its mode's round until the deadline, after a warm-up.
pub fn solo_worker(os: &dyn Os, cfg: &Config, index: usize) -> Result_ {
    let cpu = index % os.cpu_count().max(1);
    os.pin(cpu);
    let chunk = cfg.chunk_mib << 20;
    let mut hist = Histogram::new();
    let mut faults = 0u64;
    let warm_end = phase_deadline(os, cfg.warmup_ms);
    let mut start = rdtsc();
    let mut end = u64::MAX;
    let mut warm = cfg.warmup_ms > 0;
    loop {
        let now = rdtsc();
        if warm && now >= warm_end {
            warm = false;
            hist.reset();
            faults = 0;
            start = now;
            end = phase_deadline(os, cfg.run_ms);
        } else if !warm && end == u64::MAX {
            start = now;
            end = phase_deadline(os, cfg.run_ms);
        }
        if !warm && now >= end {
            break;
        }
        faults += match cfg.mode {
            Mode::Heap => {
                let Some(base) = os.brk(0) else { break };
                let base = base.next_multiple_of(PAGE);
                if os.brk(base + chunk).is_none() {
                    break;
                }
                let n = touch_range(base, chunk, &mut hist);
                os.brk(base);
                n
            }
            Mode::Buffer => {
                let Some(buf) = os.map(chunk) else { break };
                let n = touch_range(buf, chunk, &mut hist);
                os.unmap(buf, chunk);
                n
            }
            Mode::Bursty => {
                let len = cfg.burst * PAGE;
                let Some(buf) = os.map(len) else { break };
                let n = touch_range(buf, len, &mut hist);
                os.unmap(buf, len);
                os.sleep_ms(cfg.gap_ms);
                n
            }
            Mode::Stack => {
                // The stack thread fills a histogram of its own, merged here.
                let shared = alloc::sync::Arc::new(spin_cell::Cell::new());
                let theirs = shared.clone();
                let handle = os.spawn_thread(
                    STACK_SIZE,
                    Box::new(move || {
                        let mut h = Histogram::new();
                        let n = touch_own_stack(&mut h);
                        theirs.put((n, h));
                    }),
                );
                match handle {
                    Some(h) if os.join_thread(h) => match shared.take() {
                        Some((n, h)) => {
                            hist.merge(&h);
                            n
                        }
                        None => break,
                    },
                    _ => break,
                }
            }
        };
    }
    Result_ {
        worker: index,
        cpu,
        faults,
        cycles: rdtsc().saturating_sub(start),
        hist,
    }
}

/// A one-slot mailbox between a stack thread and its worker.
mod spin_cell {
    use core::sync::atomic::{AtomicBool, Ordering};

    pub struct Cell<T> {
        full: AtomicBool,
        value: core::cell::UnsafeCell<Option<T>>,
    }

    // SAFETY: the value is written once before `full` is set (Release) and read only
    // after `full` is seen (Acquire), by one reader.
    unsafe impl<T: Send> Sync for Cell<T> {}
    // SAFETY: the cell owns its `T` (an `Option<T>` and a flag); moving it to another
    // thread moves the `T`, which `T: Send` allows.
    unsafe impl<T: Send> Send for Cell<T> {}

    impl<T> Cell<T> {
        pub fn new() -> Self {
            Self {
                full: AtomicBool::new(false),
                value: core::cell::UnsafeCell::new(None),
            }
        }

        pub fn put(&self, v: T) {
            // SAFETY: only the single writer touches the value before `full` is set.
            unsafe { *self.value.get() = Some(v) };
            self.full.store(true, Ordering::Release);
        }

        pub fn take(&self) -> Option<T> {
            if !self.full.swap(false, Ordering::Acquire) {
                return None;
            }
            // SAFETY: the writer is done (it set `full`), and we are the one reader.
            unsafe { (*self.value.get()).take() }
        }
    }
}

/// Threads-mode heap worker: rounds in lock-step with the other workers.
fn heap_thread_worker(os: &dyn Os, cfg: &Config, index: usize, shared: &SharedHeap) -> Result_ {
    let cpu = index % os.cpu_count().max(1);
    os.pin(cpu);
    let chunk = cfg.chunk_mib << 20;
    let mut hist = Histogram::new();
    let mut faults = 0u64;
    let leader = index == 0;
    let warm_end = phase_deadline(os, cfg.warmup_ms);
    let mut run_end = 0u64;
    let mut start = rdtsc();
    let mut warm = true;
    loop {
        if leader {
            let now = rdtsc();
            if warm && now >= warm_end {
                shared.stop.store(1, Ordering::Release); // 1: warm-up over
                run_end = phase_deadline(os, cfg.run_ms);
            } else if !warm && now >= run_end {
                shared.stop.store(2, Ordering::Release); // 2: done
            }
            let base = os.brk(0).unwrap_or(0).next_multiple_of(PAGE);
            os.brk(base + chunk * cfg.workers);
            shared.base.store(base, Ordering::Release);
        }
        shared.barrier.wait();
        let phase = shared.stop.load(Ordering::Acquire);
        if phase == 2 {
            break;
        }
        if warm && phase == 1 {
            warm = false;
            hist.reset();
            faults = 0;
            start = rdtsc();
        }
        let base = shared.base.load(Ordering::Acquire);
        faults += touch_range(base + index * chunk, chunk, &mut hist);
        shared.barrier.wait();
        if leader {
            os.brk(base);
        }
    }
    let end = rdtsc();
    if leader {
        let base = shared.base.load(Ordering::Acquire);
        os.brk(base);
    }
    Result_ {
        worker: index,
        cpu,
        faults,
        cycles: end.saturating_sub(start),
        hist,
    }
}

fn report(os: &dyn Os, cfg: &Config, r: &Result_) {
    let hz = os.tsc_hz().max(1);
    let ns = |cycles: u64| cycles as u128 * 1_000_000_000 / hz as u128;
    let secs = r.cycles as f64 / hz as f64;
    let rate = if secs > 0.0 {
        r.faults as f64 / secs
    } else {
        0.0
    };
    os.print(&format!(
        "{{\"bench\":\"faultbench\",\"os\":\"{}\",\"mode\":\"{}\",\"workers\":\"{}\",\"n\":{},\"worker\":{},\"cpu\":{},\"faults\":{},\"seconds\":{:.3},\"faults_per_sec\":{:.0},\"lat_ns\":{{\"median\":{},\"p99\":{},\"max\":{}}},\"tsc_hz\":{},\"hist\":{}}}",
        os.name(),
        cfg.mode.name(),
        if cfg.processes { "processes" } else { "threads" },
        cfg.workers,
        r.worker,
        r.cpu,
        r.faults,
        secs,
        rate,
        ns(r.hist.quantile(0.5)),
        ns(r.hist.quantile(0.99)),
        ns(r.hist.max),
        hz,
        r.hist.json()
    ));
}

/// A worker process's main: runs and reports one worker.
pub fn worker(os: &dyn Os, cfg: &Config, index: usize) {
    let r = solo_worker(os, cfg, index);
    report(os, cfg, &r);
}

/// Null system calls timed for the floor (after as many untimed ones).
const NULL_CALLS: usize = 20_000;

/// Times `NULL_CALLS` null system calls on CPU 0, one by one, like a fault's touch.
fn time_null_calls(os: &dyn Os) -> Histogram {
    os.pin(0);
    let mut hist = Histogram::new();
    for i in 0..2 * NULL_CALLS {
        let t0 = rdtsc();
        os.null_call();
        let t1 = rdtsc();
        if i >= NULL_CALLS {
            hist.record(t1.wrapping_sub(t0));
        }
    }
    hist
}

/// The benchmark's main: times the null system call, starts the workers, waits for
/// them, reports.
pub fn run(os: &'static dyn Os, cfg: Config) -> bool {
    let floor = time_null_calls(os);
    let before = os.counters();
    let t0 = rdtsc();
    let mut ok = true;
    if cfg.processes {
        let handles: Vec<_> = (0..cfg.workers).map(|i| os.spawn_worker(&cfg, i)).collect();
        for h in handles {
            ok &= h.is_some_and(|h| os.wait_worker(h));
        }
    } else {
        let results: &'static spin_slots::Slots<Result_> =
            Box::leak(Box::new(spin_slots::Slots::new(cfg.workers)));
        let shared: &'static SharedHeap = Box::leak(Box::new(SharedHeap {
            barrier: Barrier {
                n: cfg.workers,
                arrived: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
            },
            base: AtomicUsize::new(0),
            stop: AtomicU64::new(0),
        }));
        let mut handles = Vec::new();
        for i in 0..cfg.workers {
            let f: Box<dyn FnOnce() + Send> = Box::new(move || {
                let r = if cfg.mode == Mode::Heap {
                    heap_thread_worker(os, &cfg, i, shared)
                } else {
                    solo_worker(os, &cfg, i)
                };
                results.put(i, r);
            });
            handles.push(os.spawn_thread(256 * 1024, f));
        }
        for h in handles {
            ok &= h.is_some_and(|h| os.join_thread(h));
        }
        for i in 0..cfg.workers {
            match results.take(i) {
                Some(r) => report(os, &cfg, &r),
                None => ok = false,
            }
        }
    }
    let wall = rdtsc() - t0;
    let after = os.counters();
    let delta = |f: fn(&SystemInfo) -> u64| match (before, after) {
        (Some(b), Some(a)) => format!("{}", f(&a) - f(&b)),
        _ => String::from("null"),
    };
    let hz = os.tsc_hz().max(1) as u128;
    let ns = |cycles: u64| cycles as u128 * 1_000_000_000 / hz;
    // Mean nanoseconds of the `cycles` counter's growth per unit of the `count`
    // counter's growth over the run.
    let mean_ns =
        |cycles: fn(&SystemInfo) -> u64, count: fn(&SystemInfo) -> u64| match (before, after) {
            (Some(b), Some(a)) if count(&a) > count(&b) => format!(
                "{}",
                ns(cycles(&a) - cycles(&b)) / (count(&a) - count(&b)) as u128
            ),
            _ => String::from("null"),
        };
    // Mean nanoseconds per profiled fault in each part of the kernel's handler.
    let per_fault_ns = |f: fn(&SystemInfo) -> u64| mean_ns(f, |c| c.profiled_faults);
    let profile = format!(
        "{{\"handler_ns\":{},\"classify_ns\":{},\"zero_ns\":{},\"map_ns\":{}}}",
        per_fault_ns(|c| c.fault_handler_cycles),
        per_fault_ns(|c| c.fault_classify_cycles),
        per_fault_ns(|c| c.fault_zero_cycles),
        per_fault_ns(|c| c.fault_map_cycles),
    );
    // Where the zeroing went, in CPU time over the run: inline in faults, and ahead of
    // need (idle CPUs, zeroing tasks): the cost of the pools is never hidden.
    let zeroing_ms = |f: fn(&SystemInfo) -> u64| match (before, after) {
        (Some(b), Some(a)) => format!("{:.1}", ns(f(&a) - f(&b)) as f64 / 1e6),
        _ => String::from("null"),
    };
    let ahead_per_frame_ns = mean_ns(|c| c.zero_ahead_cycles, |c| c.zeroed_ahead);
    let pools_on = match after {
        Some(a) => format!("{}", a.zero_pools_on != 0),
        None => String::from("null"),
    };
    os.print(&format!(
        "{{\"bench\":\"faultbench\",\"os\":\"{}\",\"mode\":\"{}\",\"workers\":\"{}\",\"n\":{},\"cpus_online\":{},\"burst\":{},\"gap_ms\":{},\"worker\":\"run\",\"ok\":{},\"wall_seconds\":{:.3},\"null_call_ns\":{{\"median\":{},\"p99\":{},\"samples\":{}}},\"zero_pools_on\":{},\"kernel_faults\":{},\"zero_pool_hits\":{},\"zero_pool_waits\":{},\"zeroed_inline\":{},\"zeroed_ahead\":{},\"zeroed_for_other_cpus\":{},\"shootdowns\":{},\"shootdown_ipis\":{},\"fault_profile\":{},\"zeroing_inline_ms\":{},\"zeroing_ahead_ms\":{},\"zero_ahead_ns_per_frame\":{}}}",
        os.name(),
        cfg.mode.name(),
        if cfg.processes { "processes" } else { "threads" },
        cfg.workers,
        os.cpu_count(),
        cfg.burst,
        cfg.gap_ms,
        ok,
        wall as f64 / os.tsc_hz().max(1) as f64,
        ns(floor.quantile(0.5)),
        ns(floor.quantile(0.99)),
        floor.total,
        pools_on,
        delta(|c| c.faults),
        delta(|c| c.zero_pool_hits),
        delta(|c| c.zero_pool_waits),
        delta(|c| c.zeroed_inline),
        delta(|c| c.zeroed_ahead),
        delta(|c| c.zeroed_for_other_cpus),
        delta(|c| c.shootdowns),
        delta(|c| c.shootdown_ipis),
        profile,
        zeroing_ms(|c| c.fault_zero_cycles),
        zeroing_ms(|c| c.zero_ahead_cycles),
        ahead_per_frame_ns,
    ));
    ok
}

/// Result slots filled by worker threads.
mod spin_slots {
    use alloc::vec::Vec;

    use super::spin_cell::Cell;

    pub struct Slots<T>(Vec<Cell<T>>);

    impl<T> Slots<T> {
        pub fn new(n: usize) -> Self {
            Self((0..n).map(|_| Cell::new()).collect())
        }
        pub fn put(&self, i: usize, v: T) {
            self.0[i].put(v);
        }
        pub fn take(&self, i: usize) -> Option<T> {
            self.0[i].take()
        }
    }
}
