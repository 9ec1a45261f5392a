//! In-kernel tests of every CPU: protection bits, traps, the clock, bring-up, IPIs and cross-CPU calls. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use panda_arch::percpu;
use panda_arch::probe::{self};
use panda_arch::trap::TrapFrame;

use crate::ktest::support::{
    async_tests, cpu_id, ensure, executor, fail, tests, wait_for, AsyncTest, Context, Outcome, Test,
};

pub(crate) const TESTS: &[Test] = tests![
    cpu_protection_bits,
    trap_breakpoint_resumes,
    trap_invalid_opcode_reported,
    trap_tss_loaded,
    clock_monotonic_and_calibrated,
    clock_reference_waits_take_their_time,
    smp_all_cpus_online,
    smp_ids_unique_and_dense,
    smp_ipi_ping_every_cpu,
    smp_cross_cpu_call,
    smp_cross_cpu_call_on_a_set,
    smp_timer_ticks_on_every_cpu
];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![smp_cross_cpu_calls_both_ways_under_load];

fn cpu_protection_bits(_: &Context<'_>) -> Outcome {
    let f = panda_arch::cpu::features();
    let (cr0, cr4, efer) = panda_arch::cpu::control_registers();
    ensure!(cr0 & (1 << 16) != 0, "CR0.WP is off");
    ensure!(
        !f.nx || efer & (1 << 11) != 0,
        "EFER.NXE is off though the CPU has NX"
    );
    ensure!(
        !f.smep || cr4 & (1 << 20) != 0,
        "CR4.SMEP is off though the CPU has SMEP"
    );
    ensure!(
        !f.smap || cr4 & (1 << 21) != 0,
        "CR4.SMAP is off though the CPU has SMAP"
    );
    Ok(())
}

static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

fn count_breakpoint(frame: &mut TrapFrame) {
    // int3 is a trap: RIP already points past it, so returning resumes execution.
    BREAKPOINTS.fetch_add(1, Ordering::SeqCst);
    let _ = frame;
}

fn trap_breakpoint_resumes(_: &Context<'_>) -> Outcome {
    panda_arch::trap::set_handler(3, count_breakpoint);
    let before = BREAKPOINTS.load(Ordering::SeqCst);
    panda_arch::cpu::breakpoint();
    panda_arch::cpu::breakpoint();
    panda_arch::trap::clear_handler(3);
    let seen = BREAKPOINTS.load(Ordering::SeqCst) - before;
    ensure!(seen == 2, "handler saw {seen} breakpoints, expected 2");
    Ok(())
}

fn trap_invalid_opcode_reported(_: &Context<'_>) -> Outcome {
    match probe::invalid_opcode() {
        Ok(()) => Err(fail(format_args!("ud2 did not trap"))),
        Err(f) => {
            ensure!(f.vector == 6, "ud2 raised vector {}", f.vector);
            Ok(())
        }
    }
}

fn trap_tss_loaded(_: &Context<'_>) -> Outcome {
    let tr = panda_arch::gdt::task_register();
    ensure!(tr == 0x28, "task register is {tr:#x}");
    Ok(())
}

fn clock_monotonic_and_calibrated(_: &Context<'_>) -> Outcome {
    let hz = panda_arch::time::tsc_hz();
    ensure!(
        panda_arch::time::PLAUSIBLE_HZ.contains(&hz),
        "TSC frequency {hz} Hz is implausible"
    );
    let a = panda_arch::time::now_ns();
    let mut spin = 0u64;
    while panda_arch::time::now_ns() == a && spin < 100_000_000 {
        spin += 1;
    }
    let b = panda_arch::time::now_ns();
    ensure!(b > a, "clock did not advance ({a} -> {b})");
    Ok(())
}

/// `time::wait_us` and `Stopwatch` (AP bring-up's time-outs) run on a reference
/// counter, not the TSC: a wait of 20 ms must take at least that long by the calibrated
/// TSC (both count real time), and the stopwatch must agree. Only lower bounds (and a
/// generous upper one): a busy host only makes waits longer.
fn clock_reference_waits_take_their_time(_: &Context<'_>) -> Outcome {
    const US: u64 = 20_000;
    let start = panda_arch::time::now_ns();
    let ended_early = panda_arch::time::wait_us(US, || false);
    let took_us = (panda_arch::time::now_ns() - start) / 1000;
    ensure!(
        !ended_early,
        "a wait for a condition that never holds reported it held"
    );
    ensure!(
        (US * 99 / 100..US * 1000).contains(&took_us),
        "wait_us({US}) took {took_us} us by the TSC ({:?})",
        panda_arch::time::wait_counter().source()
    );
    let mut clock = panda_arch::time::Stopwatch::polling_every(100);
    let start = panda_arch::time::now_ns();
    while clock.elapsed_us() < US {
        core::hint::spin_loop();
    }
    let took_us = (panda_arch::time::now_ns() - start) / 1000;
    ensure!(
        (US * 99 / 100..US * 1000).contains(&took_us),
        "a stopwatch said {US} us after {took_us} us by the TSC"
    );
    Ok(())
}

fn smp_all_cpus_online(ctx: &Context<'_>) -> Outcome {
    let online = percpu::online_count();
    ensure!(
        online == ctx.cpus_expected,
        "{online} CPUs online, the MADT enables {}",
        ctx.cpus_expected
    );
    Ok(())
}

fn smp_ids_unique_and_dense(_: &Context<'_>) -> Outcome {
    let n = percpu::online_count();
    for i in 0..n {
        let cpu = percpu::cpu(i);
        ensure!(
            cpu.online(),
            "cpu{i} of {n} is not online: indices are not dense"
        );
        ensure!(cpu.index() == i, "block {i} says index {}", cpu.index());
        for j in 0..i {
            ensure!(
                percpu::cpu(j).apic_id() != cpu.apic_id(),
                "cpu{j} and cpu{i} share apic id {}",
                cpu.apic_id()
            );
        }
    }
    ensure!(!percpu::cpu(n).online(), "cpu{n} online beyond the count");
    Ok(())
}

fn smp_ipi_ping_every_cpu(_: &Context<'_>) -> Outcome {
    let me = percpu::current_index();
    for cpu in percpu::online().filter(|c| c.index() != me) {
        let before = cpu.wake_ipis.load(Ordering::Relaxed);
        panda_platform::ipi::wake(cpu.index());
        let answered = wait_for(1000, || cpu.wake_ipis.load(Ordering::Relaxed) > before);
        ensure!(
            answered,
            "cpu{} (apic {}) did not take a wake IPI within 1 s",
            cpu.index(),
            cpu.apic_id()
        );
    }
    Ok(())
}

fn report_self(_: u64) -> u64 {
    ((percpu::current_index() as u64) << 32) | panda_arch::apic::id() as u64
}

fn smp_cross_cpu_call(_: &Context<'_>) -> Outcome {
    for cpu in percpu::online() {
        let answer = panda_platform::ipi::call_on(cpu.index(), report_self, 0)
            .map_err(|e| fail(format_args!("call on cpu{}: {e:?}", cpu.index())))?;
        let (index, apic) = ((answer >> 32) as usize, answer as u32);
        ensure!(
            index == cpu.index(),
            "call for cpu{} ran on cpu{index}",
            cpu.index()
        );
        ensure!(
            apic == cpu.apic_id(),
            "cpu{} answered apic id {apic}, expected {}",
            cpu.index(),
            cpu.apic_id()
        );
    }
    Ok(())
}

static SET_CALLS: AtomicU64 = AtomicU64::new(0);

fn count_set_call(_: u64) -> u64 {
    // Each CPU sets its own bit: the result shows exactly which CPUs ran it.
    SET_CALLS.fetch_or(1 << (percpu::current_index() % 64), Ordering::SeqCst);
    0
}

fn smp_cross_cpu_call_on_a_set(_: &Context<'_>) -> Outcome {
    let n = percpu::online_count().min(64);
    SET_CALLS.store(0, Ordering::SeqCst);
    // Every other CPU, the caller included.
    let ran = panda_platform::ipi::call_on_set(|c| c < n && c % 2 == 0, count_set_call, 0);
    let want: u64 = (0..n).filter(|c| c % 2 == 0).map(|c| 1u64 << c).sum();
    let got = SET_CALLS.load(Ordering::SeqCst);
    ensure!(got == want, "set call ran on {got:#b}, wanted {want:#b}");
    ensure!(
        ran == n.div_ceil(2),
        "call_on_set reported {ran} CPUs, expected {}",
        n.div_ceil(2)
    );
    Ok(())
}

fn smp_timer_ticks_on_every_cpu(_: &Context<'_>) -> Outcome {
    let n = percpu::online_count();
    let mut before = [0u64; percpu::MAX_CPUS];
    for (i, b) in before.iter_mut().enumerate().take(n) {
        *b = percpu::cpu(i).ticks.load(Ordering::Relaxed);
    }
    // Two ticks take 20 ms; allow 500 tick periods (5 s) because TCG vCPUs share few
    // host cores (the wait ends as soon as every CPU has ticked twice).
    let window_ms = 500 * crate::smp::TICK_US / 1000;
    let all = wait_for(window_ms, || {
        (0..n).all(|i| percpu::cpu(i).ticks.load(Ordering::Relaxed) >= before[i] + 2)
    });
    if !all {
        let late = (0..n)
            .find(|&i| percpu::cpu(i).ticks.load(Ordering::Relaxed) < before[i] + 2)
            .unwrap_or(0);
        return Err(fail(format_args!(
            "cpu{late} took fewer than 2 timer ticks in {window_ms} ms"
        )));
    }
    Ok(())
}

/// How many times `slow_call` ran (each posted call must run exactly once).
static SLOW_CALLS_RUN: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// A call that takes a while, so the IPI announcing it usually arrives while the
/// target is already running it from its own waiting loop.
fn slow_call(x: u64) -> u64 {
    SLOW_CALLS_RUN.fetch_add(1, Ordering::SeqCst);
    let until = panda_arch::time::now_ns() + 20_000;
    while panda_arch::time::now_ns() < until {
        core::hint::spin_loop();
    }
    x + 1
}

/// Every CPU calls every other at once, many times: each caller serves its own inbox
/// while it waits, and the IPI for that very call arrives meanwhile. A call must run
/// exactly once and leave nothing behind (a call run twice once left a busy mailbox,
/// and every later caller spun for ever: a hang at -smp 8 under concurrent shootdowns).
async fn smp_cross_cpu_calls_both_ways_under_load() -> Outcome {
    use core::sync::atomic::AtomicUsize;
    static RAN: AtomicUsize = AtomicUsize::new(0);
    let exec = executor()?;
    // At most 8 CPUs take part (two are enough for the race): at -smp 64 under TCG on
    // a 2-core host, 63 callers queueing for one vCPU that runs 1/32 of the time can
    // wait longer than the watchdog allows, which is the host's overcommit, not a hang.
    let n = exec.cpu_count().min(8);
    if n < 2 {
        return Ok(());
    }
    let rounds = 200;
    let before = RAN.load(Ordering::SeqCst);
    let runs_before = SLOW_CALLS_RUN.load(Ordering::SeqCst);
    let mut handles = Vec::new();
    for cpu in 0..n {
        handles.push(exec.spawn_pinned(cpu_id(cpu)?, async move {
            let mut wrong = 0u64;
            for i in 0..rounds {
                let target = (cpu + 1 + (i as usize % (n - 1))) % n;
                match panda_platform::ipi::call_on(target, slow_call, i) {
                    Ok(r) if r == i + 1 => {}
                    _ => wrong += 1,
                }
                RAN.fetch_add(1, Ordering::SeqCst);
                // Often enough that the executor comes round well within the
                // watchdog's limit even when each call waits for a descheduled vCPU.
                if i % 4 == 0 {
                    exec.yield_now().await;
                }
            }
            wrong
        }));
    }
    let mut wrong = 0;
    for h in handles {
        wrong += h.await;
    }
    ensure!(wrong == 0, "{wrong} calls returned a wrong result");
    let ran = RAN.load(Ordering::SeqCst) - before;
    let want = n * rounds as usize;
    ensure!(ran == want, "{ran} calls finished, expected {want}");
    let runs = SLOW_CALLS_RUN.load(Ordering::SeqCst) - runs_before;
    ensure!(runs == want, "{want} calls ran {runs} times");
    let busy = (0..n).find(|&c| !panda_platform::ipi::calls_idle(c));
    ensure!(
        busy.is_none(),
        "cpu{} has a call in flight or posted after every call returned",
        busy.unwrap_or(0)
    );
    Ok(())
}
