//! The executor every CPU ends boot in, wired to the hardware.
//!
//! `panda-sched` holds the executor's logic; this module gives it the machine:
//! CPU ids from GS, wake-ups as IPIs, the TSC clock, and `sti; hlt` for idling (a wake
//! IPI or the periodic timer tick ends the halt, and the tick is what fires timers on an
//! otherwise idle CPU).

use panda_arch::{ipi, percpu, time};
use panda_sched::{Executor, Platform};
use x86_64::instructions::interrupts;

/// The kernel's `Platform`.
pub struct Machine;

impl Platform for Machine {
    fn cpu_index(&self) -> usize {
        percpu::current_index()
    }

    fn wake_cpu(&self, cpu: usize) {
        ipi::wake(cpu);
    }

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }

    fn interrupts_off(&self) -> bool {
        let enabled = interrupts::are_enabled();
        interrupts::disable();
        enabled
    }

    fn interrupts_restore(&self, enabled: bool) {
        if enabled {
            interrupts::enable();
        }
    }

    fn halt(&self) {
        interrupts::enable_and_hlt();
    }

    fn on_turn(&self) {
        panda_arch::watchdog::executor_turn();
    }
}

static EXECUTOR: spin::Once<Executor<Machine>> = spin::Once::new();

/// Creates the executor for the CPUs online now and wakes the APs waiting for it.
/// Called once by the boot CPU after bring-up.
pub fn init(cpus: usize) -> &'static Executor<Machine> {
    let executor = EXECUTOR.call_once(|| Executor::new(Machine, cpus));
    if cpus > 1 {
        ipi::wake_all_but_self();
    }
    executor
}

/// A time slice's mark: which timer tick of which CPU it started at. A task that runs
/// long stretches without blocking (a user thread of back-to-back system calls, a long
/// copy to user memory) yields when the mark has changed, so its CPU's other tasks wait
/// at most about one tick.
pub fn slice_mark() -> (usize, u64) {
    let ticks =
        percpu::current().map_or(0, |c| c.ticks.load(core::sync::atomic::Ordering::Relaxed));
    (percpu::current_index(), ticks)
}

/// The one place that decides when a long kernel operation (a system call that works in
/// bounded pieces: a log, an unmap in batches, a long copy to or from user memory)
/// gives its CPU's other tasks a turn. Start one per operation and call `maybe_yield`
/// between two pieces; it yields when
/// - the time slice is over (this CPU's timer ticked since the operation started or
///   last yielded), so a CPU-bound neighbour gets its turn at each tick as it would
///   against a thread in user mode; or
/// - a timer of this CPU is due: a sleeper (a thread whose sleep ended, a timed wait)
///   runs within one piece instead of waiting for the next tick. Timers fire in the
///   executor's turns, so the first yield lets the turn fire it (its task is queued
///   behind this one) and a second puts this task behind it.
///
/// The scheduler's own `should_yield()`, once it has one, replaces the two checks here
/// (and nothing else needs to change).
pub struct Slice {
    mark: (usize, u64),
}

impl Slice {
    /// A slice starting now.
    pub fn start() -> Self {
        Self { mark: slice_mark() }
    }

    /// Yields if this CPU's other tasks should have a turn now (see the type's doc).
    pub async fn maybe_yield(&mut self) {
        let Some(exec) = get() else { return };
        let slice_over = slice_mark() != self.mark;
        let timer_due = exec
            .next_deadline(percpu::current_index())
            .is_some_and(|deadline| deadline <= time::now_ns());
        if slice_over || timer_due {
            exec.yield_now().await;
            if timer_due {
                exec.yield_now().await;
            }
            self.mark = slice_mark();
        }
    }
}

/// The executor (after `init`).
pub fn get() -> Option<&'static Executor<Machine>> {
    EXECUTOR.get()
}

/// Where every CPU ends boot: waits for the executor to exist, then runs it forever.
pub fn run_this_cpu() -> ! {
    // Halt rather than spin while the boot CPU is still starting others: with more
    // vCPUs than host cores, spinning APs would slow everyone's start.
    let executor = loop {
        if let Some(e) = EXECUTOR.get() {
            break e;
        }
        interrupts::enable_and_hlt();
    };
    interrupts::enable();
    executor.run()
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
