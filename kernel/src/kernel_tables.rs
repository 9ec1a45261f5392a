//! The kernel's own page tables: built and edited by `panda_arch::kernel_tables`
//! (platform code: it takes their frames from the boot memory map and switches CR3),
//! named here as the rest of the kernel knows them.

pub use panda_arch::kernel_tables::{BuildError, KernelTables};

use crate::boot::BootInfo;

/// Builds the kernel's page tables from the boot memory map and switches to them.
pub fn build_and_switch(boot: &mut BootInfo) -> Result<KernelTables, BuildError> {
    panda_arch::kernel_tables::build_and_switch(&mut boot.memory_map)
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
