//! Host tests: OS threads stand in for CPUs.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::{Executor, Platform};
use panda_mm::CpuId;

fn cpu_id(i: usize) -> CpuId {
    CpuId::new(i).unwrap()
}

thread_local! {
    static CPU: Cell<usize> = const { Cell::new(0) };
}

/// A platform whose CPUs are threads: `wake_cpu` unparks, `halt` parks briefly.
struct Threads {
    start: Instant,
    threads: Mutex<Vec<Option<Thread>>>,
    wakes: Vec<AtomicU64>,
}

impl Threads {
    fn new(cpus: usize) -> Self {
        Self {
            start: Instant::now(),
            threads: Mutex::new(vec![None; cpus]),
            wakes: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Platform for Threads {
    fn cpu_index(&self) -> usize {
        CPU.with(Cell::get)
    }
    fn wake_cpu(&self, cpu: usize) {
        self.wakes[cpu].fetch_add(1, Ordering::SeqCst);
        if let Some(t) = &self.threads.lock().unwrap()[cpu] {
            t.unpark();
        }
    }
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn interrupts_off(&self) -> bool {
        false
    }
    fn interrupts_restore(&self, _: bool) {}
    fn halt(&self) {
        thread::park_timeout(Duration::from_millis(2));
    }
}

fn executor(cpus: usize) -> &'static Executor<Threads> {
    Box::leak(Box::new(Executor::new(Threads::new(cpus), cpus)))
}

/// Runs CPUs 1.. on threads until `stop` is set; the caller acts as CPU 0.
fn start_cpus(
    exec: &'static Executor<Threads>,
    stop: &'static AtomicBool,
) -> Vec<thread::JoinHandle<()>> {
    (1..exec.cpu_count())
        .map(|cpu| {
            thread::spawn(move || {
                CPU.with(|c| c.set(cpu));
                exec.platform().threads.lock().unwrap()[cpu] = Some(thread::current());
                exec.run_until(|| stop.load(Ordering::SeqCst));
            })
        })
        .collect()
}

fn stop_cpus(
    stop: &AtomicBool,
    exec: &'static Executor<Threads>,
    handles: Vec<thread::JoinHandle<()>>,
) {
    stop.store(true, Ordering::SeqCst);
    // Wake them until they have all left (a broken executor may keep one in its loop:
    // fail then, rather than wait for ever).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handles.iter().all(thread::JoinHandle::is_finished) {
        assert!(Instant::now() < deadline, "a CPU did not stop");
        for cpu in 1..exec.cpu_count() {
            exec.platform().wake_cpu(cpu);
        }
        thread::sleep(Duration::from_millis(1));
    }
    for h in handles {
        h.join().unwrap();
    }
}

fn leak_flag() -> &'static AtomicBool {
    Box::leak(Box::new(AtomicBool::new(false)))
}

/// Completes after being polled `n` times, waking itself each time.
struct Spin(u32);
impl Future for Spin {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[test]
fn ten_thousand_tasks_complete_and_work_is_stolen() {
    let exec = executor(4);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    let done = Arc::new(AtomicUsize::new(0));
    CPU.with(|c| c.set(0));
    for _ in 0..10_000 {
        let done = done.clone();
        // All spawned on CPU 0: the others only get work by stealing it.
        exec.spawn(async move {
            Spin(3).await;
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    exec.run_until(|| done.load(Ordering::SeqCst) == 10_000 || Instant::now() > deadline);
    stop_cpus(stop, exec, handles);
    assert_eq!(done.load(Ordering::SeqCst), 10_000);
    assert_eq!(exec.live_tasks(), 0);
    let stolen: u64 = (1..4).map(|c| exec.stats(cpu_id(c)).stolen).sum();
    assert!(stolen > 0, "no task was stolen by CPUs 1..3");
}

#[test]
fn join_handle_returns_the_value() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let handle = exec.spawn(async { 6 * 7 });
    let got = Arc::new(AtomicU64::new(0));
    let out = got.clone();
    exec.spawn(async move {
        out.store(handle.await, Ordering::SeqCst);
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    exec.run_until(|| got.load(Ordering::SeqCst) != 0 || Instant::now() > deadline);
    assert_eq!(got.load(Ordering::SeqCst), 42);
}

/// Pending until `ready` is set; records the waker and counts polls.
struct Gate {
    ready: Arc<AtomicBool>,
    waker: Arc<Mutex<Option<Waker>>>,
    polls: Arc<AtomicU64>,
    slow: Duration,
}
impl Future for Gate {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        *self.waker.lock().unwrap() = Some(cx.waker().clone());
        thread::sleep(self.slow);
        if self.ready.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[test]
fn many_wakes_from_another_cpu_requeue_once() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let (ready, waker, polls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(None)),
        Arc::new(AtomicU64::new(0)),
    );
    exec.spawn(Gate {
        ready: ready.clone(),
        waker: waker.clone(),
        polls: polls.clone(),
        slow: Duration::ZERO,
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    exec.run_until(|| polls.load(Ordering::SeqCst) == 1 || Instant::now() > deadline);
    assert_eq!(polls.load(Ordering::SeqCst), 1);
    // The task is idle now. Wake it 100 times from another thread before running.
    let w = waker.lock().unwrap().clone().unwrap();
    thread::spawn(move || {
        for _ in 0..100 {
            w.wake_by_ref();
        }
    })
    .join()
    .unwrap();
    let before = exec.stats(cpu_id(0)).polls;
    // One pass: the task must be queued exactly once.
    let deadline = Instant::now() + Duration::from_secs(5);
    exec.run_until(|| exec.stats(cpu_id(0)).polls > before || Instant::now() > deadline);
    assert_eq!(polls.load(Ordering::SeqCst), 2);
    // Nothing else queued: another turn polls nothing.
    let now = exec.stats(cpu_id(0)).polls;
    ready.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_millis(50);
    exec.run_until(|| Instant::now() > deadline);
    assert_eq!(exec.stats(cpu_id(0)).polls, now, "a task was queued twice");
}

#[test]
fn wakes_while_running_do_not_double_poll() {
    let exec = executor(2);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    CPU.with(|c| c.set(0));
    let (ready, waker, polls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(None::<Waker>)),
        Arc::new(AtomicU64::new(0)),
    );
    exec.spawn_pinned(
        cpu_id(1),
        Gate {
            ready: ready.clone(),
            waker: waker.clone(),
            polls: polls.clone(),
            slow: Duration::from_millis(20),
        },
    );
    // While CPU 1 is inside a slow poll, hammer the waker from here.
    let hammer_until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < hammer_until {
        if let Some(w) = waker.lock().unwrap().clone() {
            w.wake_by_ref();
        }
    }
    ready.store(true, Ordering::SeqCst);
    if let Some(w) = waker.lock().unwrap().clone() {
        w.wake_by_ref();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while exec.live_tasks() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    stop_cpus(stop, exec, handles);
    assert_eq!(exec.live_tasks(), 0);
    // Polls are serialised by a 20 ms poll: in ~200 ms at most ~12 can have happened if
    // no two ran at once. Concurrent polls would also trip the future's lock.
    assert!(
        polls.load(Ordering::SeqCst) <= 14,
        "{} polls",
        polls.load(Ordering::SeqCst)
    );
}

/// Polls itself five times (a `Spin(1)` each), counting in `wrong` the polls that ran
/// on a CPU other than `cpu`, then counts itself in `done`.
async fn stay_on(cpu: usize, wrong: Arc<AtomicU64>, done: Arc<AtomicUsize>) {
    for _ in 0..5 {
        if CPU.with(Cell::get) != cpu {
            wrong.fetch_add(1, Ordering::SeqCst);
        }
        Spin(1).await;
    }
    done.fetch_add(1, Ordering::SeqCst);
}

/// Runs CPU 0's loop until `n` tasks are done (15 s at most), then stops the CPUs.
fn run_until_done(
    exec: &'static Executor<Threads>,
    stop: &'static AtomicBool,
    handles: Vec<std::thread::JoinHandle<()>>,
    done: &AtomicUsize,
    n: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    exec.run_until(|| done.load(Ordering::SeqCst) == n || Instant::now() > deadline);
    stop_cpus(stop, exec, handles);
}

#[test]
fn pinned_tasks_never_migrate() {
    let exec = executor(4);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    CPU.with(|c| c.set(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..400 {
        let cpu = 1 + i % 3;
        exec.spawn_pinned(cpu_id(cpu), stay_on(cpu, wrong.clone(), done.clone()));
    }
    run_until_done(exec, stop, handles, &done, 400);
    assert_eq!(done.load(Ordering::SeqCst), 400);
    assert_eq!(
        wrong.load(Ordering::SeqCst),
        0,
        "a pinned task ran on another CPU"
    );
    assert_eq!(
        exec.stats(cpu_id(0)).polls,
        0,
        "CPU 0 polled a task pinned elsewhere"
    );
}

#[test]
fn move_to_pins_a_running_task_to_its_new_cpu() {
    let exec = executor(4);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    CPU.with(|c| c.set(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..200 {
        let (wrong, done) = (wrong.clone(), done.clone());
        // Spawned shared (stealable) on CPU 0, then each moves itself to its CPU.
        exec.spawn(async move {
            let target = 1 + i % 3;
            exec.move_to(cpu_id(target), true).await;
            stay_on(target, wrong, done).await;
        });
    }
    run_until_done(exec, stop, handles, &done, 200);
    assert_eq!(done.load(Ordering::SeqCst), 200);
    assert_eq!(
        wrong.load(Ordering::SeqCst),
        0,
        "a task ran off the CPU it moved to"
    );
}

#[test]
fn a_self_waking_task_cannot_starve_another() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let other_ran = Arc::new(AtomicBool::new(false));
    let spins = Arc::new(AtomicU64::new(0));
    let s = spins.clone();
    exec.spawn(async move {
        loop {
            s.fetch_add(1, Ordering::SeqCst);
            Spin(1).await; // wakes itself forever
        }
    });
    let o = other_ran.clone();
    exec.spawn(async move { o.store(true, Ordering::SeqCst) });
    let deadline = Instant::now() + Duration::from_secs(5);
    exec.run_until(|| other_ran.load(Ordering::SeqCst) || Instant::now() > deadline);
    assert!(other_ran.load(Ordering::SeqCst), "starved");
    assert!(
        spins.load(Ordering::SeqCst) <= 3,
        "the spinner ran {} times first",
        spins.load(Ordering::SeqCst)
    );
}

/// Polls the inner future again and again (wakes itself whenever it is pending).
struct Busy<F>(F);
impl<F: Future + Unpin> Future for Busy<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = Pin::new(&mut self.0).poll(cx);
        if r.is_pending() {
            cx.waker().wake_by_ref();
        }
        r
    }
}

#[test]
fn sleep_never_wakes_early() {
    let exec = executor(2);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    CPU.with(|c| c.set(0));
    let early = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    for i in 0..50u64 {
        let (early, done) = (early.clone(), done.clone());
        let ns = 1_000_000 + i * 200_000;
        exec.spawn(async move {
            let start = exec.platform().now_ns();
            // Poll the sleep far more often than its timer fires: it must still not
            // complete before its deadline.
            Busy(exec.sleep(ns)).await;
            if exec.platform().now_ns() - start < ns {
                early.fetch_add(1, Ordering::SeqCst);
            }
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    exec.run_until(|| done.load(Ordering::SeqCst) == 50 || Instant::now() > deadline);
    stop_cpus(stop, exec, handles);
    assert_eq!(done.load(Ordering::SeqCst), 50);
    assert_eq!(early.load(Ordering::SeqCst), 0);
    // Fired and completed sleeps leave nothing behind.
    assert_eq!(armed_total(exec), 0);
}

#[test]
fn waking_an_idle_cpu_sends_a_wakeup_and_a_busy_one_does_not() {
    let exec = executor(2);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    CPU.with(|c| c.set(0));
    // Let CPU 1 go idle.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exec.is_idle(cpu_id(1)) && Instant::now() < deadline {
        thread::yield_now();
    }
    assert!(exec.is_idle(cpu_id(1)));
    let before = exec.platform().wakes[1].load(Ordering::SeqCst);
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    exec.spawn_pinned(cpu_id(1), async move { r.store(true, Ordering::SeqCst) });
    assert!(
        exec.platform().wakes[1].load(Ordering::SeqCst) > before,
        "idle CPU 1 got no wake-up"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ran.load(Ordering::SeqCst) && Instant::now() < deadline {
        thread::yield_now();
    }
    assert!(ran.load(Ordering::SeqCst));

    // Keep CPU 1 busy with a long poll, then wake a task that lives on it.
    let busy = Arc::new(AtomicBool::new(true));
    let b = busy.clone();
    let inside = Arc::new(AtomicBool::new(false));
    let i = inside.clone();
    exec.spawn_pinned(cpu_id(1), async move {
        i.store(true, Ordering::SeqCst);
        while b.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !inside.load(Ordering::SeqCst) && Instant::now() < deadline {
        thread::yield_now();
    }
    assert!(inside.load(Ordering::SeqCst), "CPU 1 never ran its task");
    let before = exec.platform().wakes[1].load(Ordering::SeqCst);
    exec.spawn_pinned(cpu_id(1), async {});
    let after = exec.platform().wakes[1].load(Ordering::SeqCst);
    busy.store(false, Ordering::SeqCst);
    stop_cpus(stop, exec, handles);
    assert_eq!(after, before, "a busy CPU was sent a wake-up");
}

#[test]
fn a_pinned_self_waking_task_cannot_starve_shared_ones() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    exec.spawn_pinned(cpu_id(0), async move {
        while !st.load(Ordering::SeqCst) {
            Spin(1).await;
        }
    });
    let done = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let d = done.clone();
        exec.spawn(async move {
            Spin(2).await;
            d.fetch_add(1, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    exec.run_until(|| done.load(Ordering::SeqCst) == 100 || Instant::now() > deadline);
    stop.store(true, Ordering::SeqCst);
    assert_eq!(
        done.load(Ordering::SeqCst),
        100,
        "shared tasks starved by a pinned one"
    );
}

/// A waker that counts its wakes; `Arc::strong_count` shows who still holds it.
struct CountWake(AtomicU64);
impl std::task::Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn count_waker() -> (Arc<CountWake>, Waker) {
    let counter = Arc::new(CountWake(AtomicU64::new(0)));
    (counter.clone(), Waker::from(counter))
}

fn armed_total<P: Platform>(exec: &Executor<P>) -> usize {
    (0..exec.cpu_count())
        .map(|c| exec.armed_timers(cpu_id(c)))
        .sum()
}

#[test]
fn a_dropped_sleep_leaves_no_timer_and_no_waker() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let (counter, waker) = count_waker();
    let mut sleep = Box::pin(exec.sleep(u64::MAX));
    let mut cx = Context::from_waker(&waker);
    assert!(sleep.as_mut().poll(&mut cx).is_pending());
    assert_eq!(exec.armed_timers(cpu_id(0)), 1);
    drop(sleep);
    assert_eq!(
        exec.armed_timers(cpu_id(0)),
        0,
        "a dropped sleep left its timer armed"
    );
    drop(waker);
    assert_eq!(
        Arc::strong_count(&counter),
        1,
        "the timer list still holds the dropped sleep's waker"
    );
    assert_eq!(exec.next_deadline(cpu_id(0)), None);
}

/// The kernel's case: tasks sleeping "forever" while racing a kill event (as
/// `Process::unless_killed` does) are cancelled; their sleeps must not outlive them.
#[test]
fn tasks_killed_while_sleeping_forever_leave_no_timer() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let killed = Arc::new(AtomicBool::new(false));
    let kill_wakers = Arc::new(Mutex::new(Vec::<Waker>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let (killed, kill_wakers, done) = (killed.clone(), kill_wakers.clone(), done.clone());
        exec.spawn(async move {
            let mut sleep = std::pin::pin!(exec.sleep(u64::MAX));
            std::future::poll_fn(|cx| {
                if sleep.as_mut().poll(cx).is_ready() || killed.load(Ordering::SeqCst) {
                    return Poll::Ready(());
                }
                kill_wakers.lock().unwrap().push(cx.waker().clone());
                Poll::Pending
            })
            .await;
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    exec.run_until(|| exec.armed_timers(cpu_id(0)) == 100 || Instant::now() > deadline);
    assert_eq!(exec.armed_timers(cpu_id(0)), 100);
    killed.store(true, Ordering::SeqCst);
    for w in kill_wakers.lock().unwrap().drain(..) {
        w.wake();
    }
    exec.run_until(|| done.load(Ordering::SeqCst) == 100 || Instant::now() > deadline);
    assert_eq!(done.load(Ordering::SeqCst), 100);
    assert_eq!(exec.live_tasks(), 0);
    assert_eq!(
        exec.armed_timers(cpu_id(0)),
        0,
        "killed sleepers left timers armed"
    );
}

#[test]
fn repolling_a_sleep_with_new_wakers_keeps_one_entry() {
    let exec = executor(2);
    let mut sleep = Box::pin(exec.sleep(u64::MAX));
    let mut old: Vec<Arc<CountWake>> = Vec::new();
    for i in 0..20 {
        // Alternate the polling CPU too: the entry stays where it was armed.
        CPU.with(|c| c.set(i % 2));
        let (counter, waker) = count_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        // The same waker again changes nothing.
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        assert_eq!(armed_total(exec), 1, "poll {i} armed a second entry");
        old.push(counter);
    }
    CPU.with(|c| c.set(0));
    // Only the latest waker is still held (by the entry and the sleep).
    let held: Vec<usize> = old.iter().map(Arc::strong_count).collect();
    assert!(
        held[..19].iter().all(|&n| n == 1),
        "replaced wakers kept: {held:?}"
    );
    assert_eq!(held[19], 3);
    drop(sleep);
    assert_eq!(armed_total(exec), 0);
    assert_eq!(Arc::strong_count(&old[19]), 1);
}

#[test]
fn sleeps_dropped_on_another_cpu_leave_no_timer() {
    let exec = executor(4);
    let stop = leak_flag();
    let handles = start_cpus(exec, stop);
    CPU.with(|c| c.set(0));
    let done = Arc::new(AtomicUsize::new(0));
    let same_cpu = Arc::new(AtomicUsize::new(0));
    const TASKS: usize = 1000;
    for i in 0..TASKS {
        let (done, same_cpu) = (done.clone(), same_cpu.clone());
        exec.spawn_pinned(cpu_id(i % 4), async move {
            let armed_on = CPU.with(Cell::get);
            let mut sleep = Box::pin(exec.sleep(u64::MAX));
            // Arm it here (one pending poll), then carry it to another CPU and drop it.
            std::future::poll_fn(|cx| {
                assert!(sleep.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            exec.move_to(cpu_id((armed_on + 1 + i % 3) % 4), i % 2 == 0)
                .await;
            if CPU.with(Cell::get) == armed_on {
                same_cpu.fetch_add(1, Ordering::SeqCst);
            }
            drop(sleep);
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    run_until_done(exec, stop, handles, &done, TASKS);
    assert_eq!(done.load(Ordering::SeqCst), TASKS);
    assert_eq!(
        same_cpu.load(Ordering::SeqCst),
        0,
        "a sleep was dropped where it was armed"
    );
    let left: Vec<usize> = (0..4).map(|c| exec.armed_timers(cpu_id(c))).collect();
    assert_eq!(
        left, [0; 4],
        "sleeps dropped on other CPUs left timers armed"
    );
}

/// A platform whose `halt` waits for a wake-up and nothing else: no time-out, no
/// spurious return. It models `cli ... sti; hlt` exactly: a wake sent while the CPU
/// has interrupts enabled is taken at once (dropped here, at the CPU's next
/// `interrupts_off`); one sent while they are off stays pending and ends the next
/// `halt` at once. So a lost wake-up leaves a CPU halted for good, where `Threads`
/// would hide it behind its 2 ms park.
struct StrictHalt {
    pending: Vec<(Mutex<bool>, std::sync::Condvar)>,
}

thread_local! {
    static INTERRUPTS_ON: Cell<bool> = const { Cell::new(true) };
}

impl StrictHalt {
    fn new(cpus: usize) -> Self {
        Self {
            pending: (0..cpus)
                .map(|_| (Mutex::new(false), std::sync::Condvar::new()))
                .collect(),
        }
    }
}

impl Platform for StrictHalt {
    fn cpu_index(&self) -> usize {
        CPU.with(Cell::get)
    }
    fn wake_cpu(&self, cpu: usize) {
        let (flag, cond) = &self.pending[cpu];
        *flag.lock().unwrap() = true;
        cond.notify_one();
    }
    fn now_ns(&self) -> u64 {
        0 // no timers in these tests: a halted CPU has no tick to wake it either
    }
    fn interrupts_off(&self) -> bool {
        let was_on = INTERRUPTS_ON.with(|i| i.replace(false));
        if was_on {
            // Any wake-up that arrived while interrupts were on has been handled.
            *self.pending[self.cpu_index()].0.lock().unwrap() = false;
        }
        was_on
    }
    fn interrupts_restore(&self, enabled: bool) {
        INTERRUPTS_ON.with(|i| i.set(enabled));
    }
    fn halt(&self) {
        let (flag, cond) = &self.pending[self.cpu_index()];
        let mut pending = flag.lock().unwrap();
        while !*pending {
            pending = cond.wait(pending).unwrap();
        }
        *pending = false;
        INTERRUPTS_ON.with(|i| i.set(true));
    }
}

/// One-shot-at-a-time signal between two tasks: `set` wakes the waiter.
#[derive(Default)]
struct Signal {
    set: AtomicBool,
    waker: Mutex<Option<Waker>>,
}
impl Signal {
    fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            // Set between the check and the registration: do not wait for it.
            if self.set.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await
    }
}

/// Cross-CPU wakes and spawns by the thousand on CPUs that halt until woken: a lost
/// wake-up leaves a CPU halted for ever, the work unfinished, and this test fails at
/// its time-out instead of hanging.
#[test]
fn no_wake_up_is_lost_when_halt_waits_for_one() {
    const CPUS: usize = 4;
    const ROUNDS: usize = 3000;
    const SPAWNS: usize = 3000;
    let exec: &'static Executor<StrictHalt> =
        Box::leak(Box::new(Executor::new(StrictHalt::new(CPUS), CPUS)));
    let stop = leak_flag();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    CPU.with(|c| c.set(0));
    // Ping-pong between tasks pinned on CPUs a and b: every round is a wake of a task on
    // another CPU that has just gone (or is going) idle.
    for (a, b) in [(0, 1), (2, 3), (1, 2)] {
        let (ping, pong) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
        let (ping2, pong2, tx2) = (ping.clone(), pong.clone(), tx.clone());
        exec.spawn_pinned(cpu_id(a), async move {
            for _ in 0..ROUNDS {
                pong.set();
                ping.wait().await;
            }
            tx2.send("ping-pong").unwrap();
        });
        exec.spawn_pinned(cpu_id(b), async move {
            for _ in 0..ROUNDS {
                pong2.wait().await;
                ping2.set();
            }
        });
    }
    // Spawns onto other CPUs, each awaited through its JoinHandle (a wake back).
    let tx2 = tx.clone();
    exec.spawn_pinned(cpu_id(3), async move {
        for i in 0..SPAWNS {
            let cpu = i % CPUS;
            let got = if i % 2 == 0 {
                exec.spawn_pinned(cpu_id(cpu), async move { i }).await
            } else {
                exec.spawn_on(cpu_id(cpu), async move { i }).await
            };
            assert_eq!(got, i);
        }
        tx2.send("spawns").unwrap();
    });
    drop(tx);
    // The CPUs start only now: the test thread is not a CPU and spawns nothing after.
    let handles: Vec<_> = (0..CPUS)
        .map(|cpu| {
            thread::spawn(move || {
                CPU.with(|c| c.set(cpu));
                exec.run_until(|| stop.load(Ordering::SeqCst));
            })
        })
        .collect();
    let timeout = Instant::now() + Duration::from_secs(10);
    for _ in 0..4 {
        let left = timeout.saturating_duration_since(Instant::now());
        if rx.recv_timeout(left).is_err() {
            let idle: Vec<bool> = (0..CPUS).map(|c| exec.is_idle(cpu_id(c))).collect();
            // The CPU threads stay parked; the test binary exits without them.
            panic!(
                "work unfinished after 10 s: a wake-up was lost (idle CPUs: {idle:?}, {} tasks live)",
                exec.live_tasks()
            );
        }
    }
    // `stop` is not work a CPU looks for before halting, so a wake-up sent just before
    // a CPU turns interrupts off is taken and the CPU halts: wake until all have left.
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handles.iter().all(thread::JoinHandle::is_finished) {
        assert!(Instant::now() < deadline, "a CPU did not stop");
        for cpu in 0..CPUS {
            exec.platform().wake_cpu(cpu);
        }
        thread::sleep(Duration::from_millis(1));
    }
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(exec.live_tasks(), 0);
}

/// Runs exactly `n` turns of the calling CPU's loop.
fn turns<P: Platform>(exec: &'static Executor<P>, n: usize) {
    let left = Cell::new(n);
    exec.run_until(|| {
        let done = left.get() == 0;
        left.set(left.get().saturating_sub(1));
        done
    });
}

static IDLE_WORK_CALLS: AtomicUsize = AtomicUsize::new(0);

fn count_idle_work() -> bool {
    IDLE_WORK_CALLS.fetch_add(1, Ordering::SeqCst);
    true
}

/// A turn runs the CPU's own queue, else steals, and only with neither does it call
/// the idle work (which, returning true, keeps the CPU from halting).
#[test]
fn idle_work_runs_only_when_there_is_nothing_to_run_or_steal() {
    let exec = executor(2);
    exec.set_idle_work(count_idle_work);
    CPU.with(|c| c.set(1));
    turns(exec, 1);
    assert_eq!(
        IDLE_WORK_CALLS.load(Ordering::SeqCst),
        1,
        "nothing to do: idle work"
    );
    assert_eq!(
        exec.stats(cpu_id(1)).idles,
        0,
        "idle work that did something: no halt"
    );

    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    exec.spawn(async move {
        r.fetch_add(1, Ordering::SeqCst);
    });
    turns(exec, 1);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(
        IDLE_WORK_CALLS.load(Ordering::SeqCst),
        1,
        "idle work called in a turn that ran a task"
    );

    // Two tasks queued on CPU 0, which runs no loop: CPU 1's turn steals one.
    for _ in 0..2 {
        let r = ran.clone();
        exec.spawn_on(cpu_id(0), async move {
            r.fetch_add(1, Ordering::SeqCst);
        });
    }
    turns(exec, 1);
    assert_eq!(exec.stats(cpu_id(1)).stolen, 1, "half of two, rounded up");
    assert_eq!(
        IDLE_WORK_CALLS.load(Ordering::SeqCst),
        1,
        "idle work called in a turn that stole"
    );
    turns(exec, 1);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        2,
        "the stolen task ran on CPU 1"
    );
    assert!(exec.has_queued_work(cpu_id(0)) && !exec.has_queued_work(cpu_id(1)));
    CPU.with(|c| c.set(0));
}

/// `live_tasks` counts spawned, unfinished tasks; `task_structs` the structures still in
/// memory (a global count: other tests run alongside, so only lower bounds hold here).
#[test]
fn live_tasks_and_task_structs_count_what_is_alive() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let open = Arc::new(AtomicBool::new(false));
    let wakers = Arc::new(Mutex::new(Vec::<Waker>::new()));
    for _ in 0..3 {
        let (open, wakers) = (open.clone(), wakers.clone());
        exec.spawn(std::future::poll_fn(move |cx| {
            if open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            wakers.lock().unwrap().push(cx.waker().clone());
            Poll::Pending
        }));
    }
    assert_eq!(exec.live_tasks(), 3);
    assert!(exec.task_structs() >= 3);
    turns(exec, 1);
    assert_eq!(wakers.lock().unwrap().len(), 3, "each task polled once");
    assert_eq!(exec.live_tasks(), 3, "pending tasks are alive");
    assert!(exec.task_structs() >= 3, "their wakers keep them in memory");
    open.store(true, Ordering::SeqCst);
    for w in wakers.lock().unwrap().drain(..) {
        w.wake();
    }
    turns(exec, 1);
    assert_eq!(exec.live_tasks(), 0);
}

/// CPU numbers beyond the executor's are kernel bugs, named in a panic, for spawns, for
/// queries and for the platform's own index (they used to be folded onto the last CPU,
/// which hid the bug and made two CPUs share one CPU's queues).
#[test]
fn out_of_range_cpus_panic_by_name() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let exec = executor(2);
    let message = |r: std::thread::Result<()>| match r {
        Ok(()) => String::from("no panic"),
        Err(e) => e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| String::from("a panic without a message")),
    };
    type Call<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let calls: [Call; 4] = [
        (
            "spawn_on(99)",
            Box::new(|| drop(exec.spawn_on(cpu_id(99), async {}))),
        ),
        (
            "spawn_pinned(MAX_CPUS - 1)",
            Box::new(|| drop(exec.spawn_pinned(cpu_id(crate::MAX_CPUS - 1), async {}))),
        ),
        (
            "has_queued_work(5)",
            Box::new(|| {
                let _ = exec.has_queued_work(cpu_id(5));
            }),
        ),
        (
            "current_cpu() on cpu 7",
            Box::new(|| {
                CPU.with(|c| c.set(7));
                let r = catch_unwind(AssertUnwindSafe(|| exec.current_cpu()));
                CPU.with(|c| c.set(0));
                if let Err(e) = r {
                    std::panic::resume_unwind(e);
                }
            }),
        ),
    ];
    for (what, call) in calls {
        let m = message(catch_unwind(AssertUnwindSafe(call)));
        assert!(m.contains("only CPUs 0..2 are served"), "{what}: {m}");
    }
    assert_eq!(exec.live_tasks(), 0, "nothing was spawned");
    assert_eq!(exec.current_cpu(), 0);
}

/// New shared work on a CPU whose shared queue already has some wakes one idle CPU to
/// steal it; the first task of a queue, pinned tasks, and busy CPUs get no wake-up.
/// `StrictHalt` keeps the idle CPU halted until it is woken, so who was woken shows.
#[test]
fn spawning_a_second_shared_task_wakes_one_idle_cpu_to_steal_it() {
    let exec: &'static Executor<StrictHalt> =
        Box::leak(Box::new(Executor::new(StrictHalt::new(3), 3)));
    let stop = leak_flag();
    // CPU 2 runs its loop and halts; CPU 1 runs none, so it never looks idle.
    let cpu2 = thread::spawn(move || {
        CPU.with(|c| c.set(2));
        exec.run_until(|| stop.load(Ordering::SeqCst));
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exec.is_idle(cpu_id(2)) && Instant::now() < deadline {
        thread::yield_now();
    }
    assert!(exec.is_idle(cpu_id(2)) && !exec.is_idle(cpu_id(1)));
    CPU.with(|c| c.set(0));
    let ran_on = Arc::new(Mutex::new(Vec::new()));
    let task = |ran_on: Arc<Mutex<Vec<usize>>>| async move {
        ran_on.lock().unwrap().push(CPU.with(Cell::get));
    };
    exec.spawn_pinned(cpu_id(0), task(ran_on.clone()));
    exec.spawn_pinned(cpu_id(0), task(ran_on.clone()));
    exec.spawn(task(ran_on.clone()));
    assert_eq!(
        exec.stats(cpu_id(0)).wakeups_sent,
        0,
        "one shared task: no wake-up"
    );
    assert!(exec.is_idle(cpu_id(2)));
    exec.spawn(task(ran_on.clone()));
    assert_eq!(
        exec.stats(cpu_id(0)).wakeups_sent,
        1,
        "the second shared task: one wake-up"
    );
    // The wake-up went to CPU 2, which steals the two shared tasks (one per turn:
    // half of the queue, rounded up) and runs them; the pinned ones stay.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ran_on.lock().unwrap().len() < 2 && Instant::now() < deadline {
        thread::yield_now();
    }
    assert_eq!(
        *ran_on.lock().unwrap(),
        [2, 2],
        "the idle CPU was not the one woken"
    );
    assert_eq!(exec.stats(cpu_id(2)).stolen, 2);
    assert!(exec.has_queued_work(cpu_id(0)), "pinned tasks were stolen");
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cpu2.is_finished() && Instant::now() < deadline {
        exec.platform().wake_cpu(2);
        thread::sleep(Duration::from_millis(1));
    }
    assert!(cpu2.is_finished(), "CPU 2 did not stop");
    cpu2.join().unwrap();
}

/// `wake_idle_near` wakes the nearest CPU that is idle (not merely the nearest), only
/// that one, and no CPU when none is idle. `StrictHalt` keeps a halted CPU halted until
/// it is woken, so a CPU's halt count shows whether it was.
#[test]
fn wake_idle_near_wakes_the_nearest_idle_cpu() {
    let exec: &'static Executor<StrictHalt> =
        Box::leak(Box::new(Executor::new(StrictHalt::new(5), 5)));
    let stop = leak_flag();
    // CPUs 3 and 4 run their loops and halt; 0 (this thread), 1 and 2 never look idle.
    let cpus: Vec<_> = [3, 4]
        .into_iter()
        .map(|cpu| {
            thread::spawn(move || {
                CPU.with(|c| c.set(cpu));
                exec.run_until(|| stop.load(Ordering::SeqCst));
            })
        })
        .collect();
    let halted = |cpu: usize, times: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(exec.is_idle(cpu_id(cpu)) && exec.stats(cpu_id(cpu)).idles >= times)
            && Instant::now() < deadline
        {
            thread::yield_now();
        }
        exec.is_idle(cpu_id(cpu)) && exec.stats(cpu_id(cpu)).idles == times
    };
    assert!(halted(3, 1) && halted(4, 1));
    CPU.with(|c| c.set(0));
    // From 1 the order is 2, 0, 3, 4: the first idle one is 3.
    assert_eq!(exec.wake_idle_near(cpu_id(1)), Some(cpu_id(3)));
    assert!(halted(3, 2), "CPU 3 was not woken (or woken twice)");
    assert!(halted(4, 1), "CPU 4 was woken too");
    // From 3 the nearest is 4; from 4 it is 3 (0 comes first but is busy).
    assert_eq!(exec.wake_idle_near(cpu_id(3)), Some(cpu_id(4)));
    assert!(halted(4, 2));
    assert_eq!(exec.wake_idle_near(cpu_id(4)), Some(cpu_id(3)));
    assert!(halted(3, 3));
    assert_eq!(exec.stats(cpu_id(0)).wakeups_sent, 3);
    stop.store(true, Ordering::SeqCst);
    for (cpu, handle) in [3, 4].into_iter().zip(cpus) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < deadline {
            exec.platform().wake_cpu(cpu);
            thread::sleep(Duration::from_millis(1));
        }
        assert!(handle.is_finished(), "CPU {cpu} did not stop");
        handle.join().unwrap();
    }
    // No CPU idle (none runs its loop now): nobody to wake.
    let busy: &'static Executor<StrictHalt> =
        Box::leak(Box::new(Executor::new(StrictHalt::new(3), 3)));
    assert_eq!(busy.wake_idle_near(cpu_id(0)), None);
    assert_eq!(busy.stats(cpu_id(0)).wakeups_sent, 0);
}

/// `move_to` lands the task on its CPU and completes only there: pinned, no other CPU
/// may steal it; unpinned, it is stealable again, and a steal before it arrived only
/// sends it back. The test thread plays every CPU, one turn at a time.
#[test]
fn move_to_lands_on_its_cpu_pinned_or_stealable() {
    let exec = executor(3);
    let on = |cpu| CPU.with(|c| c.set(cpu));
    for pin in [true, false] {
        on(0);
        let polled_on = Arc::new(Mutex::new(Vec::new()));
        let p = polled_on.clone();
        let handle = exec.spawn(async move {
            exec.move_to(cpu_id(1), pin).await;
            p.lock().unwrap().push(CPU.with(Cell::get));
            exec.yield_now().await;
            p.lock().unwrap().push(CPU.with(Cell::get));
        });
        // CPU 0 polls it: it asks to move and is queued on CPU 1 at once.
        turns(exec, 1);
        assert!(!handle.is_finished());
        assert!(
            exec.has_queued_work(cpu_id(1)),
            "not queued on CPU 1 (pin {pin})"
        );
        assert!(!exec.has_queued_work(cpu_id(0)) && !exec.has_queued_work(cpu_id(2)));
        // CPU 0 steals it only if it is not pinned; polled on CPU 0, it asks again.
        turns(exec, 2);
        assert_eq!(exec.stats(cpu_id(0)).stolen, u64::from(!pin), "pin {pin}");
        assert!(
            polled_on.lock().unwrap().is_empty(),
            "moved, but not to CPU 1"
        );
        assert!(exec.has_queued_work(cpu_id(1)) && !exec.has_queued_work(cpu_id(0)));
        on(1);
        turns(exec, 1);
        assert_eq!(*polled_on.lock().unwrap(), [1]);
        // It yielded and is queued on CPU 1 again: CPU 2 may steal it only if shared.
        on(2);
        turns(exec, 2);
        on(1);
        turns(exec, 1);
        let last = if pin { 1 } else { 2 };
        assert_eq!(*polled_on.lock().unwrap(), [1, last], "pin {pin}");
        assert!(handle.is_finished());
    }
    // A CPU the executor does not serve is a bug of the caller: it panics by name.
    let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        exec.move_to(cpu_id(3), true)
    }));
    assert!(past.is_err(), "move_to(3) on 3 CPUs was accepted");
    on(0);
}

/// A CPU with nothing to run, steal or fire halts, and a timer armed for later does not
/// keep it up.
#[test]
fn a_cpu_with_nothing_to_do_halts() {
    let exec = executor(2);
    CPU.with(|c| c.set(1));
    turns(exec, 1);
    assert_eq!(exec.stats(cpu_id(1)).idles, 1);
    let mut later = Box::pin(exec.sleep(u64::MAX / 2));
    let waker = Waker::noop();
    assert!(later
        .as_mut()
        .poll(&mut Context::from_waker(waker))
        .is_pending());
    turns(exec, 1);
    assert_eq!(
        exec.stats(cpu_id(1)).idles,
        2,
        "a timer not due kept the CPU from halting"
    );
    assert_eq!(
        exec.armed_timers(cpu_id(1)),
        1,
        "a timer not due was taken off the list"
    );
    assert_eq!(exec.stats(cpu_id(1)).timers_fired, 0);
    CPU.with(|c| c.set(0));
}

// The last look before halting (`go_idle`) must see work that appeared after the
// turn's own checks. The idle work, which runs right before it, makes some: a wake
// of a task on this CPU, a spawn on another CPU, a timer that falls due.
static WAKE_IN_IDLE_WORK: Mutex<Option<Waker>> = Mutex::new(None);
static SPAWNING_EXEC: std::sync::OnceLock<&'static Executor<Threads>> = std::sync::OnceLock::new();
static SPAWNED_IN_IDLE_WORK: AtomicBool = AtomicBool::new(false);
static TIMING_EXEC: std::sync::OnceLock<&'static Executor<Threads>> = std::sync::OnceLock::new();
static SLEEP_IN_IDLE_WORK: Mutex<Option<Pin<Box<crate::Sleep>>>> = Mutex::new(None);

fn wake_a_task() -> bool {
    if let Some(w) = WAKE_IN_IDLE_WORK.lock().unwrap().take() {
        w.wake();
    }
    false
}

fn spawn_on_cpu_0() -> bool {
    if !SPAWNED_IN_IDLE_WORK.swap(true, Ordering::SeqCst) {
        SPAWNING_EXEC.get().unwrap().spawn_on(CpuId::BOOT, async {});
    }
    false
}

fn arm_a_timer_and_let_it_fall_due() -> bool {
    let mut slot = SLEEP_IN_IDLE_WORK.lock().unwrap();
    if slot.is_none() {
        let exec = TIMING_EXEC.get().unwrap();
        // Armed only if the poll comes before the deadline: on a loaded host, try
        // again further out.
        let mut ahead = 50_000;
        let (sleep, deadline) = loop {
            let deadline = exec.platform().now_ns() + ahead;
            let mut sleep = Box::pin(exec.sleep_until(deadline));
            let cx = &mut Context::from_waker(Waker::noop());
            if sleep.as_mut().poll(cx).is_pending() {
                break (sleep, deadline);
            }
            ahead *= 4;
        };
        while exec.platform().now_ns() < deadline {
            std::hint::spin_loop();
        }
        *slot = Some(sleep);
    }
    false
}

#[test]
fn the_last_look_before_halting_sees_work_that_just_appeared() {
    // A task on this CPU, woken by the idle work.
    let exec = executor(1);
    exec.set_idle_work(wake_a_task);
    CPU.with(|c| c.set(0));
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    exec.spawn(std::future::poll_fn(move |cx| {
        if p.fetch_add(1, Ordering::SeqCst) > 0 {
            return Poll::Ready(());
        }
        *WAKE_IN_IDLE_WORK.lock().unwrap() = Some(cx.waker().clone());
        Poll::Pending
    }));
    turns(exec, 2);
    assert_eq!(polls.load(Ordering::SeqCst), 1);
    assert!(exec.has_queued_work(cpu_id(0)));
    assert_eq!(exec.stats(cpu_id(0)).idles, 0, "halted with a task queued");
    turns(exec, 1);
    assert_eq!((polls.load(Ordering::SeqCst), exec.live_tasks()), (2, 0));

    // A task spawned on another CPU, which this one could steal.
    let exec = executor(2);
    SPAWNING_EXEC.set(exec).ok().unwrap();
    exec.set_idle_work(spawn_on_cpu_0);
    CPU.with(|c| c.set(1));
    turns(exec, 1);
    assert!(exec.has_queued_work(cpu_id(0)));
    assert_eq!(
        exec.stats(cpu_id(1)).idles,
        0,
        "halted with a task to steal"
    );
    turns(exec, 2);
    assert_eq!((exec.stats(cpu_id(1)).stolen, exec.live_tasks()), (1, 0));

    // A timer of this CPU that fell due.
    let exec = executor(1);
    TIMING_EXEC.set(exec).ok().unwrap();
    exec.set_idle_work(arm_a_timer_and_let_it_fall_due);
    CPU.with(|c| c.set(0));
    turns(exec, 1);
    assert_eq!(exec.armed_timers(cpu_id(0)), 1);
    assert_eq!(exec.stats(cpu_id(0)).idles, 0, "halted with a timer due");
    turns(exec, 1);
    assert_eq!(
        (
            exec.armed_timers(cpu_id(0)),
            exec.stats(cpu_id(0)).timers_fired
        ),
        (0, 1)
    );
    drop(SLEEP_IN_IDLE_WORK.lock().unwrap().take());
}

/// Timers that fall due together all fire in one turn, however many (they are taken
/// off the list in groups of 16), and in deadline order.
#[test]
fn every_due_timer_fires_in_one_turn() {
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    let fired = Arc::new(Mutex::new(Vec::new()));
    // Far enough ahead that the first turn arms them all, even on a loaded host.
    let now = exec.platform().now_ns() + 1_000_000_000;
    for i in (0..40u64).rev() {
        let fired = fired.clone();
        // Pinned, so each wake lands on CPU 0's queue.
        exec.spawn_pinned(cpu_id(0), async move {
            exec.sleep_until(now + i).await;
            fired.lock().unwrap().push(i);
        });
    }
    turns(exec, 1);
    assert_eq!(exec.armed_timers(cpu_id(0)), 40);
    assert_eq!(exec.next_deadline(cpu_id(0)), Some(now));
    // A turn before the deadline fires none of them.
    turns(exec, 1);
    assert_eq!(
        (
            exec.armed_timers(cpu_id(0)),
            exec.stats(cpu_id(0)).timers_fired
        ),
        (40, 0)
    );
    assert_eq!(exec.sleep_until(12_345).deadline(), 12_345);
    while exec.platform().now_ns() < now + 40 {
        thread::sleep(Duration::from_millis(1));
    }
    turns(exec, 1);
    assert_eq!(exec.stats(cpu_id(0)).timers_fired, 40);
    assert_eq!(exec.armed_timers(cpu_id(0)), 0);
    assert_eq!(exec.next_deadline(cpu_id(0)), None);
    turns(exec, 1);
    assert_eq!(*fired.lock().unwrap(), (0..40).collect::<Vec<_>>());
}

/// `task_structs` is one count for the whole process, so the exact check runs in a
/// child process with this test alone: the test binary runs itself, filtered to it.
#[test]
fn task_structs_count_tasks_until_their_last_waker_goes() {
    const ALONE: &str = "PANDA_SCHED_TEST_ALONE";
    if std::env::var_os(ALONE).is_none() {
        let name = "tests::task_structs_count_tasks_until_their_last_waker_goes";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "the check alone failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let exec = executor(1);
    CPU.with(|c| c.set(0));
    assert_eq!(exec.task_structs(), 0);
    let kept = Arc::new(Mutex::new(Vec::<Waker>::new()));
    for _ in 0..3 {
        let kept = kept.clone();
        exec.spawn(std::future::poll_fn(move |cx| {
            kept.lock().unwrap().push(cx.waker().clone());
            Poll::Ready(())
        }));
    }
    assert_eq!(exec.task_structs(), 3);
    turns(exec, 1);
    assert_eq!(exec.live_tasks(), 0);
    assert_eq!(
        exec.task_structs(),
        3,
        "finished, but wakers still name them"
    );
    kept.lock().unwrap().pop();
    assert_eq!(exec.task_structs(), 2);
    kept.lock().unwrap().clear();
    assert_eq!(exec.task_structs(), 0);
}
