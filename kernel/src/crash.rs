//! `crash=WHAT` on the command line: deliberately take a fatal path, so that
//! `scripts/test.sh` can check each one reports and stops the machine with failure.

use log::{error, warn};

/// Triggers the named failure; returns only for an unknown name (after logging it).
pub fn trigger(what: &str) {
    warn!(target: "crash", "crash={what} requested");
    match what {
        "panic" => panic!("crash=panic requested on the command line"),
        "ap-panic" => {
            // Panic on another CPU: its panic handler must stop this one too.
            let target = (0..panda_arch::percpu::online_count())
                .find(|&i| i != panda_arch::percpu::current_index());
            match target {
                Some(cpu) => {
                    let _ = panda_arch::ipi::call_on(cpu, panic_here, 0);
                    error!(target: "crash", "cpu{cpu} returned from a panic");
                }
                None => error!(target: "crash", "crash=ap-panic needs at least 2 CPUs"),
            }
        }
        "ud2" => panda_arch::cpu::invalid_opcode(),
        "pagefault" => {
            // A read of an unmapped lower-half address, not through a probe.
            let value = panda_arch::cpu::read_unchecked(0xdead_0000);
            error!(target: "crash", "read {value:#x} from an unmapped address: page tables are wrong");
        }
        "stackoverflow" => {
            let depth = recurse(0);
            error!(target: "crash", "recursed {depth} frames without faulting: no guard page");
        }
        _ => {
            error!(target: "crash", "unknown crash={what}; known: panic, ap-panic, ud2, pagefault, stackoverflow")
        }
    }
}

fn panic_here(_: u64) -> u64 {
    panic!("crash=ap-panic requested on the command line")
}

/// Recurses until the boot stack's guard page stops it. `black_box` keeps the frames.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let pad = core::hint::black_box([depth; 64]);
    if depth > 1_000_000 {
        return depth;
    }
    recurse(depth + 1) + core::hint::black_box(pad[0]) - depth
}
