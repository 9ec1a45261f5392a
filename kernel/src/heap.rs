//! The kernel heap's start: the early heap's range, taken from the memory map. The
//! heap itself (per-CPU slabs over frames, large blocks as frame runs, the early free
//! list) is `panda_arch::heap`, which owns the raw memory; this module re-exports its
//! counters.

pub use panda_arch::heap::{enable_slabs, large_frames, live_bytes, slab_pages, usage};

use crate::boot::{BootInfo, MemoryKind};

/// Takes `bytes` of usable memory for the early heap. Returns the size, or 0 if none fit.
pub fn init(boot: &mut BootInfo, bytes: u64) -> u64 {
    let Some(phys) = boot
        .memory_map
        .take(bytes, 0x10_0000, u64::MAX, MemoryKind::KernelEarly)
    else {
        return 0;
    };
    #[allow(unsafe_code)]
    // SAFETY: the range was usable RAM and is now claimed in the memory map for the
    // heap alone; the HHDM maps all RAM writable; this runs once, before any allocation.
    unsafe {
        panda_arch::heap::init_early(phys, bytes)
    };
    bytes
}
