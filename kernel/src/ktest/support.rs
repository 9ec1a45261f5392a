//! The in-kernel tests' harness and shared helpers: the failure type and `ensure!`,
//! the test tables (`tests!`, `async_tests!`) and what several modules' tests share
//! (waiting for a condition, keeping a CPU busy, user reads and writes that resolve
//! demand faults). Each `MODULE/ktests.rs` imports from here; the runner
//! (`crate::ktest`) imports the modules' tables, so nothing imports back up.

// Failures carry their message inline (formatting needs no allocation on a failing
// path); the size only matters on this test path.
#![allow(clippy::result_large_err)]

use alloc::boxed::Box;
use core::fmt::Write;
use core::future::Future;
use core::pin::Pin;

use panda_arch::percpu;
use panda_arch::probe;

use crate::aspace::{AddressSpace, FaultError};
use crate::boot::BootInfo;
use crate::kernel_tables::KernelTables;
use panda_mm::region::{Access, FaultDecision, Rights};
use panda_platform::vm::UserAddr;

/// A failure message, formatted without a heap.
pub struct Failure {
    buf: [u8; 160],
    len: usize,
}

impl Failure {
    pub(crate) fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf8>")
    }
}

impl Write for Failure {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub(crate) type Outcome = Result<(), Failure>;

/// A failure with a formatted message.
pub(crate) fn fail(args: core::fmt::Arguments<'_>) -> Failure {
    let mut f = Failure {
        buf: [0; 160],
        len: 0,
    };
    let _ = f.write_fmt(args);
    f
}

/// Fails the test with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::ktest::support::fail(format_args!($($arg)*)));
        }
    };
}
pub(crate) use ensure;

/// What synchronous tests may look at.
pub(crate) struct Context<'a> {
    pub boot: &'a BootInfo,
    pub tables: &'a KernelTables,
    /// Enabled processors the MADT lists: all must be online.
    pub cpus_expected: usize,
}

pub(crate) type Test = (&'static str, fn(&Context<'_>) -> Outcome);

/// Each test by its function name, which is also its name in the output.
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as fn(&$crate::ktest::support::Context<'_>) -> $crate::ktest::support::Outcome)),*]
    };
}
pub(crate) use tests;

pub(crate) type AsyncTest = (
    &'static str,
    fn() -> Pin<Box<dyn Future<Output = Outcome> + Send>>,
);

/// Tests that run as tasks on the executor (they spawn and await other tasks).
macro_rules! async_tests {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), || alloc::boxed::Box::pin($test()) as core::pin::Pin<alloc::boxed::Box<dyn core::future::Future<Output = $crate::ktest::support::Outcome> + Send>>)),*]
    };
}
pub(crate) use async_tests;

/// Waits up to `ms` milliseconds (TSC) for `done`.
pub(crate) fn wait_for(ms: u64, done: impl Fn() -> bool) -> bool {
    let deadline = panda_arch::time::now_ns() + ms * 1_000_000;
    while panda_arch::time::now_ns() < deadline {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Keeps CPU `cpu` busy, so it never idles (and never zeroes frames ahead): a task
/// pinned there yields until `stop` is set, counting its turns in `spins`.
pub(crate) fn keep_busy(
    cpu: panda_mm::CpuId,
    stop: &'static core::sync::atomic::AtomicBool,
    spins: &'static core::sync::atomic::AtomicU64,
) -> Result<panda_sched::JoinHandle<()>, Failure> {
    let exec = executor()?;
    Ok(exec.spawn_pinned(cpu, async move {
        while !stop.load(core::sync::atomic::Ordering::SeqCst) {
            spins.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            exec.yield_now().await;
        }
    }))
}

/// Empties CPU `cpu`'s zeroed pool (the frames go back to the allocator).
pub(crate) fn empty_pool(cpu: panda_mm::CpuId) {
    while let Some(z) = panda_platform::frame::try_take_zeroed(cpu) {
        drop(z);
    }
}

/// The executor, or a failure if the tests run without one.
pub(crate) fn executor() -> Result<&'static panda_sched::Executor<crate::executor::Machine>, Failure>
{
    crate::executor::get().ok_or_else(|| fail(format_args!("no executor")))
}

/// CPU `index` (a test counting CPUs by number: `0..exec.cpu_count()`) as the
/// `CpuId` the executor and the memory layers take; a failure past `MAX_CPUS`.
pub(crate) fn cpu_id(index: usize) -> Result<panda_mm::CpuId, Failure> {
    panda_mm::CpuId::new(index).ok_or_else(|| fail(format_args!("cpu{index} is past MAX_CPUS")))
}

/// The calling CPU's index (a cross-CPU call's body).
pub(crate) fn report_cpu() -> usize {
    percpu::current_index()
}

/// `addr` as a user address, for tests whose addresses are in the user half by
/// construction (panics otherwise: a test's bug).
pub(crate) fn user_addr(addr: u64) -> UserAddr {
    UserAddr::new(addr).expect("a test's user address is in the user half")
}

/// Reads user memory in the current space, resolving demand faults like a user access.
pub(crate) fn user_read(space: &AddressSpace, addr: u64) -> Result<u64, FaultDecision> {
    match probe::read_user_u64(addr) {
        Ok(v) => Ok(v),
        Err(_) => {
            let at = UserAddr::new(addr).ok_or(FaultDecision::OutsideRegions)?;
            space.handle_fault(at, Access::Read).map_err(denied)?;
            probe::read_user_u64(addr).map_err(|_| FaultDecision::OutsideRegions)
        }
    }
}

/// Writes user memory in the current space, resolving demand faults like a user access.
pub(crate) fn user_write(space: &AddressSpace, addr: u64, value: u64) -> Result<(), FaultDecision> {
    match probe::write_user_u64(addr, value) {
        Ok(()) => Ok(()),
        Err(_) => {
            let at = UserAddr::new(addr).ok_or(FaultDecision::OutsideRegions)?;
            space.handle_fault(at, Access::Write).map_err(denied)?;
            probe::write_user_u64(addr, value).map_err(|_| FaultDecision::ProtectionViolation)
        }
    }
}

/// The tests expect verdicts; running out of memory there is itself a failure,
/// reported as a verdict no test expects.
pub(crate) fn denied(e: FaultError) -> FaultDecision {
    match e {
        FaultError::Denied(d) => d,
        FaultError::OutOfMemory => FaultDecision::DemandZero(Rights {
            write: false,
            execute: false,
        }),
    }
}

/// Flushes `page` from this CPU's TLB (a cross-CPU call's body).
pub(crate) fn invlpg_here(page: u64) -> u64 {
    panda_arch::paging::flush_page(page);
    0
}
