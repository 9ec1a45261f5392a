//! `panda-mm`: physical memory policy, host-testable.
//!
//! - `account`: per-process memory accounts, charged up the process tree, with
//!   limits;
//! - `buddy`: the global allocator of physical frames, single frames and contiguous
//!   power-of-two runs, with coalescing;
//! - `cpus`: `MAX_CPUS`, the size of every per-CPU table, `CpuId` (a CPU number
//!   below it) and `PerCpu` (a table indexed only by one), and `cpus_nearest_first`,
//!   the one notion of a near CPU;
//! - `cache`: a per-CPU cache of single frames in front of it, refilled and drained in
//!   batches, so the common allocation and free take no shared lock;
//! - `elf`: the checked load plan of a user executable (goblin parses, this checks);
//! - `zero`: per-CPU pools of frames known to be zero, filled by an idle-time zeroing
//!   pass, and the `ZeroedFrame` type only that pass can make.
//!
//! - `region`: a user address space's regions (segments, break, buffers, stack) and
//!   what a fault in them means;
//! - `slab`: the per-CPU slab layer of the kernel heap (the one module with unsafe
//!   code: it hands out raw memory);
//! - `tlb`: TLB shootdown bookkeeping (active CPUs, generations, frames held until
//!   every target flushed).
//!
//! Apart from `slab`, this crate never touches memory: frames are numbers. Zeroing is a
//! function the kernel passes in (it writes through the HHDM); page tables live in
//! `panda-arch` and address spaces in the kernel.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)] // except `slab`, the lowest layer, which says why

extern crate alloc;

pub mod account;
pub mod buddy;
pub mod cache;
pub mod cpus;
pub mod elf;
pub mod region;
pub mod slab;
pub mod tlb;
pub mod zero;

pub use cpus::{cpus_nearest_first, CpuId, PerCpu, MAX_CPUS};

/// Size of a frame.
pub const FRAME_SIZE: u64 = panda_abi::PAGE_SIZE as u64;

/// A 4 KiB physical frame, by its physical address (always 4 KiB-aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysFrame(pub(crate) u64);

impl PhysFrame {
    /// The frame starting at `addr`, if `addr` is frame-aligned.
    pub const fn from_addr(addr: u64) -> Option<Self> {
        if addr.is_multiple_of(FRAME_SIZE) {
            Some(Self(addr))
        } else {
            None
        }
    }

    /// The frame's physical address.
    pub const fn addr(self) -> u64 {
        self.0
    }
}

/// Why memory could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmError {
    /// No free run of the requested size.
    OutOfMemory,
    /// A frame handed back that was not allocated (double free or foreign frame).
    NotAllocated,
    /// A size or address that breaks an alignment or range rule.
    Invalid,
    /// The range is still being unmapped (retiring): try again shortly.
    Busy,
}
