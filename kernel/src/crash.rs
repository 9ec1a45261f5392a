//! `crash=WHAT` on the command line: deliberately take a fatal path, so that
//! `scripts/test.sh` can check each one reports and stops the machine with failure.

use core::sync::atomic::{AtomicBool, Ordering};

use log::{error, warn};

/// Triggers the named failure; returns only for an unknown name (after logging it).
pub async fn trigger(what: &str) {
    warn!(target: "crash", "crash={what} requested");
    match what {
        "panic" => panic!("crash=panic requested on the command line"),
        "ap-panic" => {
            // Panic on another CPU: its panic handler must stop this one too.
            let target = (0..panda_arch::percpu::online_count())
                .find(|&i| i != panda_arch::percpu::current_index());
            match target {
                Some(cpu) => {
                    let _ = panda_platform::ipi::call_on(cpu, panic_here, 0);
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
        "deadlock" => deadlock().await,
        "busytask" => busy_task().await,
        "lockheld" => lock_held().await,
        _ => {
            error!(target: "crash", "unknown crash={what}; known: panic, ap-panic, ud2, pagefault, stackoverflow, deadlock, busytask, lockheld");
            // A run that asked for a crash and got none must not look like a success.
            panda_arch::power::exit(false)
        }
    }
}

/// A lock whose holder never lets go (`crash=lockheld`).
static HELD: panda_platform::sync::Mutex<()> =
    panda_platform::sync::Mutex::new(&crate::locks::CRASH_HELD, ());

/// Another CPU takes `HELD` and keeps it for ever; this one then waits for it. The
/// watchdog's report must name the lock, the holder's CPU and the line that took it.
async fn lock_held() -> ! {
    let me = panda_arch::percpu::current_index();
    let Some(holder) = (0..panda_arch::percpu::online_count())
        .rev()
        .find(|&i| i != me)
    else {
        error!(target: "crash", "crash=lockheld needs at least 2 CPUs");
        panda_arch::power::exit(false)
    };
    let exec = crate::executor::get().expect("crash= runs as an executor task");
    drop(exec.spawn_pinned(holder, async move {
        let _held = HELD.lock();
        warn!(target: "crash", "cpu{holder} holds crash::HELD for ever");
        loop {
            core::hint::spin_loop();
        }
    }));
    while !HELD.is_locked() {
        exec.sleep(10_000_000).await;
    }
    let _never = HELD.lock();
    error!(target: "crash", "took a lock whose holder never lets go");
    panda_arch::power::exit(false)
}

/// A task that never yields, interrupts on, on the last CPU (the only one at -smp 1):
/// its CPU still ticks, but its executor never comes round; the watchdog's executor
/// check must report it.
async fn busy_task() -> ! {
    let me = panda_arch::percpu::current_index();
    let target = (0..panda_arch::percpu::online_count())
        .rev()
        .find(|&i| i != me)
        .unwrap_or(me);
    let exec = crate::executor::get().expect("crash= runs as an executor task");
    warn!(target: "crash", "cpu{target} runs a task that never yields");
    drop(exec.spawn_pinned(target, async {
        loop {
            core::hint::spin_loop();
        }
    }));
    loop {
        exec.sleep(100_000_000).await;
    }
}

/// Set by nobody: what the deadlocked CPU waits for.
static NEVER_SET: AtomicBool = AtomicBool::new(false);

/// One CPU (the last AP, or the only CPU) disables interrupts and waits for a flag
/// nobody sets; the others go on. With another CPU running, the watchdog's tick check
/// catches it; alone, the wait (the lock waiters' loop, `ipi::spin_until`) calls the
/// watchdog's `stuck_after` after twice the limit. Either way every CPU reports and the run fails.
async fn deadlock() -> ! {
    let me = panda_arch::percpu::current_index();
    let target = (0..panda_arch::percpu::online_count())
        .rev()
        .find(|&i| i != me);
    let exec = crate::executor::get().expect("crash= runs as an executor task");
    match target {
        Some(cpu) => {
            // Detached: it never finishes.
            drop(exec.spawn_pinned(cpu, async { spin_with_interrupts_off() }));
            // This CPU carries on with ordinary work.
            loop {
                exec.sleep(100_000_000).await;
            }
        }
        None => spin_with_interrupts_off(),
    }
}

fn spin_with_interrupts_off() -> ! {
    let guard = panda_arch::percpu::CpuGuard::new();
    warn!(target: "crash", "cpu{} spins with interrupts off, waiting for a flag nobody sets", guard.index());
    panda_platform::ipi::spin_until("crash=deadlock waits for a flag nobody sets", || {
        NEVER_SET.load(Ordering::Acquire).then_some(())
    });
    error!(target: "crash", "the flag nobody sets was set");
    panda_arch::power::exit(false)
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
