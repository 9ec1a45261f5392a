//! The executor every CPU ends boot in, wired to the hardware.
//!
//! `panda-sched` holds the executor's logic; this module gives it the machine:
//! CPU ids from GS, wake-ups as IPIs, the TSC clock, and `sti; hlt` for idling (a wake
//! IPI or the periodic timer tick ends the halt, and the tick is what fires timers on an
//! otherwise idle CPU).

use panda_arch::{percpu, time};
use panda_platform::ipi;
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
        panda_platform::watchdog::executor_turn();
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

/// Whether the task running on this CPU should yield now (its slice is over, or a
/// woken thread should run first): `Executor::should_yield`. False before the executor
/// exists.
pub fn should_yield() -> bool {
    get().is_some_and(|e| e.should_yield())
}

/// Yields once to the executor: the CPU's other ready tasks run before this one
/// continues (a spin hint before the executor exists). The one yield of the system
/// call `OP_PROCESS_YIELD`, of a thread whose slice is over, and of a fault that found
/// its page table busy.
pub async fn yield_once() {
    match get() {
        Some(exec) => exec.yield_now().await,
        None => core::hint::spin_loop(),
    }
}

/// Yields to the executor if `should_yield` says so: the bounded-work point of long
/// system calls (between pieces of a long log, copy or unmap).
pub async fn yield_if_due() {
    if let Some(exec) = get() {
        if exec.should_yield() {
            exec.yield_now().await;
        }
    }
}

/// The one place a long kernel operation (a system call that works in bounded pieces:
/// a log, an unmap in batches, a long copy to or from user memory) gives its CPU's
/// other tasks a turn: start one per operation and call `maybe_yield` between two
/// pieces. It yields when the scheduler says so (`should_yield`: the slice is over, or
/// a thread woken by its timer, which `should_yield` fires, is due to run first).
pub struct Slice;

impl Slice {
    /// A slice starting now.
    pub fn start() -> Self {
        Self
    }

    /// Yields if this CPU's other tasks should have a turn now.
    pub async fn maybe_yield(&mut self) {
        yield_if_due().await;
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
