//! Host tests of the fair scheduler on a virtual clock: one CPU (the test's thread),
//! time that moves only when a task "runs" (a spinner advances the clock by one timer
//! tick per step and asks `should_yield`, as a user thread does at each tick) or the
//! CPU halts (the clock jumps to the next timer). So every figure is exact and the
//! tests do not depend on the host's load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::fair::{MIN_GRANULARITY_NS, TARGET_LATENCY_NS};
use crate::{Executor, Group, Platform};
use panda_mm::CpuId;

fn cpu_id(i: usize) -> CpuId {
    CpuId::new(i).unwrap()
}

/// One timer tick of the kernel (the minimum slice).
const TICK: u64 = MIN_GRANULARITY_NS;

thread_local! {
    static CPU: Cell<usize> = const { Cell::new(0) };
}

struct Virtual {
    now: AtomicU64,
    /// Set by the tests' `halt`: the next deadline to jump to.
    next: AtomicU64,
}

impl Platform for Virtual {
    fn cpu_index(&self) -> usize {
        CPU.with(Cell::get)
    }
    fn wake_cpu(&self, _: usize) {}
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    fn interrupts_off(&self) -> bool {
        false
    }
    fn interrupts_restore(&self, _: bool) {}
    fn halt(&self) {
        // Nothing to run: time passes until the next timer (or one tick).
        let next = self.next.load(Ordering::SeqCst);
        let now = self.now.load(Ordering::SeqCst);
        self.now.store(next.max(now + TICK), Ordering::SeqCst);
    }
}

fn executor(cpus: usize) -> &'static Executor<Virtual> {
    Box::leak(Box::new(Executor::new(
        Virtual {
            now: AtomicU64::new(1_000_000_000),
            next: AtomicU64::new(0),
        },
        cpus,
    )))
}

fn advance(exec: &Executor<Virtual>, ns: u64) {
    exec.platform().now.fetch_add(ns, Ordering::SeqCst);
}

/// A CPU-bound thread: runs one tick at a time until `stop`, yielding when told to.
/// Counts its ticks in `ran`.
fn spinner(
    exec: &'static Executor<Virtual>,
    group: &Arc<Group>,
    ran: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    drop(exec.spawn_in(group, Some(cpu_id(0)), true, async move {
        while !stop.load(Ordering::SeqCst) {
            advance(exec, TICK);
            ran.fetch_add(TICK, Ordering::SeqCst);
            if exec.should_yield() {
                exec.yield_now().await;
            }
        }
    }));
}

/// Runs CPU 0 until `done`, or panics after `limit` of virtual time.
fn run_for(exec: &'static Executor<Virtual>, limit: u64, done: impl Fn() -> bool) {
    let start = exec.platform().now_ns();
    exec.run_until(|| {
        let now = exec.platform().now_ns();
        assert!(
            now - start < limit,
            "not done after {} ms",
            limit / 1_000_000
        );
        if let Some(d) = exec.next_deadline(cpu_id(0)) {
            exec.platform().next.store(d, Ordering::SeqCst);
        }
        done()
    });
}

fn counters(n: usize) -> Vec<Arc<AtomicU64>> {
    (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect()
}

#[test]
fn equal_spinners_get_equal_time() {
    let exec = executor(1);
    let group = exec.new_group();
    let stop = Arc::new(AtomicBool::new(false));
    let ran = counters(50);
    for r in &ran {
        spinner(exec, &group, r.clone(), stop.clone());
    }
    let start = exec.platform().now_ns();
    run_for(exec, 60_000_000_000, || {
        exec.platform().now_ns() - start >= 20_000_000_000
    });
    let times: Vec<u64> = ran.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
    assert!(
        (max - min) * 100 <= max * 5,
        "50 equal spinners over 20 s: {} to {} ms",
        min / 1_000_000,
        max / 1_000_000
    );
}

#[test]
fn a_process_gets_one_share_however_many_threads_it_has() {
    let exec = executor(1);
    let stop = Arc::new(AtomicBool::new(false));
    let many = exec.new_group();
    let one = exec.new_group();
    let ran_many = counters(100);
    for r in &ran_many {
        spinner(exec, &many, r.clone(), stop.clone());
    }
    let ran_one = counters(1);
    spinner(exec, &one, ran_one[0].clone(), stop.clone());
    let start = exec.platform().now_ns();
    run_for(exec, 60_000_000_000, || {
        exec.platform().now_ns() - start >= 20_000_000_000
    });
    let many_total: u64 = ran_many.iter().map(|r| r.load(Ordering::SeqCst)).sum();
    let one_total = ran_one[0].load(Ordering::SeqCst);
    // Each group should get half of the 20 s.
    let diff = many_total.abs_diff(one_total);
    assert!(
        diff * 10 <= many_total + one_total,
        "100 threads got {} ms, 1 thread of another process {} ms",
        many_total / 1_000_000,
        one_total / 1_000_000
    );
    assert_eq!(group_time(&many) + group_time(&one), many_total + one_total);
}

fn group_time(g: &Group) -> u64 {
    g.cpu_time_ns()
}

#[test]
fn slices_shrink_as_the_queue_grows_and_stop_at_the_minimum() {
    for (n, slice) in [
        (1, TARGET_LATENCY_NS),
        (2, TARGET_LATENCY_NS / 2),
        (4, TARGET_LATENCY_NS / 4),
        (1000, MIN_GRANULARITY_NS),
    ] {
        assert_eq!(
            crate::slice_ns(n),
            slice.max(MIN_GRANULARITY_NS),
            "{n} runnable"
        );
    }
    // Two spinners: each runs about half the target latency before the other.
    let exec = executor(1);
    let group = exec.new_group();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    for id in 0..2u64 {
        let (stop, log) = (stop.clone(), log.clone());
        drop(exec.spawn_in(&group, Some(cpu_id(0)), true, async move {
            while !stop.load(Ordering::SeqCst) {
                advance(exec, TICK);
                log.lock().unwrap().push(id);
                if exec.should_yield() {
                    exec.yield_now().await;
                }
            }
        }));
    }
    let start = exec.platform().now_ns();
    run_for(exec, 10_000_000_000, || {
        exec.platform().now_ns() - start >= 2_000_000_000
    });
    let log = log.lock().unwrap();
    // Lengths of the runs of one id: each slice is 10 ms = 2.5 ticks -> 2 or 3 ticks.
    let mut runs = Vec::new();
    let mut len = 1;
    for w in log.windows(2) {
        if w[0] == w[1] {
            len += 1;
        } else {
            runs.push(len);
            len = 1;
        }
    }
    assert!(
        runs.len() > 100,
        "the two spinners hardly alternated: {runs:?}"
    );
    assert!(
        runs[1..].iter().all(|&l| (2..=3).contains(&l)),
        "runs of ticks: {runs:?}"
    );
}

/// A thread that sleeps `period` in a loop beside `spinners` CPU-bound threads of two
/// other processes: its oversleep stays within two slices (one tick here: the timer is
/// only seen at a tick, and the woken thread preempts the spinner at once).
#[test]
fn a_sleeper_beside_thousands_of_spinners_wakes_within_a_slice() {
    let exec = executor(1);
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..2 {
        let group = exec.new_group();
        for _ in 0..1023 {
            spinner(exec, &group, Arc::new(AtomicU64::new(0)), stop.clone());
        }
    }
    let sleeper_group = exec.new_group();
    let late = Arc::new(std::sync::Mutex::new(Vec::new()));
    let wakes = Arc::new(AtomicUsize::new(0));
    {
        let (late, wakes) = (late.clone(), wakes.clone());
        drop(
            exec.spawn_in(&sleeper_group, Some(cpu_id(0)), true, async move {
                loop {
                    let t0 = exec.platform().now_ns();
                    exec.sleep(10_000_000).await;
                    late.lock()
                        .unwrap()
                        .push(exec.platform().now_ns() - t0 - 10_000_000);
                    wakes.fetch_add(1, Ordering::SeqCst);
                }
            }),
        );
    }
    run_for(exec, 120_000_000_000, || {
        wakes.load(Ordering::SeqCst) >= 500
    });
    let mut late = late.lock().unwrap().clone();
    late.sort_unstable();
    let p99 = late[late.len() * 99 / 100];
    assert!(
        p99 <= 2 * MIN_GRANULARITY_NS,
        "oversleep p99 {} us beside 2046 spinners (max {} us)",
        p99 / 1000,
        late.last().unwrap() / 1000
    );
}

/// Killing a process of many threads beside another: every thread of the killed one
/// must get its turn (to see the kill) within about one round of the other's.
#[test]
fn a_killed_process_threads_all_end_within_a_round() {
    let exec = executor(1);
    let stop_a = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let (a, b) = (exec.new_group(), exec.new_group());
    let n = 500;
    for _ in 0..n {
        spinner(exec, &a, Arc::new(AtomicU64::new(0)), stop_a.clone());
        spinner(exec, &b, Arc::new(AtomicU64::new(0)), stop_b.clone());
    }
    let start = exec.platform().now_ns();
    run_for(exec, 120_000_000_000, || {
        exec.platform().now_ns() - start >= 10_000_000_000
    });
    stop_a.store(true, Ordering::SeqCst);
    let killed = exec.platform().now_ns();
    run_for(exec, 120_000_000_000, || a.runnable_on(0) == 0);
    let took = exec.platform().now_ns() - killed;
    // One round of b's threads is n minimum slices.
    assert!(
        took <= 2 * n as u64 * MIN_GRANULARITY_NS,
        "{n} killed threads took {} ms to all run once beside {n} spinners",
        took / 1_000_000
    );
}

/// `yield_now` lets the next task run even when the yielding one has used no time (by
/// virtual runtime alone it would be picked again at once).
#[test]
fn a_task_that_yields_lets_the_next_one_run() {
    let exec = executor(1);
    let group = exec.new_group();
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let done = Arc::new(AtomicUsize::new(0));
    for name in ['a', 'b'] {
        let (log, done) = (log.clone(), done.clone());
        drop(exec.spawn_in(&group, Some(cpu_id(0)), true, async move {
            for _ in 0..20 {
                log.lock().unwrap().push(name);
                exec.yield_now().await;
            }
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    run_for(exec, 1_000_000_000, || done.load(Ordering::SeqCst) == 2);
    let log = log.lock().unwrap();
    assert!(
        !log.contains("aaa") && !log.contains("bbb"),
        "yields did not alternate: {log}"
    );
}

/// A busy CPU pulls shared threads from a busier one (not only idle CPUs steal): CPU 1
/// keeps one pinned spinner of its own, CPU 0 has ten shared ones.
#[test]
fn a_busy_cpu_pulls_threads_from_a_busier_one() {
    let exec = executor(2);
    let group = exec.new_group();
    let stop = Arc::new(AtomicBool::new(false));
    let on_cpu1 = Arc::new(AtomicUsize::new(0));
    let (s, c) = (stop.clone(), on_cpu1.clone());
    drop(exec.spawn_in(&group, Some(cpu_id(1)), true, async move {
        // Alone on its CPU it is never told to yield unless threads are pulled there;
        // without balancing it would spin for ever, so it gives up after 10,000 ticks
        // (and the test fails on `balanced`).
        let mut alone = 0;
        while !s.load(Ordering::SeqCst) && alone < 10_000 {
            advance(exec, TICK);
            c.fetch_add(1, Ordering::SeqCst);
            alone += 1;
            if exec.should_yield() {
                alone = 0;
                exec.yield_now().await;
            }
        }
    }));
    let cpus_seen: Vec<Arc<AtomicUsize>> = (0..10).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    for seen in &cpus_seen {
        let (s, seen) = (stop.clone(), seen.clone());
        drop(exec.spawn_in(&group, Some(cpu_id(0)), false, async move {
            while !s.load(Ordering::SeqCst) {
                advance(exec, TICK);
                seen.fetch_or(1 << exec.current_cpu(), Ordering::SeqCst);
                if exec.should_yield() {
                    exec.yield_now().await;
                }
            }
        }));
    }
    // The two CPUs take turns on this thread, one executor turn each.
    for _ in 0..2000 {
        for cpu in 0..2 {
            CPU.with(|c| c.set(cpu));
            let once = Cell::new(false);
            exec.run_until(|| once.replace(true));
        }
    }
    CPU.with(|c| c.set(0));
    let moved = cpus_seen
        .iter()
        .filter(|s| s.load(Ordering::SeqCst) & 2 != 0)
        .count();
    assert!(
        exec.stats(cpu_id(1)).balanced > 0 && moved >= 3,
        "CPU 1 pulled {} threads ({} of 10 ran there)",
        exec.stats(cpu_id(1)).balanced,
        moved
    );
    stop.store(true, Ordering::SeqCst);
}
