//! In-kernel tests of frames and zeroing: every zeroing method, the zeroed pools, the frame count, exhaustion (and `mm_measure`, a measurement). They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use core::sync::atomic::{AtomicU64, Ordering};

use panda_arch::percpu;
use panda_mm::CpuId;
use panda_platform::frame;

use crate::ktest::support::{
    async_tests, cpu_id, empty_pool, ensure, executor, fail, invlpg_here, keep_busy, tests,
    AsyncTest, Outcome, Test,
};

pub(crate) const TESTS: &[Test] = tests![];

pub(crate) const MEASUREMENTS: &[AsyncTest] = async_tests![mm_measure];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![
    mm_zero_pools_fill_when_idle,
    mm_idle_cpus_top_up_busy_cpus_pools,
    mm_every_zero_method_clears_every_byte,
    mm_frames_return_to_baseline,
    mm_exhaustion_fails_cleanly
];

/// Each way of zeroing a frame (the boot picks the fastest) clears all 4096 bytes of a
/// frame full of ones, and nothing past it.
async fn mm_every_zero_method_clears_every_byte() -> Outcome {
    let mut pair =
        frame::alloc_run(1).ok_or_else(|| fail(format_args!("no two contiguous frames")))?;
    let ones = [0xffu8; 8192];
    for method in panda_arch::paging::ZeroMethod::ALL {
        pair.write(0, &ones);
        pair.zero_frame_with(0, method);
        let mut word = [0u8; 8];
        for i in 0..512 {
            pair.read(i * 8, &mut word);
            let v = u64::from_le_bytes(word);
            ensure!(
                v == 0,
                "{}: word {i} is {v:#x} after zeroing",
                method.name()
            );
        }
        pair.read(4096, &mut word);
        ensure!(word == [0xff; 8], "{}: wrote past the frame", method.name());
    }
    Ok(())
}

async fn mm_zero_pools_fill_when_idle() -> Outcome {
    let exec = executor()?;
    let deadline = panda_arch::time::now_ns() + 10_000_000_000;
    let want = frame::pool_capacity().min(64);
    let available = |c: CpuId| frame::pool_stats(c).map_or(0, |s| s.available);
    let full = |c: CpuId| available(c) >= want;
    while !CpuId::all(exec.cpu_count()).all(full) && panda_arch::time::now_ns() < deadline {
        exec.sleep(5_000_000).await;
    }
    for cpu in CpuId::all(exec.cpu_count()) {
        ensure!(
            full(cpu),
            "cpu{cpu}'s pool has {} zeroed frames after 10 s of idle",
            available(cpu)
        );
    }
    // The frames really are zero: dirty a frame, free it, and check every frame the
    // pools hand out reads zero in full.
    let cpu = panda_platform::cpu::current();
    for _ in 0..8 {
        let mut f = frame::try_take_zeroed(cpu)
            .ok_or_else(|| fail(format_args!("pool emptied under the test")))?
            .into_frame();
        let mut word = [0u8; 8];
        for off in (0..4096).step_by(8) {
            f.read(off, &mut word);
            ensure!(
                word == [0; 8],
                "zeroed frame {:#x} has {:#x} at +{off}",
                f.phys(),
                u64::from_le_bytes(word)
            );
        }
        // Dirty it before it goes back (dropped), so a pool that skips zeroing would
        // be caught.
        f.write(100, &[0x5a]);
    }
    Ok(())
}

/// A CPU that never idles never fills its own pool: the idle CPUs must. The next CPU
/// is kept busy by a task that yields until told to stop, its pool is emptied, and
/// while it stays busy its pool must fill again with zeroed frames, from other CPUs.
async fn mm_idle_cpus_top_up_busy_cpus_pools() -> Outcome {
    use core::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    static SPINS: AtomicU64 = AtomicU64::new(0);
    let exec = executor()?;
    let n = exec.cpu_count();
    if n < 2 {
        return Ok(()); // no other CPU to help
    }
    let busy_cpu = cpu_id((percpu::current_index() + 1) % n)?;
    STOP.store(false, Ordering::SeqCst);
    SPINS.store(0, Ordering::SeqCst);
    let busy = keep_busy(busy_cpu, &STOP, &SPINS)?;
    // With more vCPUs than host cores a vCPU can be off the host for a long time:
    // the deadlines below are generous, and the test waits for progress rather than
    // expecting it within a fixed window.
    let deadline = panda_arch::time::now_ns() + 5_000_000_000;
    while SPINS.load(Ordering::Relaxed) == 0 && panda_arch::time::now_ns() < deadline {
        exec.sleep(1_000_000).await;
    }
    empty_pool(busy_cpu);
    let stats = |c: CpuId| frame::pool_stats(c).unwrap_or_default();
    let (spins, from_others) = (SPINS.load(Ordering::Relaxed), stats(busy_cpu).from_others);
    let want = frame::pool_capacity().min(32);
    let deadline = panda_arch::time::now_ns() + 10_000_000_000;
    while stats(busy_cpu).available < want && panda_arch::time::now_ns() < deadline {
        exec.sleep(5_000_000).await;
    }
    let (available, helped) = (
        stats(busy_cpu).available,
        stats(busy_cpu).from_others - from_others,
    );
    // The busy task still runs after the pool filled: the CPU was kept from idling
    // (its own idle loop did not do the filling; `helped` counts frames from others).
    let deadline = panda_arch::time::now_ns() + 5_000_000_000;
    while SPINS.load(Ordering::Relaxed) <= spins && panda_arch::time::now_ns() < deadline {
        exec.sleep(1_000_000).await;
    }
    let still_busy = SPINS.load(Ordering::Relaxed) > spins;
    // The frames other CPUs put there read zero.
    let zeroed = frame::try_take_zeroed(busy_cpu)
        .map(|z| z.into_frame().is_zero())
        .unwrap_or(true);
    STOP.store(true, Ordering::SeqCst);
    busy.await;
    ensure!(spins > 0 && still_busy, "cpu{busy_cpu} was not kept busy");
    ensure!(
        available >= want && helped >= want as u64,
        "cpu{busy_cpu}, busy, has {available} zeroed frames ({helped} from other CPUs) after 10 s; want {want}"
    );
    ensure!(
        zeroed,
        "a frame another CPU zeroed for cpu{busy_cpu} is not zero"
    );
    Ok(())
}

async fn mm_frames_return_to_baseline() -> Outcome {
    let exec = executor()?;
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    // Allocate on every CPU, free on the next one (cross-CPU frees). Half of what is
    // free, spread over the CPUs, at most 2000 each.
    let n = exec.cpu_count();
    let per_cpu = (frame::total_free() as usize / 2 / n).min(2000);
    let mut handles = alloc::vec::Vec::new();
    for cpu in CpuId::all(n) {
        handles.push(exec.spawn_pinned(cpu, async move {
            let mut taken = alloc::vec::Vec::new();
            for _ in 0..per_cpu {
                match frame::alloc() {
                    Some(f) => taken.push(f),
                    None => break,
                }
            }
            taken
        }));
    }
    let mut lists = alloc::vec::Vec::new();
    for h in handles {
        lists.push(h.await);
    }
    // Check before freeing, but free before reporting, so a failure leaks nothing.
    let mut all = alloc::collections::BTreeSet::new();
    let mut shared = None;
    for f in lists.iter().flatten() {
        if !all.insert(f.phys()) {
            shared = Some(f.phys());
        }
    }
    let total = all.len();
    for (cpu, list) in lists.into_iter().enumerate() {
        // Dropped (freed) on the next CPU.
        exec.spawn_pinned(cpu_id((cpu + 1) % n)?, async move { drop(list) })
            .await;
    }
    ensure!(
        shared.is_none(),
        "frame {:#x} handed out twice",
        shared.unwrap_or(0)
    );
    ensure!(
        total == per_cpu * n,
        "only {total} of {} frames allocated",
        per_cpu * n
    );
    let now = crate::memory::frames_not_in_use();
    ensure!(
        now == baseline,
        "free+pooled frames {now}, baseline {baseline}"
    );
    Ok(())
}

async fn mm_exhaustion_fails_cleanly() -> Outcome {
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let cpu = percpu::current_index();
    let mut taken = alloc::vec::Vec::new();
    while let Some(f) = frame::alloc() {
        taken.push(f);
    }
    let held = taken.len();
    ensure!(held > 1000, "only {held} frames before exhaustion");
    drop(taken);
    let now = crate::memory::frames_not_in_use();
    ensure!(
        now == baseline,
        "after exhaustion: {now} frames, baseline {baseline}"
    );
    crate::console!("   (exhausted after {held} frames on cpu{cpu}; all returned)");
    Ok(())
}

/// Not a pass/fail test: prints medians of the frame paths (docs/MEMORY.md quotes them).
async fn mm_measure() -> Outcome {
    let cpu = percpu::current_index();
    let tsc = panda_arch::cpu::rdtsc;
    let median = |f: &mut dyn FnMut() -> u64| {
        let mut samples = [0u64; 201];
        for s in samples.iter_mut() {
            *s = f();
        }
        samples.sort_unstable();
        panda_arch::time::ticks_to_ns(samples[100])
    };
    let cached = median(&mut || {
        let t = tsc();
        drop(frame::alloc());
        tsc() - t
    });
    let global = median(&mut || {
        let t = tsc();
        drop(frame::alloc_run(0));
        tsc() - t
    });
    let mut f = frame::alloc().ok_or_else(|| fail(format_args!("no frame")))?;
    let zero = median(&mut || {
        let t = tsc();
        f.zero();
        tsc() - t
    });
    drop(f);
    crate::console!(
        "   (median of 201, guest TSC: alloc+free via per-CPU cache {cached} ns, via global buddy {global} ns, zero one 4 KiB frame {zero} ns)"
    );
    // Shootdown round trip: a cross-CPU call that invlpgs one page, to 1 and to 7 CPUs
    // in turn (as AddressSpace::shoot_down does), and a CR3 reload (a full flush of
    // non-global entries; without PCID there is no no-flush switch to compare).
    let n = percpu::online_count();
    let page = panda_abi::HEAP_BASE as u64;
    for targets in [1usize, 7] {
        if n > targets {
            let chosen = |c: usize| c != cpu && c <= targets;
            let ns = median(&mut || {
                let t = tsc();
                panda_platform::ipi::call_on_set(chosen, invlpg_here, page);
                tsc() - t
            });
            crate::console!("   (shootdown round trip to {targets} CPU(s), in parallel: {ns} ns)");
        }
    }
    let cr3 = median(&mut || {
        let t = tsc();
        panda_arch::paging::reload_cr3();
        tsc() - t
    });
    crate::console!(
        "   (CR3 switch with flush: {cr3} ns; PCID {})",
        if panda_arch::cpu::features().pcid {
            "present"
        } else {
            "absent: every switch flushes"
        }
    );
    Ok(())
}
