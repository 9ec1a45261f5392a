#!/usr/bin/env python3
"""Curated kernel mutations: each is one deliberate bug that the suite must catch.

Run through scripts/mutants.sh (see --help there). For each mutation: copy the tracked
tree to a scratch directory, apply the one edit, run scripts/test.sh there (--quick by
default), and print `caught NAME` if the suite failed or `SURVIVED NAME` if it passed.
A mutation whose text is no longer in the source is `STALE` (the list must follow the
code), one that no longer compiles is `UNBUILT`, and a run whose tests could not start
(exit 64 or 69) is `ERROR`; all three count as failures. Closes with `N passed, M failed` (passed = caught).

`--check-applies` runs no test: in a second it checks that every mutation's text occurs
exactly once in its file (so each applies, and to the one place meant), prints one
`STALE` or `AMBIGUOUS` line per mutation that does not, and exits 1 if any
(scripts/test.sh runs it as `mutants-apply`). A refactor that moves a mutation's code
must move the mutation with it, to the code that now carries the same logic.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

# (name, file, text to find, replacement, the test expected to catch it)
MUTATIONS = [
    ("free-before-flush", "platform/src/vm.rs",
     "batch.add(page, Some(frame))",
     "{ drop(frame); batch.add(page, None) }",
     "mm_unmapped_frames_stay_in_use_until_every_cpu_flushed"),
    ("unmap-frees-twice", "platform/src/tables.rs",
     "&mut |page, phys| on_page(page, unsafe { take(phys) }),",
     "&mut |page, phys| { drop(unsafe { take(phys) }); on_page(page, unsafe { take(phys) }) },",
     "mm_no_frame_was_freed_twice"),
    ("refill-zeroes-half", "platform/src/frame.rs",
     "    frame.zero();\n    ZERO_AHEAD_CYCLES.fetch_add(",
     "    frame.zero();\n    frame.write(2048, &[0xff; 2048]);\n    ZERO_AHEAD_CYCLES.fetch_add(",
     "user_reused_frames_are_zero_in_every_byte"),
    ("pool-hands-out-dirty-frames", "platform/src/frame.rs",
     "    Some(poison::checked_zero(ZeroedFrame(Frame(z.into_frame()))))",
     "    let mut f = Frame(z.into_frame());\n    f.write(4000, &[0xff; 96]);\n    Some(ZeroedFrame(f))",
     "user_reused_frames_are_zero_in_every_byte"),
    ("zeroing-clobbers-xmm0", "arch/src/paging.rs",
     '            "movdqu xmm0, [{s}]",',
     '            "lea {s}, [{s}]",',
     "user_sse_registers_survive_faults_and_zeroing"),
    ("fresh-fpu-state-not-restored", "arch/src/user.rs",
     "if ctx.fpu.snapshot == 0 || ctx.fpu.snapshot != loaded {",
     "if ctx.fpu.snapshot != 0 && ctx.fpu.snapshot != loaded {",
     "user_a_new_thread_starts_with_clean_sse_registers"),
    ("idle-without-recheck", "sched/src/executor.rs",
     "if self.has_work_anywhere(cpu) {",
     "if false && self.has_work_anywhere(cpu) {",
     "no_wake_up_is_lost_when_halt_waits_for_one (host)"),
    ("local-only-flush", "platform/src/vm.rs",
     "            |c| CpuId::new(c).is_some_and(|c| targets.contains(c)),",
     "            |_| false,",
     "mm_unmap_is_seen_by_another_cpu"),
    ("brk-past-heap-limit", "mm/src/region.rs",
     "if new < HEAP_BASE as u64 || new > HEAP_LIMIT as u64 {",
     "if new < HEAP_BASE as u64 {",
     "user_brk_out_of_range_fails_and_keeps_the_break"),
    ("no-stack-guard", "mm/src/region.rs",
     "|| (STACK_BASE as u64..(STACK_BASE + STACK_MAX_SIZE) as u64).contains(&addr)",
     "|| (STACK_BASE as u64 - 4096..(STACK_BASE + STACK_MAX_SIZE) as u64).contains(&addr)",
     "user_misbehaving_children_are_killed_alone"),
    ("no-fxsave", "arch/src/user.rs",
     'unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) &mut ctx.fpu.area, options(nostack)) };',
     "",
     "user_sse_state_survives_preemption"),
    ("lost-wake-while-running", "sched/src/task.rs",
     "RUNNING => WOKEN,",
     "RUNNING => return,",
     "sched host tests / in-kernel sched tests"),
    ("no-buddy-coalescing", "mm/src/buddy.rs",
     "while order < MAX_ORDER {",
     "while order < MAX_ORDER && false {",
     "buddy host tests"),
    ("wx-segments-accepted", "mm/src/elf.rs",
     "if rights.write && rights.execute {",
     "if rights.write && rights.execute && false {",
     "user_hostile_elfs_are_refused, elf host tests"),
    ("buffer-free-without-unmap", "kernel/src/aspace.rs",
     "let retiring = self.change_layout(|r| r.free_buffer(start))?;\n        self.retire(retiring).await;",
     "let retiring = self.change_layout(|r| r.free_buffer(start))?;\n        self.regions.write().retired(retiring);",
     "user_buffers_alloc_free_reuse_never_overlap / frames_back_to_baseline"),
    ("no-stealing", "sched/src/executor.rs",
     "let victim = (cpu + offset) % n;",
     "let victim = cpu; let _ = offset;",
     "sched_ten_thousand_tasks_with_stealing"),
    ("call-runs-twice", "platform/src/ipi.rs",
     "let mut callers = word.swap(0, Ordering::Acquire);",
     "let mut callers = word.load(Ordering::Acquire);",
     "smp_cross_cpu_calls_both_ways_under_load"),
    ("lock-never-favours", "platform/src/sync.rs",
     "if panda_arch::time::now_ns().saturating_sub(start) >= STARVING_AFTER_NS {",
     "if panda_arch::time::now_ns().saturating_sub(start) >= u64::MAX {",
     "locks_a_waiter_is_not_starved"),
    ("sleep-keeps-its-timer", "sched/src/timer.rs",
     "        self.disarm();\n    }\n}",
     "        let _ = &self.timers;\n    }\n}",
     "sleep host tests, user_sleeping_threads_of_ended_processes_leave_nothing"),
    ("no-thread-limit", "kernel/src/process/mod.rs",
     "if threads.len() >= MAX_THREADS {",
     "if threads.len() >= usize::MAX {",
     "user_thread_spawn_is_refused_not_fatal"),
    ("lock-order-inverted", "kernel/src/aspace.rs",
     "        let mut guard = self.vm.lock();\n        // The region may have shrunk",
     "        let _inverted = self.regions.read();\n        let mut guard = self.vm.lock();\n        // The region may have shrunk",
     "any fault (the lock-order checker panics)"),
    ("global-shootdown-lock", "platform/src/vm.rs",
     "        let in_flight = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;",
     "        static ONE: spin::Mutex<()> = spin::Mutex::new(());\n        let _one = ONE.lock();\n        let in_flight = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;",
     "mm_shootdowns_of_two_spaces_run_in_parallel"),
    ("kernel-copy-ignores-user-rights", "platform/src/vm.rs",
     "            .filter(|&(_, bits)| bits & need == need)",
     "            .filter(|&(_, bits)| bits & need == need || bits != 0)",
     "user_bad_calls_get_errors (a file read into read-only code)"),
    ("layout-lock-across-shootdown", "kernel/src/aspace.rs",
     "        let retiring = self.change_layout(|r| r.free_buffer(start))?;",
     "        let _layout = self.layout.lock();\n        let retiring = self.change_layout(|r| r.free_buffer(start))?;",
     "mm_shootdowns_of_one_space_run_in_parallel"),
    ("parent-check-dropped", "kernel/src/process/mod.rs",
     ".filter(|e| e.parent == parent && !e.orphan)",
     ".filter(|e| !e.orphan)",
     "user_waits_are_the_parents_alone"),
    ("whole-destination-unchecked", "kernel/src/aspace.rs",
     "self.fault_in(to, true).await?;",
     "self.fault_in(to.split_at(0).0, true).await?;",
     "mm_user_copies_cross_pages_and_stop_at_the_region_end (in-kernel), user_partly_bad_destinations_are_left_untouched"),
    ("no-time-slice", "kernel/src/process/thread.rs",
     "if crate::executor::should_yield() {",
     "if false && crate::executor::should_yield() {",
     "user_back_to_back_calls_let_other_threads_run"),
    ("sleeper-placed-behind", "sched/src/executor.rs",
     "v = v.max(queue.min_vruntime.saturating_sub(fair::SLEEPER_CREDIT_NS));",
     "v = v.max(queue.min_vruntime.saturating_add(100 * fair::SLEEPER_CREDIT_NS));",
     "schedbench-smp2 (test.sh), a_sleeper_beside_thousands_of_spinners_wakes_within_a_slice (host)"),
    ("threads-not-weighted", "sched/src/executor.rs",
     "let weight = u64::from(group.runnable_on(cpu).max(1));",
     "let weight = 1u64; let _ = group.runnable_on(cpu);",
     "a_process_gets_one_share_however_many_threads_it_has (host)"),
    ("user-copy-without-fault-in", "kernel/src/aspace.rs",
     "            self.resolve_fault(at, access, false).await?;\n        }\n        Ok(())",
     "            let _ = (at, access);\n            return Err(DENIED);\n        }\n        Ok(())",
     "mm_user_copies_cross_pages_and_stop_at_the_region_end (in-kernel), user_syscall_writes_into_an_untouched_heap_page"),
    ("idle-cpus-never-help", "platform/src/zero.rs",
     "            frame::pool_nearest_wanting(cpu)\n                .is_some_and(|other| frame::refill_pool_for(other, ZERO_BATCH) > 0)",
     "            false",
     "mm_idle_cpus_top_up_busy_cpus_pools"),
    ("prezero-switch-ignored", "platform/src/zero.rs",
     "    PREZERO.store(on, Ordering::SeqCst);",
     "    let _ = on;",
     "faultlat-prezero-off, bench-prezero-smoke (test.sh)"),
    ("pool-overfilled", "mm/src/zero.rs",
     "if pool.frames.len() >= limit {\n                drop(pool);",
     "if false && pool.frames.len() >= limit {\n                drop(pool);",
     "concurrent_refills_never_overfill_a_pool (host)"),
]


def why_not_applicable(root, path, find):
    """None if `find` occurs exactly once in `path` (relative to `root`), else why not."""
    try:
        with open(os.path.join(root, path)) as f:
            text = f.read()
    except OSError as e:
        return f"STALE: {path} cannot be read ({e.strerror})"
    n = text.count(find)
    if n == 0:
        return f"STALE: its text is no longer in {path}"
    if n > 1:
        return f"AMBIGUOUS: its text occurs {n} times in {path} (only the first would change)"
    return None


def check_applies(root, mutations):
    """Prints a line per mutation that does not apply; 0 if all do, 1 otherwise."""
    bad = 0
    for name, path, find, _, _ in mutations:
        why = why_not_applicable(root, path, find)
        if why:
            bad += 1
            kind, _, rest = why.partition(": ")
            print(f"{kind} {name}: {rest} (update scripts/mutants.py)")
    names = [m[0] for m in mutations]
    dups = sorted({n for n in names if names.count(n) > 1})
    for name in dups:
        bad += 1
        print(f"DUPLICATE {name}: two mutations have this name")
    if bad:
        print(f"mutants: {bad} of {len(mutations)} curated mutations do not apply")
        return 1
    print(f"mutants: all {len(mutations)} curated mutations apply (each text once in its file)")
    return 0


def tracked_files(root):
    out = subprocess.run(["git", "ls-files"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def copy_tree(root, dest):
    """Makes `dest` hold the tracked files of `root`, rewriting only the files whose
    contents differ: a rewritten file gets a fresh mtime, so cargo rebuilds exactly the
    crates whose sources changed since the last mutation (the one mutated last time is
    rewritten back). Copying with the original mtimes instead let cargo keep a crate
    built from the previous mutation, whose source then looked older than its build."""
    for rel in tracked_files(root):
        src = os.path.join(root, rel)
        dst = os.path.join(dest, rel)
        with open(src, "rb") as f:
            data = f.read()
        try:
            with open(dst, "rb") as f:
                same = f.read() == data
        except FileNotFoundError:
            same = False
        if not same:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(data)
            shutil.copymode(src, dst)


def main():
    ap = argparse.ArgumentParser(prog="scripts/mutants.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="run the whole scripts/test.sh per mutation (default: --quick)")
    ap.add_argument("--only", default="",
                    help="comma-separated mutation names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check-applies", "--check", action="store_true",
                    help="run no test: check that every mutation's text occurs exactly once "
                         "in its file; one line per one that does not, exit 1 if any")
    ap.add_argument("--out", default="", help="work directory (default build/mutants)")
    args = ap.parse_args()

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if args.list:
        for name, path, _, _, catcher in MUTATIONS:
            print(f"{name:28} {path:24} expected: {catcher}")
        return 0
    if args.check_applies:
        return check_applies(root, MUTATIONS)
    chosen = [m for m in MUTATIONS
              if not args.only or m[0] in args.only.split(",")]
    if not chosen:
        print(f"mutants: no mutation named {args.only!r} (see --list)", file=sys.stderr)
        return 64
    work = args.out or os.path.join(root, "build", "mutants")
    os.makedirs(work, exist_ok=True)
    scratch = os.path.join(work, "tree")
    # One target directory for every mutation (incremental builds), reached as the
    # scratch tree's own `target/`: scripts/lib.sh looks for binaries there.
    shared_target = os.path.join(work, "target")
    os.makedirs(shared_target, exist_ok=True)
    env = dict(os.environ)
    env.pop("CARGO_TARGET_DIR", None)
    caught = failed = 0
    start = time.time()
    for i, (name, path, find, replace, catcher) in enumerate(chosen, 1):
        copy_tree(root, scratch)
        link = os.path.join(scratch, "target")
        if not os.path.islink(link):
            if os.path.isdir(link):
                shutil.rmtree(link)
            os.symlink(shared_target, link)
        target = os.path.join(scratch, path)
        why = why_not_applicable(scratch, path, find)
        if why:
            kind, _, rest = why.partition(": ")
            print(f"{kind} {name}: {rest} (update scripts/mutants.py)", flush=True)
            failed += 1
            continue
        with open(target) as f:
            text = f.read()
        with open(target, "w") as f:
            f.write(text.replace(find, replace, 1))
        log = os.path.join(work, f"{name}.log")
        t0 = time.time()
        # A mutation that does not build proves nothing: it must compile first.
        builds = [
            ["cargo", "build", "--quiet", "--release", "--target", "x86_64-unknown-none",
             "-p", "panda-kernel", "-p", "panda-programs"],
            ["cargo", "test", "--quiet", "--no-run", "-p", "panda-abi", "-p", "panda-mm",
             "-p", "panda-sched"],
        ]
        with open(log, "w") as out:
            built = all(subprocess.run(b, cwd=scratch, env=env, stdout=out,
                                       stderr=subprocess.STDOUT).returncode == 0
                        for b in builds)
        if not built:
            print(f"UNBUILT {name}: the mutated tree does not compile (log {log})", flush=True)
            failed += 1
            continue
        cmd = ["scripts/test.sh"] + ([] if args.full else ["--quick"])
        with open(log, "a") as out:
            status = subprocess.run(cmd, cwd=scratch, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        took = time.time() - t0
        with open(log, errors="replace") as f:
            fails = [line.strip() for line in f if line.startswith("FAIL")]
        # Exit 64 (usage) or 69 (set-up) is the harness failing, not a test catching
        # the bug: it proves nothing either way.
        setup = [line for line in fails if "exit 64" in line or "exit 69" in line]
        if status != 0 and setup:
            failed += 1
            print(f"ERROR {name}: the tests could not run ({setup[0][:110]}; log {log})",
                  flush=True)
        elif status != 0:
            caught += 1
            first = fails[0][:110] if fails else f"exit {status}"
            print(f"caught {name} ({took:.0f} s; {first})", flush=True)
        else:
            failed += 1
            print(f"SURVIVED {name} ({took:.0f} s; expected to be caught by {catcher}; log {log})",
                  flush=True)
        print(f"mutants: {i}/{len(chosen)} done, {time.time() - start:.0f} s", file=sys.stderr)
    print(f"mutants: {len(chosen)} mutations in {time.time() - start:.0f} s")
    print(f"{caught} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
