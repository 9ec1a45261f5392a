//! The running CPU as a `CpuId`, the number every per-CPU table of `panda-mm`,
//! `panda-sched` and this crate's memory services is indexed by.
//!
//! `panda-arch` cannot see `panda-mm`, so it numbers CPUs with plain indices below its
//! own `percpu::MAX_CPUS`; this is the one place that turns its number into a
//! `CpuId`.

use panda_arch::percpu;
use panda_mm::{CpuId, MAX_CPUS};

// Every CPU index `panda-arch` hands out (below its `percpu::MAX_CPUS`) must fit the
// per-CPU tables of the executor and the memory layers (`panda_mm::MAX_CPUS`): then
// `current` never fails.
const _: () = assert!(percpu::MAX_CPUS <= MAX_CPUS);

/// The calling CPU. Its arch index is below `percpu::MAX_CPUS`, which the assertion
/// above keeps at or below `panda_mm::MAX_CPUS`, so the conversion cannot fail.
#[inline]
pub fn current() -> CpuId {
    match CpuId::new(percpu::current_index()) {
        Some(cpu) => cpu,
        None => unreachable!(),
    }
}
