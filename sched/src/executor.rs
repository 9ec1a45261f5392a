//! The executor: per-CPU queues, the CPU loop, stealing, idling, spawning.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::task::{Context, Poll, Waker};

use crossbeam_utils::CachePadded;

use crate::fair::{self, FairQueue, Group};
use crate::queue::TaskQueue;
use crate::task::{Scheduler, Task, DONE, IDLE, RUNNING, SCHEDULED, WOKEN};
use crate::timer::{Sleep, TimerKey, TimerList, Timers};

use panda_mm::CpuId;
/// Most CPUs an executor serves (`panda_mm::MAX_CPUS`).
pub use panda_mm::MAX_CPUS;

/// What the executor needs from the machine. The kernel implements it with GS-based
/// CPU ids, wake-up IPIs, the TSC and `sti; hlt`; the host tests with threads.
pub trait Platform: Send + Sync + 'static {
    /// The calling CPU's dense index, below the executor's CPU count.
    fn cpu_index(&self) -> usize;
    /// Makes CPU `cpu` return from `halt` soon (an IPI).
    fn wake_cpu(&self, cpu: usize);
    /// A monotonic clock in nanoseconds, the same on every CPU.
    fn now_ns(&self) -> u64;
    /// Disables interrupts on this CPU; returns whether they were enabled.
    fn interrupts_off(&self) -> bool;
    /// Restores the interrupt state `interrupts_off` returned.
    fn interrupts_restore(&self, enabled: bool);
    /// Called with interrupts off: enables them and waits for one, atomically (so a
    /// wake-up that arrived since interrupts went off is not lost), and returns with
    /// interrupts enabled.
    fn halt(&self);
    /// Called whenever the CPU shows it is scheduling: at the start of every poll and
    /// at every `should_yield` check (the watchdog counts these, so a task whose poll
    /// never returns and never checks is caught). Nothing by default.
    fn on_turn(&self) {}
}

/// Counters of one CPU's executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Futures polled.
    pub polls: u64,
    /// Tasks this CPU took from other CPUs' queues.
    pub stolen: u64,
    /// Wake-ups (IPIs) this CPU sent to idle CPUs.
    pub wakeups_sent: u64,
    /// Times this CPU halted for lack of work.
    pub idles: u64,
    /// Timers fired.
    pub timers_fired: u64,
    /// Fair tasks (user threads) told to yield by `should_yield`: their slice was over,
    /// or a woken task was due to run first.
    pub preemptions: u64,
    /// Fair tasks this CPU pulled from busier CPUs while it was busy itself (load
    /// balancing; idle stealing is `stolen`).
    pub balanced: u64,
    /// Time spent polling fair tasks (user threads) and kernel tasks, in ns.
    pub fair_ns: u64,
    pub kernel_ns: u64,
}

struct CpuState {
    /// Kernel tasks (no group): FIFO, pinned and stealable.
    pinned: spin::Mutex<TaskQueue>,
    shared: spin::Mutex<TaskQueue>,
    /// Fair tasks (user threads), by virtual runtime.
    fair: spin::Mutex<FairQueue>,
    /// Mirrors of the fair queue's sizes, read without its lock.
    fair_len: AtomicUsize,
    fair_shared_len: AtomicUsize,
    timers: spin::Mutex<TimerList>,
    /// The earliest timer deadline (u64::MAX: none), read without the timers' lock.
    earliest_timer: AtomicU64,
    idle: AtomicBool,
    /// The fair task being polled should yield at its next `should_yield` check.
    preempt: AtomicBool,
    /// A kernel task was queued since the last pass over the kernel queues.
    kernel_waiting: AtomicBool,
    /// The task being polled yielded (`yield_now`): read and cleared after the poll.
    yielded: AtomicBool,
    /// The virtual runtime of the fair task being polled (u64::MAX: none).
    running_vruntime: AtomicU64,
    /// When the current poll began, and the polled task's runtime before it.
    poll_start_ns: AtomicU64,
    running_base_ns: AtomicU64,
    last_balance_ns: AtomicU64,
    /// A move the task being polled asked for (`Executor::move_to`): 0 for none, else
    /// `(cpu + 1) | PIN_BIT` when it is to be pinned there. Read and cleared by this
    /// CPU right after the poll.
    move_request: AtomicUsize,
    polls: AtomicU64,
    stolen: AtomicU64,
    wakeups_sent: AtomicU64,
    idles: AtomicU64,
    timers_fired: AtomicU64,
    preemptions: AtomicU64,
    balanced: AtomicU64,
    fair_ns: AtomicU64,
    kernel_ns: AtomicU64,
}

impl CpuState {
    fn new() -> Self {
        Self {
            pinned: spin::Mutex::new(TaskQueue::new()),
            shared: spin::Mutex::new(TaskQueue::new()),
            fair: spin::Mutex::new(FairQueue::new()),
            fair_len: AtomicUsize::new(0),
            fair_shared_len: AtomicUsize::new(0),
            timers: spin::Mutex::new(TimerList::new()),
            earliest_timer: AtomicU64::new(u64::MAX),
            idle: AtomicBool::new(false),
            preempt: AtomicBool::new(false),
            kernel_waiting: AtomicBool::new(false),
            yielded: AtomicBool::new(false),
            running_vruntime: AtomicU64::new(u64::MAX),
            poll_start_ns: AtomicU64::new(0),
            running_base_ns: AtomicU64::new(0),
            last_balance_ns: AtomicU64::new(0),
            move_request: AtomicUsize::new(0),
            polls: AtomicU64::new(0),
            stolen: AtomicU64::new(0),
            wakeups_sent: AtomicU64::new(0),
            idles: AtomicU64::new(0),
            timers_fired: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            balanced: AtomicU64::new(0),
            fair_ns: AtomicU64::new(0),
            kernel_ns: AtomicU64::new(0),
        }
    }

    /// Records the earliest deadline of `timers` (this CPU's list, locked).
    fn note_earliest(&self, timers: &TimerList) {
        let earliest = timers.first_key_value().map_or(u64::MAX, |(&(d, _), _)| d);
        self.earliest_timer.store(earliest, Ordering::Relaxed);
    }

    /// Updates the lock-free mirrors of the fair queue's sizes (called with it locked).
    fn fair_sizes(&self, queue: &FairQueue) {
        self.fair_len.store(queue.len(), Ordering::Relaxed);
        self.fair_shared_len
            .store(queue.shared_len(), Ordering::Relaxed);
    }
}

const PIN_BIT: usize = 1 << (usize::BITS - 1);

/// How many tasks one steal moves at most (they are moved through a fixed array, so
/// stealing does not allocate either).
const STEAL_BATCH: usize = 32;

/// An executor serving `cpus` CPUs.
pub struct Executor<P: Platform> {
    platform: P,
    cpus: Vec<CachePadded<CpuState>>,
    timer_seq: AtomicU64,
    idle_work: spin::Once<fn() -> bool>,
    live_tasks: AtomicUsize,
}

impl<P: Platform> Executor<P> {
    /// An executor for CPUs `0..cpus`.
    pub fn new(platform: P, cpus: usize) -> Self {
        let cpus = cpus.clamp(1, MAX_CPUS);
        Self {
            platform,
            cpus: (0..cpus)
                .map(|_| CachePadded::new(CpuState::new()))
                .collect(),
            timer_seq: AtomicU64::new(0),
            idle_work: spin::Once::new(),
            live_tasks: AtomicUsize::new(0),
        }
    }

    /// The platform this executor runs on.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Number of CPUs served.
    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    /// Tasks spawned and not yet finished.
    pub fn live_tasks(&self) -> usize {
        self.live_tasks.load(Ordering::Acquire)
    }

    /// Task structures still in memory, finished or not: a finished task's structure
    /// stays while some waker still names it (leak checks compare this).
    pub fn task_structs(&self) -> usize {
        crate::task::TASK_STRUCTS.load(Ordering::Relaxed)
    }

    /// Work to do before halting (e.g. zeroing frames): called when a CPU has nothing to
    /// run; returns whether it did something (then the CPU looks for tasks again
    /// instead of halting). Set once; later calls are ignored.
    pub fn set_idle_work(&self, work: fn() -> bool) {
        self.idle_work.call_once(|| work);
    }

    fn with_interrupts_off<R>(&self, f: impl FnOnce() -> R) -> R {
        let enabled = self.platform.interrupts_off();
        let r = f();
        self.platform.interrupts_restore(enabled);
        r
    }

    /// The calling CPU's index. A CPU the executor does not serve calling in is a
    /// kernel bug (bring-up admitted a CPU after the executor was built): it panics
    /// here, by name, instead of being folded onto another CPU's queues.
    fn current(&self) -> usize {
        let cpu = self.platform.cpu_index();
        self.served(cpu, "the calling CPU")
    }

    /// `cpu`, checked against the CPUs served (panics naming `what` otherwise: callers
    /// pass indices below `cpu_count()`).
    #[track_caller]
    fn served(&self, cpu: usize, what: &str) -> usize {
        assert!(
            cpu < self.cpus.len(),
            "executor: {what} is cpu {cpu}, but only CPUs 0..{} are served",
            self.cpus.len()
        );
        cpu
    }

    /// Spawns `future` on the calling CPU; idle CPUs may steal it.
    pub fn spawn<T, F>(&'static self, future: F) -> JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.spawn_inner(self.current(), false, None, future)
    }

    /// A new scheduling group (the kernel makes one per process): tasks spawned in it
    /// with `spawn_in` are fair tasks, and the group shares each CPU equally with the
    /// other groups there however many tasks it has.
    pub fn new_group(&self) -> Arc<Group> {
        Group::new(self.cpus.len())
    }

    /// Spawns `future` as a fair task of `group`: on CPU `cpu` (the calling CPU if
    /// `None`), pinned there with `pin` (only that CPU will ever poll it), otherwise
    /// stealable.
    pub fn spawn_in<T, F>(
        &'static self,
        group: &Arc<Group>,
        cpu: Option<CpuId>,
        pin: bool,
        future: F,
    ) -> JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let cpu = match cpu {
            Some(cpu) => self.served(cpu.index(), "spawn_in's target"),
            None => self.current(),
        };
        self.spawn_inner(cpu, pin, Some(group.clone()), future)
    }

    /// Spawns `future` on CPU `cpu`; idle CPUs may steal it.
    pub fn spawn_on<T, F>(&'static self, cpu: CpuId, future: F) -> JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let cpu = self.served(cpu.index(), "spawn_on's target");
        self.spawn_inner(cpu, false, None, future)
    }

    /// Spawns `future` on CPU `cpu`, which alone will ever poll it.
    pub fn spawn_pinned<T, F>(&'static self, cpu: CpuId, future: F) -> JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let cpu = self.served(cpu.index(), "spawn_pinned's target");
        self.spawn_inner(cpu, true, None, future)
    }

    fn spawn_inner<T, F>(
        &'static self,
        cpu: usize,
        pinned: bool,
        group: Option<Arc<Group>>,
        future: F,
    ) -> JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let state = Arc::new(spin::Mutex::new(JoinState {
            result: None,
            waker: None,
        }));
        let done = state.clone();
        let wrapped = async move {
            let result = future.await;
            let waker = {
                let mut s = done.lock();
                s.result = Some(result);
                s.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        };
        self.live_tasks.fetch_add(1, Ordering::AcqRel);
        let fair = group.is_some();
        // A new fair task starts one weighted minimum slice behind the CPU's smallest
        // virtual runtime, where its group's other tasks will be after their next
        // slice: so a process that spawns threads in a loop cannot push its new ones
        // ahead of the tasks already waiting there (placing them at the front, as a
        // first version did, let two processes spawning 1,023 threads each hold the
        // smallest virtual runtime back while the older threads waited for tens of
        // seconds).
        let vruntime = match &group {
            Some(group) => {
                let min = self.with_interrupts_off(|| self.cpus[cpu].fair.lock().min_vruntime);
                let weight = u64::from(group.runnable_on(cpu)) + 1;
                min.saturating_add(fair::MIN_GRANULARITY_NS.saturating_mul(weight))
            }
            None => 0,
        };
        let task = Task::new(Box::pin(wrapped), cpu, pinned, self, group, vruntime);
        if fair {
            self.insert_fair(cpu, task, false);
        } else {
            self.enqueue(task);
        }
        // New shared work on a busy CPU: let one idle CPU come and steal it.
        let target = &self.cpus[cpu];
        let queued = if fair {
            target.fair_shared_len.load(Ordering::Relaxed)
        } else {
            self.with_interrupts_off(|| target.shared.lock().len())
        };
        if !pinned && queued > 1 {
            if let Some(idle) =
                (0..self.cpus.len()).find(|&c| c != cpu && self.cpus[c].idle.load(Ordering::SeqCst))
            {
                self.send_wakeup(idle);
            }
        }
        JoinHandle { state }
    }

    fn send_wakeup(&self, cpu: usize) {
        self.cpus[self.current()]
            .wakeups_sent
            .fetch_add(1, Ordering::Relaxed);
        self.platform.wake_cpu(cpu);
    }

    /// Runs CPU `cpu`'s loop forever. The kernel calls this at the end of boot on every
    /// CPU.
    pub fn run(&'static self) -> ! {
        loop {
            self.turn();
        }
    }

    /// Runs the calling CPU's loop until `done()` holds (checked between turns).
    pub fn run_until(&'static self, done: impl Fn() -> bool) {
        while !done() {
            self.turn();
        }
    }

    /// One turn: fire timers, poll the kernel tasks queued (each once) and one fair
    /// task, balance now and then; else steal, else idle work, else halt.
    fn turn(&'static self) {
        self.platform.on_turn();
        let cpu = self.current();
        self.fire_timers(cpu);
        let polled = self.run_pass(cpu) + self.run_fair(cpu);
        if polled > 0 {
            self.balance(cpu);
            return;
        }
        if self.steal(cpu) > 0 {
            return;
        }
        if let Some(work) = self.idle_work.get() {
            if work() {
                return;
            }
        }
        self.go_idle(cpu);
    }

    fn queued(&self, cpu: usize) -> usize {
        let state = &self.cpus[cpu];
        self.with_interrupts_off(|| state.pinned.lock().len() + state.shared.lock().len())
            + state.fair_len.load(Ordering::Relaxed)
    }

    /// Polls at most the kernel tasks queued when the pass began, pinned and shared
    /// queues each by its own count, so neither can starve the other.
    fn run_pass(&'static self, cpu: usize) -> usize {
        let state = &self.cpus[cpu];
        state.kernel_waiting.store(false, Ordering::Relaxed);
        let mut polled = 0;
        for queue in [&state.pinned, &state.shared] {
            let budget = self.with_interrupts_off(|| queue.lock().len());
            for _ in 0..budget {
                let Some(task) = self.with_interrupts_off(|| queue.lock().pop_front()) else {
                    break;
                };
                self.poll(cpu, task);
                polled += 1;
            }
        }
        polled
    }

    /// Polls the fair task with the smallest virtual runtime, if any.
    fn run_fair(&'static self, cpu: usize) -> usize {
        let state = &self.cpus[cpu];
        let task = self.with_interrupts_off(|| {
            let mut queue = state.fair.lock();
            let task = queue.pop_first();
            state.fair_sizes(&queue);
            task
        });
        match task {
            Some(task) => {
                self.poll(cpu, task);
                1
            }
            None => 0,
        }
    }

    fn poll(&'static self, cpu: usize, task: Arc<Task>) {
        debug_assert_eq!(task.state.load(Ordering::Acquire), SCHEDULED);
        task.state.store(RUNNING, Ordering::Release);
        if !task.pinned.load(Ordering::Relaxed) {
            task.cpu.store(cpu, Ordering::Relaxed);
        }
        let state = &self.cpus[cpu];
        state.polls.fetch_add(1, Ordering::Relaxed);
        self.platform.on_turn();
        let fair = task.group.is_some();
        let start = self.platform.now_ns();
        state.poll_start_ns.store(start, Ordering::Relaxed);
        state
            .running_base_ns
            .store(task.runtime_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        if fair {
            state.preempt.store(false, Ordering::Relaxed);
            state
                .running_vruntime
                .store(task.vruntime.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let finished = {
            let mut slot = task.future.lock();
            let ready = match slot.as_mut() {
                Some(future) => future.as_mut().poll(&mut cx).is_ready(),
                None => true,
            };
            if ready {
                *slot = None;
            }
            ready
        };
        let ran = self.platform.now_ns().saturating_sub(start);
        task.runtime_ns.fetch_add(ran, Ordering::Relaxed);
        if let Some(group) = &task.group {
            state.running_vruntime.store(u64::MAX, Ordering::Relaxed);
            state.fair_ns.fetch_add(ran, Ordering::Relaxed);
            group.charge(ran);
            // Weighted: the more runnable tasks the group has here, the faster each
            // one's virtual runtime grows, so the group as a whole gets one share.
            let weight = u64::from(group.runnable_on(cpu).max(1));
            task.vruntime
                .fetch_add(ran.saturating_mul(weight), Ordering::Relaxed);
        } else {
            state.kernel_ns.fetch_add(ran, Ordering::Relaxed);
        }
        let request = state.move_request.swap(0, Ordering::Relaxed);
        let yielded = state.yielded.swap(false, Ordering::Relaxed);
        // Not runnable here any more (blocked, finished or moving): the requeue below
        // counts it again where it goes. Before the state change, so a waker on another
        // CPU that queues it meanwhile finds it uncounted.
        task.uncount();
        if finished {
            task.state.store(DONE, Ordering::Release);
            self.live_tasks.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        if request != 0 {
            // The task asked to move (and woke itself): its next queue is the target's.
            // `move_to` checked the target.
            let target = (request & !PIN_BIT) - 1;
            if fair && target != cpu {
                self.renormalize(&task, cpu, target);
            }
            task.cpu.store(target, Ordering::Relaxed);
            task.pinned.store(request & PIN_BIT != 0, Ordering::Relaxed);
        }
        if task
            .state
            .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Woken while running: back of the queue (kernel tasks) or in order of its
            // virtual runtime (fair tasks), so it cannot starve the others.
            debug_assert_eq!(task.state.load(Ordering::Acquire), WOKEN);
            task.state.store(SCHEDULED, Ordering::Release);
            if fair {
                let target = task.cpu.load(Ordering::Relaxed);
                if yielded && target == cpu {
                    self.behind_first(cpu, &task);
                }
                self.insert_fair(target, task, false);
            } else {
                self.enqueue(task);
            }
        }
    }

    /// Raises `task`'s virtual runtime past that of the first fair task waiting on CPU
    /// `cpu`, if any (see `yield_now`).
    fn behind_first(&self, cpu: usize, task: &Task) {
        let first = self.with_interrupts_off(|| self.cpus[cpu].fair.lock().first_vruntime());
        if let Some(first) = first {
            task.vruntime
                .fetch_max(first.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Moves a fair task's virtual runtime from CPU `from`'s scale to CPU `to`'s: it
    /// keeps its lag behind (or lead over) the smallest virtual runtime.
    fn renormalize(&self, task: &Task, from: usize, to: usize) {
        // One lock at a time: holding both (as one expression's temporaries would)
        // deadlocks two CPUs moving tasks towards each other.
        let from_min = self.with_interrupts_off(|| self.cpus[from].fair.lock().min_vruntime);
        let to_min = self.with_interrupts_off(|| self.cpus[to].fair.lock().min_vruntime);
        let v = fair::rescale(task.vruntime.load(Ordering::Relaxed), from_min, to_min);
        task.vruntime.store(v, Ordering::Relaxed);
    }

    /// Queues fair task `task` on CPU `cpu`. A task that was asleep (`woken`) is placed
    /// no further back than `SLEEPER_CREDIT_NS` behind the CPU's smallest virtual
    /// runtime, and preempts the task running there if it is further ahead than
    /// `WAKEUP_GRANULARITY_NS`.
    fn insert_fair(&self, cpu: usize, task: Arc<Task>, woken: bool) {
        let state = &self.cpus[cpu];
        let v = self.with_interrupts_off(|| {
            let mut queue = state.fair.lock();
            let mut v = task.vruntime.load(Ordering::Relaxed);
            if woken {
                v = v.max(queue.min_vruntime.saturating_sub(fair::SLEEPER_CREDIT_NS));
            }
            task.count_on(cpu);
            v = v.min(fair::max_vruntime(&queue, &task, cpu));
            task.vruntime.store(v, Ordering::Relaxed);
            queue.insert(task);
            state.fair_sizes(&queue);
            v
        });
        let running = state.running_vruntime.load(Ordering::Relaxed);
        if woken && running != u64::MAX && running > v.saturating_add(fair::WAKEUP_GRANULARITY_NS) {
            state.preempt.store(true, Ordering::Relaxed);
        }
        if cpu != self.current() && state.idle.load(Ordering::SeqCst) {
            self.send_wakeup(cpu);
        }
    }

    /// Whether the fair task being polled on this CPU should yield now: its slice is
    /// over (the slice shrinks as the CPU's run queue grows: `fair::slice_ns`; a queued
    /// kernel task counts as one more), or a woken task is due to preempt it. It also fires this CPU's due
    /// timers (whose sleepers may be what is waiting), so a thread that is woken by
    /// its timer while others spin runs at the next check, not after a whole round,
    /// and balances load (`balance`), so a CPU busy with one thread still pulls.
    /// User threads call it at every trap; the watchdog counts it as progress.
    pub fn should_yield(&'static self) -> bool {
        self.platform.on_turn();
        let cpu = self.current();
        let state = &self.cpus[cpu];
        let now = self.platform.now_ns();
        // A timer that fired here woke a sleeper (or a timed wait) that should run
        // now, not at the end of this slice: yield to it.
        let fired =
            now >= state.earliest_timer.load(Ordering::Relaxed) && self.fire_timers(cpu) > 0;
        // A CPU whose one thread never blocks must still take its share of a busier
        // CPU's threads: balancing is checked here too, not only between polls.
        self.balance(cpu);
        let yield_now = fired || state.preempt.load(Ordering::Relaxed) || {
            let runnable = state.fair_len.load(Ordering::Relaxed)
                + usize::from(state.kernel_waiting.load(Ordering::Relaxed));
            runnable > 0 && {
                let ran = now.saturating_sub(state.poll_start_ns.load(Ordering::Relaxed));
                // Half a tick of slack: a slice of one tick ends at the first tick
                // after it began, not the second.
                ran + fair::MIN_GRANULARITY_NS / 2 >= fair::slice_ns(runnable + 1)
            }
        };
        if yield_now {
            state.preemptions.fetch_add(1, Ordering::Relaxed);
        }
        yield_now
    }

    /// CPU time of the task being polled on this CPU, in ns, up to now.
    pub fn current_cpu_time_ns(&self) -> u64 {
        let state = &self.cpus[self.current()];
        let ran = self
            .platform
            .now_ns()
            .saturating_sub(state.poll_start_ns.load(Ordering::Relaxed));
        state.running_base_ns.load(Ordering::Relaxed) + ran
    }

    /// CPU time of `group`, in ns, up to now, counting the running poll when the caller
    /// is one of its tasks.
    pub fn group_cpu_time_ns(&self, group: &Group) -> u64 {
        let state = &self.cpus[self.current()];
        let ran = self
            .platform
            .now_ns()
            .saturating_sub(state.poll_start_ns.load(Ordering::Relaxed));
        group.cpu_time_ns() + ran
    }

    /// Every `BALANCE_INTERVAL_NS`, a busy CPU pulls shared fair tasks from the busiest
    /// CPU when that one has at least two more runnable than this one: half the
    /// difference, at most `STEAL_BATCH`. (An idle CPU steals instead: `steal`.)
    fn balance(&self, cpu: usize) {
        let n = self.cpus.len();
        if n < 2 {
            return;
        }
        let state = &self.cpus[cpu];
        let now = self.platform.now_ns();
        let last = state.last_balance_ns.load(Ordering::Relaxed);
        if now.saturating_sub(last) < fair::BALANCE_INTERVAL_NS {
            return;
        }
        state.last_balance_ns.store(now, Ordering::Relaxed);
        let mine = state.fair_len.load(Ordering::Relaxed);
        let Some((busiest, load)) = (0..n)
            .filter(|&c| c != cpu)
            .map(|c| (c, self.cpus[c].fair_shared_len.load(Ordering::Relaxed)))
            .max_by_key(|&(_, load)| load)
        else {
            return;
        };
        if load < mine + 2 {
            return;
        }
        let want = ((load - mine) / 2).clamp(1, STEAL_BATCH);
        let moved = self.pull_fair(busiest, cpu, want);
        state.balanced.fetch_add(moved as u64, Ordering::Relaxed);
    }

    /// Moves up to `want` shared fair tasks from CPU `from` to CPU `to`, those that
    /// would have run last on `from` first. Returns how many moved.
    fn pull_fair(&self, from: usize, to: usize, want: usize) -> usize {
        let mut batch: [Option<Arc<Task>>; STEAL_BATCH] = [const { None }; STEAL_BATCH];
        let (taken, from_min) = self.with_interrupts_off(|| {
            let mut queue = self.cpus[from].fair.lock();
            let mut taken = 0;
            while taken < want.min(STEAL_BATCH) {
                match queue.pop_last_shared() {
                    Some(task) => {
                        batch[taken] = Some(task);
                        taken += 1;
                    }
                    None => break,
                }
            }
            self.cpus[from].fair_sizes(&queue);
            (taken, queue.min_vruntime)
        });
        if taken == 0 {
            return 0;
        }
        let state = &self.cpus[to];
        self.with_interrupts_off(|| {
            let mut queue = state.fair.lock();
            let to_min = queue.min_vruntime;
            for task in batch.iter_mut().filter_map(Option::take) {
                let v = fair::rescale(task.vruntime.load(Ordering::Relaxed), from_min, to_min);
                task.cpu.store(to, Ordering::Relaxed);
                task.count_on(to);
                let v = v.min(fair::max_vruntime(&queue, &task, to));
                task.vruntime.store(v, Ordering::Relaxed);
                queue.insert(task);
            }
            state.fair_sizes(&queue);
        });
        taken
    }

    /// Takes up to half of another CPU's shared kernel queue (at most `STEAL_BATCH`),
    /// or failing that, of its shared fair tasks.
    fn steal(&self, cpu: usize) -> usize {
        let n = self.cpus.len();
        for offset in 1..n {
            let victim = (cpu + offset) % n;
            let mut batch: [Option<Arc<Task>>; STEAL_BATCH] = [const { None }; STEAL_BATCH];
            let taken = self.with_interrupts_off(|| {
                let mut queue = self.cpus[victim].shared.lock();
                let want = queue.len().div_ceil(2).min(STEAL_BATCH);
                let mut taken = 0;
                while taken < want {
                    match queue.pop_front() {
                        Some(task) => {
                            batch[taken] = Some(task);
                            taken += 1;
                        }
                        None => break,
                    }
                }
                taken
            });
            let taken = if taken > 0 {
                self.with_interrupts_off(|| {
                    let mut mine = self.cpus[cpu].shared.lock();
                    for task in batch.iter_mut().filter_map(Option::take) {
                        task.cpu.store(cpu, Ordering::Relaxed);
                        mine.push_back(task);
                    }
                });
                taken
            } else {
                let fair = self.cpus[victim].fair_shared_len.load(Ordering::Relaxed);
                if fair == 0 {
                    continue;
                }
                self.pull_fair(victim, cpu, fair.div_ceil(2))
            };
            if taken == 0 {
                continue;
            }
            self.cpus[cpu]
                .stolen
                .fetch_add(taken as u64, Ordering::Relaxed);
            return taken;
        }
        0
    }

    fn has_work_anywhere(&self, cpu: usize) -> bool {
        self.queued(cpu) > 0
            || self.timer_due(cpu)
            || (0..self.cpus.len()).any(|c| {
                c != cpu
                    && (self.cpus[c].fair_shared_len.load(Ordering::Relaxed) > 0
                        || self.with_interrupts_off(|| self.cpus[c].shared.lock().len()) > 0)
            })
    }

    fn go_idle(&self, cpu: usize) {
        let state = &self.cpus[cpu];
        let enabled = self.platform.interrupts_off();
        // Announce idleness, then look once more: a waker that queued work before the
        // flag was visible is seen here; one that queues after sees the flag and sends
        // a wake-up, which (interrupts being off) stays pending until `halt`.
        state.idle.store(true, Ordering::SeqCst);
        if self.has_work_anywhere(cpu) {
            state.idle.store(false, Ordering::SeqCst);
            self.platform.interrupts_restore(enabled);
            return;
        }
        state.idles.fetch_add(1, Ordering::Relaxed);
        self.platform.halt();
        state.idle.store(false, Ordering::SeqCst);
        self.platform.interrupts_restore(enabled);
    }

    fn timer_due(&self, cpu: usize) -> bool {
        let now = self.platform.now_ns();
        self.with_interrupts_off(|| {
            self.cpus[cpu]
                .timers
                .lock()
                .first_key_value()
                .is_some_and(|(&(deadline, _), _)| deadline <= now)
        })
    }

    /// Fires CPU `cpu`'s due timers; returns how many.
    fn fire_timers(&self, cpu: usize) -> u64 {
        let mut fired = 0;
        loop {
            let now = self.platform.now_ns();
            let mut due: [Option<Waker>; 16] = [const { None }; 16];
            let count = self.with_interrupts_off(|| {
                let mut timers = self.cpus[cpu].timers.lock();
                let mut count = 0;
                while count < due.len() {
                    match timers.first_entry() {
                        Some(entry) if entry.key().0 <= now => {
                            due[count] = Some(entry.remove());
                            count += 1;
                        }
                        _ => break,
                    }
                }
                self.cpus[cpu].note_earliest(&timers);
                count
            });
            for waker in due.iter_mut().filter_map(Option::take) {
                waker.wake();
            }
            self.cpus[cpu]
                .timers_fired
                .fetch_add(count as u64, Ordering::Relaxed);
            fired += count as u64;
            if count < due.len() {
                return fired;
            }
        }
    }

    /// The earliest timer deadline on CPU `cpu`, for programming a one-shot timer.
    pub fn next_deadline(&self, cpu: CpuId) -> Option<u64> {
        self.with_interrupts_off(|| {
            self.cpus[cpu.index()]
                .timers
                .lock()
                .first_key_value()
                .map(|(&(deadline, _), _)| deadline)
        })
    }

    /// Timer entries armed on CPU `cpu` and not yet fired or cancelled (one per pending
    /// `Sleep` that was polled there first).
    pub fn armed_timers(&self, cpu: CpuId) -> usize {
        self.with_interrupts_off(|| self.cpus[cpu.index()].timers.lock().len())
    }

    /// A future that completes `ns` nanoseconds from now.
    pub fn sleep(&'static self, ns: u64) -> Sleep {
        Sleep::new(self.platform.now_ns().saturating_add(ns), self)
    }

    /// A future that completes at `deadline_ns` on the executor's clock.
    pub fn sleep_until(&'static self, deadline_ns: u64) -> Sleep {
        Sleep::new(deadline_ns, self)
    }

    /// Yields once: the task goes to the back of its queue.
    /// A fair task that yields goes behind the first task waiting on its CPU (its
    /// virtual runtime is raised past that task's), so at least one other task runs
    /// before it: ordered by virtual runtime alone, a task that yields after running
    /// for a microsecond would be picked again at once.
    pub fn yield_now(&'static self) -> YieldNow<P> {
        YieldNow {
            executor: self,
            yielded: false,
        }
    }

    /// Moves the calling task to CPU `cpu` (one of the CPUs served): the future
    /// completes once the task is polled there. With `pin`, only that CPU will poll it
    /// from then on; without, it is shared (stealable) again.
    pub fn move_to(&'static self, cpu: CpuId, pin: bool) -> MoveTo<P> {
        MoveTo {
            executor: self,
            cpu: self.served(cpu.index(), "move_to's target"),
            pin,
            asked: false,
        }
    }

    /// Whether CPU `cpu` has tasks queued (besides the one it may be polling now).
    pub fn has_queued_work(&self, cpu: CpuId) -> bool {
        self.queued(self.served(cpu.index(), "has_queued_work's CPU")) > 0
    }

    /// The calling CPU's index (as the executor sees it).
    pub fn current_cpu(&self) -> usize {
        self.current()
    }

    /// CPU `cpu`'s counters.
    pub fn stats(&self, cpu: CpuId) -> CpuStats {
        let s = &self.cpus[cpu.index()];
        CpuStats {
            polls: s.polls.load(Ordering::Relaxed),
            stolen: s.stolen.load(Ordering::Relaxed),
            wakeups_sent: s.wakeups_sent.load(Ordering::Relaxed),
            idles: s.idles.load(Ordering::Relaxed),
            timers_fired: s.timers_fired.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            balanced: s.balanced.load(Ordering::Relaxed),
            fair_ns: s.fair_ns.load(Ordering::Relaxed),
            kernel_ns: s.kernel_ns.load(Ordering::Relaxed),
        }
    }

    /// Whether CPU `cpu` is halted (or about to be) for lack of work.
    pub fn is_idle(&self, cpu: CpuId) -> bool {
        self.cpus[cpu.index()].idle.load(Ordering::SeqCst)
    }

    /// Wakes the idle CPU nearest to `cpu` (`panda_mm::cpus_nearest_first`), so that
    /// its idle work (zeroing frames for `cpu`'s pool) runs now rather than at its next
    /// timer tick. Returns the CPU woken, or `None` when no other CPU is idle.
    pub fn wake_idle_near(&self, cpu: CpuId) -> Option<CpuId> {
        self.served(cpu.index(), "wake_idle_near's CPU");
        let idle = panda_mm::cpus_nearest_first(cpu, self.cpus.len())
            .find(|&c| self.cpus[c.index()].idle.load(Ordering::SeqCst))?;
        self.send_wakeup(idle.index());
        Some(idle)
    }
}

impl<P: Platform> Scheduler for Executor<P> {
    fn enqueue(&self, task: Arc<Task>) {
        // Every store to `task.cpu` is a served CPU (spawn and move_to check).
        let cpu = task.cpu.load(Ordering::Relaxed);
        if task.group.is_some() {
            // A wake (requeues after a poll go to `insert_fair` directly).
            self.insert_fair(cpu, task, true);
            return;
        }
        let state = &self.cpus[cpu];
        // A kernel task waits: it counts as one more runnable task in the slice of the
        // fair task running there (which yields at the end of that slice).
        state.kernel_waiting.store(true, Ordering::Relaxed);
        self.with_interrupts_off(|| {
            if task.pinned.load(Ordering::Relaxed) {
                state.pinned.lock().push_back(task);
            } else {
                state.shared.lock().push_back(task);
            }
        });
        if cpu != self.current() && state.idle.load(Ordering::SeqCst) {
            self.send_wakeup(cpu);
        }
    }
}

impl<P: Platform> Timers for Executor<P> {
    fn now_ns(&self) -> u64 {
        self.platform.now_ns()
    }

    fn add_timer(&self, deadline_ns: u64, waker: Waker) -> TimerKey {
        let seq = self.timer_seq.fetch_add(1, Ordering::Relaxed);
        let cpu = self.current();
        // Keys are unique (the sequence number is), so nothing is replaced here.
        let replaced = self.with_interrupts_off(|| {
            let mut timers = self.cpus[cpu].timers.lock();
            let replaced = timers.insert((deadline_ns, seq), waker);
            self.cpus[cpu].note_earliest(&timers);
            replaced
        });
        debug_assert!(replaced.is_none());
        TimerKey {
            cpu,
            deadline: deadline_ns,
            seq,
        }
    }

    fn replace_timer_waker(&self, key: TimerKey, waker: Waker) -> Result<Waker, Waker> {
        self.with_interrupts_off(|| {
            match self.cpus[key.cpu]
                .timers
                .lock()
                .get_mut(&(key.deadline, key.seq))
            {
                Some(slot) => Ok(core::mem::replace(slot, waker)),
                None => Err(waker),
            }
        })
    }

    fn cancel_timer(&self, key: TimerKey) -> Option<Waker> {
        // The arming CPU's list, which need not be the calling CPU's: tasks migrate.
        self.with_interrupts_off(|| {
            let mut timers = self.cpus[key.cpu].timers.lock();
            let removed = timers.remove(&(key.deadline, key.seq));
            self.cpus[key.cpu].note_earliest(&timers);
            removed
        })
    }
}

struct JoinState<T> {
    result: Option<T>,
    waker: Option<Waker>,
}

/// The result of a spawned task, as a future.
pub struct JoinHandle<T> {
    state: Arc<spin::Mutex<JoinState<T>>>,
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished (and its result not yet taken).
    pub fn is_finished(&self) -> bool {
        self.state.lock().result.is_some()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut state = self.state.lock();
        match state.result.take() {
            Some(result) => Poll::Ready(result),
            None => {
                if !state
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    state.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// See `Executor::move_to`.
pub struct MoveTo<P: Platform> {
    executor: &'static Executor<P>,
    cpu: usize,
    pin: bool,
    asked: bool,
}

impl<P: Platform> Future for MoveTo<P> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let here = self.executor.current();
        if self.asked && here == self.cpu {
            return Poll::Ready(());
        }
        // Ask (again, if a wake raced the first request) and go round the queues: the
        // executor applies the request right after this poll returns.
        self.asked = true;
        let request = (self.cpu + 1) | if self.pin { PIN_BIT } else { 0 };
        self.executor.cpus[here]
            .move_request
            .store(request, Ordering::Relaxed);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// See `Executor::yield_now`.
pub struct YieldNow<P: Platform> {
    executor: &'static Executor<P>,
    yielded: bool,
}

impl<P: Platform> Future for YieldNow<P> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        // The poll that returns Pending here ends on the CPU that runs it now, which
        // reads (and clears) its flag right after.
        let here = self.executor.current();
        self.executor.cpus[here]
            .yielded
            .store(true, Ordering::Relaxed);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
