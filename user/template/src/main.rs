//! A Panda program: prints its arguments, spawns a helper (itself, with the argument
//! "helper"), runs threads, uses a buffer, its own heap range (brk) and the allocator,
//! and prints what it did. Build and run it as docs/PROGRAMS.md says:
//!   cargo build --release
//!   PANDA/scripts/run.sh --add target/x86_64-unknown-none/release/NAME --cmdline init=NAME --args "one two"
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use panda_rt::{entry, println, sys, thread};

entry!(main);

// `arg` is the spawn's number argument (0 unless the spawner or `init.arg=N` set it);
// the words are in `panda_rt::args()`.
fn main(_arg: u64) -> u64 {
    let args: Vec<&str> = panda_rt::args().collect();
    if args.get(1) == Some(&"helper") {
        println!("NAME helper: pid {}, exiting with 7", sys::pid());
        return 7;
    }
    println!("NAME: pid {} started with argv {args:?} on {} CPUs", sys::pid(), sys::cpu_count());

    // A helper process: this same program (it is in the initrd as "NAME"), whose
    // argv will be ["NAME", "helper"].
    let helper = match sys::spawn_args("NAME", &["helper"], 0) {
        Ok(pid) => pid as u64,
        Err(e) => {
            println!("NAME: spawn failed: {e:?}");
            return 1;
        }
    };
    let status = sys::wait(helper);
    println!("NAME: helper exited with {status:?}");

    // Threads, each on its own stack (a buffer).
    let threads: Vec<_> = (1..=4u64)
        .filter_map(|i| thread::spawn(move || (1..=i * 100).sum::<u64>()).ok())
        .collect();
    let sums: Vec<u64> = threads.into_iter().filter_map(|t| t.join().ok()).collect();
    println!("NAME: threads summed {sums:?}");

    // A buffer: 1 MiB of demand-zero memory.
    if let Ok(buf) = sys::buffer_alloc(1 << 20) {
        let words = buf as *mut u64;
        // SAFETY: the buffer is ours, mapped on demand, 1 MiB long.
        let ok = (0..(1 << 17)).step_by(512).all(|i| unsafe {
            words.add(i).write_volatile(i as u64);
            words.add(i).read_volatile() == i as u64
        });
        let _ = sys::buffer_free(buf);
        println!("NAME: a 1 MiB buffer {}", if ok { "held its data" } else { "LOST DATA" });
    }

    // The program's own heap range (the allocator has its own, below it).
    let base = sys::brk(0).unwrap_or(0);
    if sys::brk(base + 16 * 4096).is_ok() {
        let p = base as *mut u64;
        // SAFETY: [base, base + 64 KiB) was just given to this program by brk.
        unsafe { p.write_volatile(42) };
        let _ = sys::brk(base);
        println!("NAME: the heap grew by 16 pages and shrank back");
    }

    let fine = status == Ok(7) && sums == [5050, 20100, 45150, 80200];
    println!("NAME: {}", if fine { "all fine" } else { "something went wrong" });
    if fine {
        0
    } else {
        1
    }
}
