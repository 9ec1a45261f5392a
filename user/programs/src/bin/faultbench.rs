//! Demand-zero fault benchmark (see `bench_core.rs`), Panda side. Run as init by
//! `scripts/bench.sh` with `init.arg` = `Config::encode`; worker processes are this
//! program again, spawned with the worker role bit set.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use panda_rt::{entry, println, sys, thread};

#[allow(dead_code)] // parts only the Linux side uses
#[path = "../bench_core.rs"]
mod bench_core;

use bench_core::{Config, Counters, Os};

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
    fn counters(&self) -> Option<Counters> {
        let i = sys::info().ok()?;
        Some(Counters {
            faults: i.faults,
            zero_pool_hits: i.zero_pool_hits,
            zero_pool_waits: i.zero_pool_waits,
            zeroed_inline: i.zeroed_inline,
            shootdowns: i.shootdowns,
            shootdown_ipis: i.shootdown_ipis,
        })
    }
}

fn main(arg: u64) -> u64 {
    let tsc_hz = sys::info().map(|i| i.tsc_hz).unwrap_or(1);
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
