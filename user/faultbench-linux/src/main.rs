//! faultbench for Linux: `bench_core` (the same source Panda's faultbench uses) over
//! Linux system calls — `brk` for the heap mode, anonymous `mmap`/`munmap` for the
//! buffer mode, threads with 16 MiB stacks for the stack mode, `sched_setaffinity` for
//! pinning — built static for `x86_64-unknown-linux-musl` and run as the baseline by
//! `scripts/bench.sh --baseline linux` in a Debian kernel with a busybox initramfs.
//!
//! Usage: `faultbench-linux CONFIG` with `CONFIG` = `Config::encode` (what Panda's
//! faultbench gets as `init.arg`); worker processes get `--worker CONFIG`.

extern crate alloc;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command};
use std::sync::Mutex;

#[path = "../../programs/src/bench_core.rs"]
mod bench_core;

use bench_core::{Config, Os};
use panda_abi::syscall::SystemInfo;

const SYS_WRITE: usize = 1;
const SYS_MMAP: usize = 9;
const SYS_MUNMAP: usize = 11;
const SYS_BRK: usize = 12;
const SYS_GETPID: usize = 39;
const SYS_SCHED_SETAFFINITY: usize = 203;

fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: a raw Linux system call; the kernel clobbers rcx and r11 only. Callers
    // pass arguments valid for the call (see each use).
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

struct Linux {
    tsc_hz: u64,
    cpus: usize,
    threads: Mutex<HashMap<u64, std::thread::JoinHandle<()>>>,
    children: Mutex<HashMap<u64, Child>>,
    next: std::sync::atomic::AtomicU64,
}

impl Linux {
    fn id(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Os for Linux {
    fn name(&self) -> &'static str {
        "linux"
    }
    fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }
    fn cpu_count(&self) -> usize {
        self.cpus
    }
    fn pin(&self, cpu: usize) -> bool {
        let mut mask = [0u64; 16];
        mask[(cpu / 64) % 16] = 1 << (cpu % 64);
        // sched_setaffinity(0 = this thread, size, mask): the mask outlives the call.
        syscall6(
            SYS_SCHED_SETAFFINITY,
            [0, 128, mask.as_ptr() as usize, 0, 0, 0],
        ) == 0
    }
    fn brk(&self, new: usize) -> Option<usize> {
        // brk returns the (possibly unchanged) break; a refusal leaves it where it was.
        let got = syscall6(SYS_BRK, [new, 0, 0, 0, 0, 0]) as usize;
        (new == 0 || got == new).then_some(got)
    }
    fn map(&self, len: usize) -> Option<usize> {
        const PROT_RW: usize = 1 | 2;
        const MAP_PRIVATE_ANON: usize = 0x02 | 0x20;
        let addr = syscall6(SYS_MMAP, [0, len, PROT_RW, MAP_PRIVATE_ANON, usize::MAX, 0]);
        (addr > 0).then_some(addr as usize)
    }
    fn unmap(&self, addr: usize, len: usize) {
        syscall6(SYS_MUNMAP, [addr, len, 0, 0, 0, 0]);
    }
    fn spawn_thread(&self, stack: usize, f: Box<dyn FnOnce() + Send>) -> Option<u64> {
        let handle = std::thread::Builder::new()
            .stack_size(stack)
            .spawn(f)
            .ok()?;
        let id = self.id();
        self.threads.lock().ok()?.insert(id, handle);
        Some(id)
    }
    fn join_thread(&self, handle: u64) -> bool {
        let h = self.threads.lock().ok().and_then(|mut t| t.remove(&handle));
        h.is_some_and(|h| h.join().is_ok())
    }
    fn spawn_worker(&self, cfg: &Config, index: usize) -> Option<u64> {
        let exe = std::env::args().next()?;
        let child = Command::new(exe)
            .arg("--worker")
            .arg(cfg.encode(Some(index)).to_string())
            .spawn()
            .ok()?;
        let id = self.id();
        self.children.lock().ok()?.insert(id, child);
        Some(id)
    }
    fn wait_worker(&self, handle: u64) -> bool {
        let c = self
            .children
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&handle));
        c.is_some_and(|mut c| c.wait().is_ok_and(|s| s.success()))
    }
    fn print(&self, line: &str) {
        // One write(2) per line: the tty keeps one write call together, so lines of
        // workers printing at once do not mix (std's line buffering may split a long
        // line into several writes).
        let _ = std::io::stdout().lock().flush();
        let text = format!("{line}\n");
        let mut at = 0;
        while at < text.len() {
            let rest = &text.as_bytes()[at..];
            let n = syscall6(SYS_WRITE, [1, rest.as_ptr() as usize, rest.len(), 0, 0, 0]);
            if n <= 0 {
                break;
            }
            at += n as usize;
        }
    }
    fn counters(&self) -> Option<SystemInfo> {
        None
    }
    fn sleep_ms(&self, ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    fn null_call(&self) {
        // getpid(2) straight to the kernel (musl does not cache it, and this bypasses
        // the C library anyway).
        std::hint::black_box(syscall6(SYS_GETPID, [0; 6]));
    }
}

/// TSC ticks per second, against the monotonic clock over 100 ms.
fn calibrate_tsc() -> u64 {
    let t0 = std::time::Instant::now();
    let c0 = bench_core::rdtsc();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let c1 = bench_core::rdtsc();
    let ns = t0.elapsed().as_nanos().max(1) as u64;
    ((c1 - c0) as u128 * 1_000_000_000 / ns as u128) as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (role_worker, value) = match args.as_slice() {
        [_, flag, v] if flag == "--worker" => (true, v),
        [_, v] => (false, v),
        _ => {
            eprintln!("usage: faultbench-linux CONFIG (see bench_core::Config::encode)");
            std::process::exit(64);
        }
    };
    let Ok(encoded) = value.parse::<u64>() else {
        eprintln!("faultbench-linux: CONFIG must be a number, not {value:?}");
        std::process::exit(64);
    };
    let os: &'static Linux = Box::leak(Box::new(Linux {
        tsc_hz: calibrate_tsc(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads: Mutex::new(HashMap::new()),
        children: Mutex::new(HashMap::new()),
        next: std::sync::atomic::AtomicU64::new(1),
    }));
    let (cfg, worker) = Config::decode(encoded);
    match (role_worker, worker) {
        (true, Some(index)) => bench_core::worker(os, &cfg, index),
        _ => {
            if !bench_core::run(os, cfg) {
                std::process::exit(1);
            }
        }
    }
}
