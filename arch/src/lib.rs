//! `panda-arch`: the x86_64 mechanisms Panda stands on.
//!
//! This crate owns every instruction the kernel needs and the unsafe code around them:
//! the two boot entries (PVH's 32-bit start and Limine's 64-bit one, with the Limine
//! requests) and the hand-over to the kernel (`boot::entry`), the boot front-ends and
//! the boot memory map, the boot CPU's stacks with their guard pages, COM1 and the screen console,
//! control-register and CPUID set-up, the GDT/TSS, the IDT with its trap entry stubs,
//! recoverable memory probes (an exception table), the TSC clock, page-table entry
//! formats and CR3, the kernel's own page tables (`kernel_tables`), starting the APs,
//! and leaving the machine (ACPI power-off, reset, QEMU's exit device).
//!
//! Everything above it calls the safe functions here: `mm` and `sched` do not depend on
//! it at all (they are host-tested), and `kernel` builds under `#![forbid(unsafe_code)]`. Each `unsafe` block carries
//! a `// SAFETY:` line that names the invariant it relies on; a safe function here must
//! be sound whatever its caller passes.
//!
//! Modules import only modules below them, ground first:
//! - `cpu`, `image`, `memory_map`, `addr` (user addresses as checked values), and the
//!   layout constants here;
//! - `probe`, `paging`, `stacks`; then `percpu`, `backtrace`, `pvh` (PVH's structures);
//! - `gdt`, `kernel_tables`;
//! - `screen`, `time`, then `serial`, `apic`, `power`, `acpi`;
//! - `trap` (the dispatcher; `user` registers its exit with it), then `idt`, `user`;
//! - `smp` and `boot` (the entry, the front-ends and `BootInfo`) at the top.
//!
//! Where a lower layer needs a higher one at run time, the higher one registers a typed
//! function with it (`trap::set_user_exit`, `trap::set_handler`) or passes what it
//! needs as an argument (`percpu::install` takes the TSS.RSP0 address from `gdt`).
#![no_std]

extern crate alloc;

pub mod acpi;
pub mod addr;
pub mod apic;
pub mod backtrace;
pub mod boot;
pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod image;
pub mod kernel_tables;
pub mod memory_map;
pub mod paging;
pub mod percpu;
pub mod power;
pub mod probe;
pub mod pvh;
pub mod screen;
pub mod serial;
pub mod smp;
pub mod stacks;
pub mod time;
pub mod trap;
pub mod user;

/// Base of the kernel image's virtual addresses: the top 2 GiB, as the kernel code
/// model requires. The image's physical address is its virtual address minus this on
/// the PVH path; Limine may load it elsewhere and reports where.
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;

/// The higher-half direct map: physical address `p` is at `HHDM_BASE + p`.
/// It equals Limine's default with 4-level paging, so both boot paths agree.
pub const HHDM_BASE: u64 = 0xffff_8000_0000_0000;

/// Physical addresses the HHDM may cover: PML4 slots 256..383 (64 TiB), well clear of
/// the kernel tables' windows (`kernel_tables`), which start at slot 506.
pub const HHDM_LIMIT: u64 = 1 << 46;

// The page size and the end of the user half are part of the address-space contract
// user programs see, so `panda_abi` defines them (`PAGE_SIZE`, `USER_SPACE_END`); these
// are the same values typed as the `u64` addresses the kernel computes with. Nothing
// else spells them.

/// Size of a small page (`panda_abi::PAGE_SIZE`).
pub const PAGE_SIZE: u64 = panda_abi::PAGE_SIZE as u64;

/// End (exclusive) of the user half, the lower canonical half
/// (`panda_abi::USER_SPACE_END`): user addresses are below it.
pub const USER_END: u64 = panda_abi::USER_SPACE_END as u64;

/// Page rounding, defined with the page size in `panda_abi` (re-exported, not copied).
pub use panda_abi::{page_ceil, page_floor, page_offset};
