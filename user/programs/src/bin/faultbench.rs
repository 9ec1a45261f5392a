//! Demand-zero fault benchmark (see `bench_core.rs`), Panda side. Run as init by
//! `scripts/bench.sh` with `init.arg` = `Config::encode`; worker processes are this
//! program again, spawned with the worker role bit set.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use panda_rt::{entry, println, sys, thread};

#[path = "../bench_core.rs"]
mod bench_core;

use bench_core::{Config, Os};
use panda_rt::abi::syscall::SystemInfo;

entry!(main);

struct Panda {
    tsc_hz: u64,
}

impl Os for Panda {
    fn name(&self) -> &'static str {
        "panda"
    }
    fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }
    fn cpu_count(&self) -> usize {
        sys::cpu_count()
    }
    fn pin(&self, cpu: usize) -> bool {
        sys::set_affinity(cpu).is_ok()
    }
    fn brk(&self, new: usize) -> Option<usize> {
        sys::brk(new).ok()
    }
    fn map(&self, len: usize) -> Option<usize> {
        sys::buffer_alloc(len).ok()
    }
    fn unmap(&self, addr: usize, _len: usize) {
        let _ = sys::buffer_free(addr);
    }
    fn spawn_thread(&self, stack: usize, f: Box<dyn FnOnce() + Send>) -> Option<u64> {
        let t = thread::spawn_with_stack(stack, move || {
            f();
            0
        })
        .ok()?;
        Some(Box::into_raw(Box::new(t)) as u64)
    }
    fn join_thread(&self, handle: u64) -> bool {
        // SAFETY: `handle` came from `Box::into_raw` in `spawn_thread`, joined once.
        let t = unsafe { Box::from_raw(handle as *mut thread::Thread) };
        t.join().is_ok_and(|code| code == 0)
    }
    fn spawn_worker(&self, cfg: &Config, index: usize) -> Option<u64> {
        sys::spawn("faultbench", cfg.encode(Some(index)))
            .ok()
            .map(|p| p as u64)
    }
    fn wait_worker(&self, handle: u64) -> bool {
        sys::wait(handle) == Ok(0)
    }
    fn print(&self, line: &str) {
        println!("{line}");
    }
    fn counters(&self) -> Option<SystemInfo> {
        sys::info().ok()
    }
    fn sleep_ms(&self, ms: u64) {
        sys::sleep_ns(ms * 1_000_000);
    }
    fn null_call(&self) {
        core::hint::black_box(sys::pid());
    }
}

/// `init.arg` with mode bits 3: the fault-latency probe instead of a throughput run.
const LATENCY_PROBE: u64 = 3;

/// The kernel's zeroed-pool hits so far (0 where the counters cannot be read).
fn pool_hits() -> u64 {
    sys::info().map(|i| i.zero_pool_hits).unwrap_or(0)
}

/// One phase's line: its latencies and the pool hits since `hits_before`.
fn report_latency(phase: &str, hist: &bench_core::Histogram, tsc_hz: u64, hits_before: u64) {
    let ns = |c: u64| c as u128 * 1_000_000_000 / tsc_hz.max(1) as u128;
    println!(
        "{{\"bench\":\"faultlat\",\"phase\":\"{phase}\",\"samples\":{},\"median_ns\":{},\"p99_ns\":{},\"max_ns\":{},\"pool_hits\":{}}}",
        hist.total,
        ns(hist.quantile(0.5)),
        ns(hist.quantile(0.99)),
        ns(hist.max),
        pool_hits() - hits_before
    );
}

/// Times demand-zero faults on CPU 0 in three situations: with a warm zeroed pool
/// (after the CPU idled), with the pool empty and nothing else to run (the fault
/// zeroes inline), and with the pool empty while another thread keeps yielding on the
/// same CPU (the fault awaits the zeroing task).
fn latency_probe(tsc_hz: u64) -> u64 {
    use core::sync::atomic::{AtomicBool, Ordering};
    const PAGE: usize = panda_abi::PAGE_SIZE;
    static STOP: AtomicBool = AtomicBool::new(false);
    if sys::set_affinity(0).is_err() {
        return 1;
    }
    let time_touch = |base: usize, pages: usize, skip: usize, hist: &mut bench_core::Histogram| {
        for i in 0..pages {
            let p = base + i * PAGE;
            let t0 = bench_core::rdtsc();
            // SAFETY: the page lies below the break just set.
            unsafe { (p as *mut u8).write_volatile(1) };
            let t1 = bench_core::rdtsc();
            if i >= skip {
                hist.record(t1 - t0);
            }
        }
    };
    // Everything allocated (the runtime's heap grows the break) before the break is
    // read: the probe moves the break above it and back.
    let mut warm = bench_core::Histogram::new();
    let mut inline = bench_core::Histogram::new();
    let mut awaited = bench_core::Histogram::new();
    let base = sys::brk(0).unwrap_or(0).next_multiple_of(PAGE);
    // 1. Warm pool: idle 200 ms (the idle work fills the pool), then 128 faults.
    let hits = pool_hits();
    for _ in 0..20 {
        sys::sleep_ns(200_000_000);
        let _ = sys::brk(base + 128 * PAGE);
        time_touch(base, 128, 0, &mut warm);
        let _ = sys::brk(base);
    }
    report_latency("warm_pool", &warm, tsc_hz, hits);
    // 2. Empty pool, nothing else to run: 16384 faults, the first 1024 not counted
    // (they drain the pool).
    let hits = pool_hits();
    let _ = sys::brk(base + 16384 * PAGE);
    time_touch(base, 16384, 1024, &mut inline);
    let _ = sys::brk(base);
    report_latency("empty_pool_inline", &inline, tsc_hz, hits);
    // 3. Empty pool with a thread that keeps yielding on the same CPU: faults await
    // the zeroing task while the other thread runs.
    STOP.store(false, Ordering::SeqCst);
    let other = thread::spawn(|| {
        if sys::set_affinity(0).is_err() {
            return 1;
        }
        while !STOP.load(Ordering::SeqCst) {
            sys::yield_now();
        }
        0
    });
    let base = sys::brk(0).unwrap_or(0).next_multiple_of(PAGE);
    let waits_before = sys::info().map(|i| i.zero_pool_waits).unwrap_or(0);
    let hits = pool_hits();
    let _ = sys::brk(base + 16384 * PAGE);
    time_touch(base, 16384, 1024, &mut awaited);
    let _ = sys::brk(base);
    let waits = sys::info().map(|i| i.zero_pool_waits).unwrap_or(0) - waits_before;
    STOP.store(true, Ordering::SeqCst);
    if let Ok(t) = other {
        let _ = t.join();
    }
    report_latency("empty_pool_awaiting_zeroer", &awaited, tsc_hz, hits);
    println!(
        "{{\"bench\":\"faultlat\",\"phase\":\"awaiting_zeroer\",\"faults_that_waited\":{waits}}}"
    );
    0
}

fn main(arg: u64) -> u64 {
    let tsc_hz = sys::info().map(|i| i.tsc_hz).unwrap_or(1);
    if arg & 3 == LATENCY_PROBE {
        return latency_probe(tsc_hz);
    }
    let os: &'static Panda = Box::leak(Box::new(Panda { tsc_hz }));
    let (cfg, worker) = Config::decode(if arg == 0 {
        // Default: a short heap run with one thread per CPU.
        Config {
            mode: bench_core::Mode::Heap,
            processes: false,
            workers: sys::cpu_count(),
            warmup_ms: 100,
            run_ms: 1000,
            chunk_mib: 16,
            burst: 0,
            gap_ms: 0,
        }
        .encode(None)
    } else {
        arg
    });
    match worker {
        Some(index) => {
            bench_core::worker(os, &cfg, index);
            0
        }
        None => {
            if bench_core::run(os, cfg) {
                0
            } else {
                1
            }
        }
    }
}
