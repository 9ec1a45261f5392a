//! The first process: prints a short system summary, then touches every region once
//! (ELF data, heap through brk and the allocator, a buffer, the stack, a file read
//! into a buffer, a thread on every CPU) and exits 0 if all of it behaved.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use panda_rt::abi::{self, syscall::SystemInfo};
use panda_rt::{entry, println, sys, thread};

entry!(main);

static mut COUNTER: u64 = 7;

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

fn summary(info: &SystemInfo) {
    println!(
        "panda init (pid {}): {} CPUs, {} MiB of memory, {} MiB free, TSC {} MHz",
        sys::pid(),
        info.cpus,
        mib(info.memory_total),
        mib(info.memory_free),
        info.tsc_hz / 1_000_000
    );
    for (name, r) in abi::USER_REGIONS {
        println!(
            "  {name:<6} {:#014x}..{:#014x} ({} MiB)",
            r.start,
            r.end,
            r.len() >> 20
        );
    }
}

fn demo() -> Result<(), &'static str> {
    // ELF .data: a static with an initial value, written.
    // SAFETY: single-threaded at this point.
    unsafe {
        COUNTER += 1;
        if COUNTER != 8 {
            return Err("ELF data segment");
        }
    }
    // Heap: the allocator grows the break; demand-zero pages.
    let v: Vec<u64> = (0..100_000).collect();
    if v.iter().sum::<u64>() != 99_999 * 100_000 / 2 {
        return Err("heap");
    }
    // Buffer: allocate, write, read the README-like file into it, log it, free.
    let buf = sys::buffer_alloc(64 * 1024).map_err(|_| "buffer alloc")?;
    let n = sys::read_file("hello.txt", buf, 64 * 1024).unwrap_or(0);
    if n > 0 {
        sys::buffer_log(buf, n).map_err(|_| "buffer log")?;
    }
    sys::buffer_free(buf).map_err(|_| "buffer free")?;
    // Stack: 1 MiB deep, page by page.
    let mut probe = [0u8; 4096];
    fn deep(depth: usize, probe: &mut [u8; 4096]) -> u64 {
        let mut page = [0u8; 4096];
        page[0] = depth as u8;
        probe[depth % 4096] = page[0];
        if depth == 0 {
            return page[0] as u64;
        }
        deep(depth - 1, probe) + core::hint::black_box(page)[0] as u64
    }
    let _ = deep(256, &mut probe);
    // A thread per CPU, each pinned and reporting where it ran.
    let cpus = sys::cpu_count();
    let threads: Vec<_> = (0..cpus)
        .map(|cpu| {
            thread::spawn(move || {
                if sys::set_affinity(cpu).is_err() {
                    return u64::MAX;
                }
                sys::current_cpu() as u64
            })
        })
        .collect();
    for (cpu, t) in threads.into_iter().enumerate() {
        let ran_on = t.map_err(|_| "thread spawn")?.join().map_err(|_| "join")?;
        if ran_on != cpu as u64 {
            return Err("a pinned thread ran on the wrong CPU");
        }
    }
    let threads = if cpus == 1 { "thread" } else { "threads" };
    println!("  demo: ELF data, heap, buffer, file, stack and {cpus} pinned {threads}: all fine");
    Ok(())
}

fn main(_arg: u64) -> u64 {
    match sys::info() {
        Ok(info) => summary(&info),
        Err(e) => println!("panda init: no system info ({e:?})"),
    }
    match demo() {
        Ok(()) => 0,
        Err(what) => {
            println!("init: demo failed: {what}");
            1
        }
    }
}
