//! Scheduler benchmark: CPU-bound threads pinned to one CPU, a thread on that CPU that
//! sleeps in a loop, and what each of them gets (docs/SCHEDULING.md shows the results).
//!
//! ```text
//! scripts/run.sh -smp 2 --cmdline init=schedbench --args "procs=2 threads=1023 secs=60"
//! ```
//!
//! Words (all optional):
//! - `procs=P threads=T`: P child processes, each with T threads (its main thread
//!   included; fewer if the kernel refuses more) that pin themselves to `cpu` and spin
//!   in user mode for ever (default 2 and 1023);
//! - `spinners=N`: N more spinning threads in this process, each counting its loops and
//!   reading its own CPU time at the end (default 0), for the fairness figure;
//! - `cpu=C`: the CPU everything is pinned to (default 0);
//! - `secs=S`: how long to measure (default 10); `report=R`: a progress line every R
//!   seconds (default 10);
//! - `warmup=W`: seconds to let the spinners start before measuring (default 5);
//! - `sleep-ms=M`: the sleeper's period (default 10);
//! - `check`: exit 1 unless the sleeper woke at least a quarter of the times it asked
//!   to and every spinner ran (loose bounds that hold on a busy host; the figures are
//!   for reading, not asserting).
//!
//! It prints the sleeper's oversleep (how much later than asked each sleep returned:
//! median, p99, max), the CPU time each child process got, and for `spinners` the
//! spread of their CPU times. The children are killed at the end.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use panda_rt::{entry, println, sys, thread};

entry!(main);

/// Role bit in the spawn argument: a spinner child. Bits 8-23: threads, 24-39: CPU.
const CHILD: u64 = 1;
const MAX_SPINNERS: usize = 1024;

/// Per in-process spinner: loops done (one cache line each), and CPU time at the end.
static LOOPS: [AtomicU64; MAX_SPINNERS * 8] = [const { AtomicU64::new(0) }; MAX_SPINNERS * 8];
static CPU_NS: [AtomicU64; MAX_SPINNERS] = [const { AtomicU64::new(0) }; MAX_SPINNERS];
static STOP: AtomicBool = AtomicBool::new(false);

struct Config {
    procs: u64,
    threads: u64,
    spinners: usize,
    cpu: u64,
    secs: u64,
    report: u64,
    warmup: u64,
    sleep_ms: u64,
    check: bool,
}

fn config() -> Config {
    let mut c = Config {
        procs: 2,
        threads: 1023,
        spinners: 0,
        cpu: 0,
        secs: 10,
        report: 10,
        warmup: 5,
        sleep_ms: 10,
        check: false,
    };
    for word in panda_rt::args().skip(1) {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let n = value.parse::<u64>().ok();
        match (key, n) {
            ("procs", Some(n)) => c.procs = n,
            ("threads", Some(n)) => c.threads = n.clamp(1, 1024),
            ("spinners", Some(n)) => c.spinners = (n as usize).min(MAX_SPINNERS),
            ("cpu", Some(n)) => c.cpu = n,
            ("secs", Some(n)) => c.secs = n.max(1),
            ("report", Some(n)) => c.report = n.max(1),
            ("warmup", Some(n)) => c.warmup = n,
            ("sleep-ms", Some(n)) => c.sleep_ms = n.max(1),
            ("check", _) => c.check = true,
            _ => {
                println!("schedbench: unknown word {word:?} (see the top of schedbench.rs)");
                sys::exit(64);
            }
        }
    }
    c
}

fn spin_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// A spinner child: pins itself, starts threads that pin themselves, spins.
fn child(arg: u64) -> u64 {
    let threads = (arg >> 8) & 0xffff;
    let cpu = (arg >> 24) as usize;
    let _ = sys::set_affinity(cpu);
    for _ in 1..threads {
        let started = thread::spawn_with_stack(16 * 1024, move || {
            let _ = sys::set_affinity(cpu);
            spin_forever()
        });
        match started {
            // Never joined: the parent kills the whole process.
            Ok(_) => {}
            Err(_) => break,
        }
    }
    spin_forever()
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * p).div_ceil(100)]
}

fn sleeper_report(label: &str, samples: &mut [u64], asked: u64) {
    samples.sort_unstable();
    println!(
        "schedbench: {label} sleeper: {} wakes of {} ms, oversleep median {} us, p99 {} us, max {} us",
        samples.len(),
        asked,
        percentile(samples, 50) / 1000,
        percentile(samples, 99) / 1000,
        samples.last().copied().unwrap_or(0) / 1000
    );
}

fn main(arg: u64) -> u64 {
    if arg & CHILD != 0 {
        return child(arg);
    }
    let c = config();
    let cpus = sys::cpu_count() as u64;
    if c.cpu >= cpus {
        println!("schedbench: cpu={} but only {} CPUs", c.cpu, cpus);
        return 64;
    }
    println!(
        "schedbench: {} CPUs; on cpu {}: {} processes x {} spinning threads, {} spinners here, a {} ms sleeper; {} s (slice: 20 ms / runnable, at least 4 ms)",
        cpus, c.cpu, c.procs, c.threads, c.spinners, c.sleep_ms, c.secs
    );
    let mut children = Vec::new();
    for _ in 0..c.procs {
        match sys::spawn("schedbench", CHILD | (c.threads << 8) | (c.cpu << 24)) {
            Ok(pid) => children.push(pid as u64),
            Err(e) => println!("schedbench: spawning a child failed: {e:?}"),
        }
    }
    let mut spinners = Vec::new();
    for i in 0..c.spinners {
        let cpu = c.cpu as usize;
        match thread::spawn_with_stack(16 * 1024, move || {
            let _ = sys::set_affinity(cpu);
            let mine = &LOOPS[i * 8];
            while !STOP.load(Ordering::Relaxed) {
                mine.fetch_add(1, Ordering::Relaxed);
            }
            CPU_NS[i].store(sys::thread_cpu_time_ns(), Ordering::SeqCst);
            0
        }) {
            Ok(t) => spinners.push(t),
            Err(e) => println!("schedbench: spinner {i} not started: {e:?}"),
        }
    }
    // Let the children start their threads (each spawn is a system call of a thread
    // that gets only its share of the CPU), then measure from here.
    sys::sleep_ns(c.warmup * 1_000_000_000);
    let at_start: Vec<u64> = children
        .iter()
        .map(|&pid| sys::process_cpu_time_ns(pid).unwrap_or(0) as u64)
        .collect();
    // The sleeper, pinned to the same CPU.
    let period_ns = c.sleep_ms * 1_000_000;
    let (cpu, secs, report) = (c.cpu as usize, c.secs, c.report);
    let sleeper = thread::spawn(move || {
        let _ = sys::set_affinity(cpu);
        let mut all: Vec<u64> =
            Vec::with_capacity((secs * 1000 / (period_ns / 1_000_000)) as usize + 16);
        let mut window: Vec<u64> = Vec::new();
        let start = sys::time_ns();
        let mut next_report = start + report * 1_000_000_000;
        while sys::time_ns() - start < secs * 1_000_000_000 {
            let t0 = sys::time_ns();
            sys::sleep_ns(period_ns);
            let late = (sys::time_ns() - t0).saturating_sub(period_ns);
            all.push(late);
            window.push(late);
            if sys::time_ns() >= next_report {
                let label = alloc::format!("t={}s", (sys::time_ns() - start) / 1_000_000_000);
                sleeper_report(&label, &mut window, period_ns / 1_000_000);
                window.clear();
                next_report += report * 1_000_000_000;
            }
        }
        sleeper_report("whole run:", &mut all, period_ns / 1_000_000);
        all.len() as u64
    });
    let wakes = match sleeper {
        Ok(t) => t.join().unwrap_or(0),
        Err(e) => {
            println!("schedbench: sleeper not started: {e:?}");
            0
        }
    };
    let mut ok = wakes >= c.secs * 1000 / c.sleep_ms / 4;
    // What each child process got.
    let times: Vec<u64> = children
        .iter()
        .zip(&at_start)
        .map(|(&pid, &t0)| (sys::process_cpu_time_ns(pid).unwrap_or(0) as u64).saturating_sub(t0))
        .collect();
    for (pid, t) in children.iter().zip(&times) {
        println!(
            "schedbench: child pid {pid}: {} ms of CPU while measured",
            t / 1_000_000
        );
        ok &= *t > 0;
    }
    if let (Some(min), Some(max)) = (times.iter().min(), times.iter().max()) {
        if *max > 0 {
            println!(
                "schedbench: child processes' CPU time spread {}% (max-min)/max",
                (max - min) * 100 / max
            );
        }
    }
    for &pid in &children {
        let t0 = sys::time_ns();
        let _ = sys::kill(pid);
        let _ = sys::wait(pid);
        println!(
            "schedbench: child pid {pid} killed and gone in {} ms",
            (sys::time_ns() - t0) / 1_000_000
        );
    }
    STOP.store(true, Ordering::SeqCst);
    let n = spinners.len();
    for t in spinners {
        let _ = t.join();
    }
    if n > 0 {
        let cpu: Vec<u64> = (0..n).map(|i| CPU_NS[i].load(Ordering::SeqCst)).collect();
        let loops: Vec<u64> = (0..n)
            .map(|i| LOOPS[i * 8].load(Ordering::SeqCst))
            .collect();
        let min = *cpu.iter().min().unwrap_or(&0);
        let max = *cpu.iter().max().unwrap_or(&0);
        let mean = cpu.iter().sum::<u64>() / n as u64;
        println!(
            "schedbench: {n} spinners' CPU time: min {} ms, mean {} ms, max {} ms, spread {}% of the mean; loops min {} max {}",
            min / 1_000_000,
            mean / 1_000_000,
            max / 1_000_000,
            (max - min) * 100 / mean.max(1),
            loops.iter().min().unwrap_or(&0),
            loops.iter().max().unwrap_or(&0)
        );
        ok &= min > 0;
    }
    println!(
        "schedbench: {}",
        if ok {
            "done"
        } else {
            "FAILED the loose checks"
        }
    );
    if c.check && !ok {
        1
    } else {
        0
    }
}
