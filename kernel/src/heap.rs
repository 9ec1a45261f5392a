//! The kernel heap's start: the early heap's range, taken from the boot memory map. The
//! heap itself (per-CPU slabs over frames, large blocks as frame runs, the early free
//! list) is `panda_platform::heap`, which owns the raw memory; this module re-exports its
//! counters.

pub use panda_platform::heap::{enable_slabs, large_frames, live_bytes, slab_pages, usage};

use crate::boot::BootInfo;

/// Takes `bytes` of usable memory for the early heap. Returns the size, or 0 if none fit.
pub fn init(boot: &mut BootInfo, bytes: u64) -> u64 {
    panda_platform::heap::init_early(&mut boot.memory_map, bytes)
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
