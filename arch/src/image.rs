//! The kernel image: where the linker put its sections (virtual) and where the boot
//! protocol loaded it (physical). The boot front-ends record the physical base; the
//! kernel's page tables (`kernel_tables`) map the image from both.

use core::sync::atomic::{AtomicU64, Ordering};

/// The kernel image's physical base, as the front-end found it (0 before).
static KERNEL_PHYS: AtomicU64 = AtomicU64::new(0);

/// Records the kernel image's physical base (the boot front-ends call it once).
pub(crate) fn set_kernel_phys(phys: u64) {
    KERNEL_PHYS.store(phys, Ordering::Release);
}

/// The kernel image's physical base, as the boot protocol reported it; kept here, where
/// the kernel cannot edit it, for the kernel page tables' image mapping.
pub(crate) fn kernel_phys() -> u64 {
    KERNEL_PHYS.load(Ordering::Acquire)
}

unsafe extern "C" {
    static __kernel_start: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __kernel_end: u8;
}

/// The kernel image's sections, as virtual address ranges (page-aligned by the linker
/// script).
#[derive(Clone, Copy, Debug)]
pub struct KernelImage {
    pub start: u64,
    pub text: (u64, u64),
    pub rodata: (u64, u64),
    /// .data and .bss (including the boot stacks): read-write, no-execute.
    pub data: (u64, u64),
    pub end: u64,
}

/// Where the linker put the kernel's sections.
pub fn kernel_image() -> KernelImage {
    KernelImage {
        start: &raw const __kernel_start as u64,
        text: (&raw const __text_start as u64, &raw const __text_end as u64),
        rodata: (
            &raw const __rodata_start as u64,
            &raw const __rodata_end as u64,
        ),
        data: (
            &raw const __data_start as u64,
            &raw const __kernel_end as u64,
        ),
        end: &raw const __kernel_end as u64,
    }
}
