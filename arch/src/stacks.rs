//! The boot CPU's stacks, each with an unmapped guard page below it.
//!
//! They live in `.bss.stacks`: [guard][boot stack][guard][#DF][guard][NMI][guard][#MC].
//! The kernel's page-table builder leaves every guard page unmapped, so running off the
//! bottom of a stack faults instead of corrupting its neighbour; the fault handlers run
//! on their own IST stacks, so even a boot-stack overflow is reported (as a #DF).
//! Application processors get stacks of their own when they are started.

use core::arch::global_asm;

/// Size of the boot stack.
pub const BOOT_STACK_SIZE: u64 = 64 * 1024;
/// Size of each interrupt-stack-table stack.
pub const IST_STACK_SIZE: u64 = 16 * 1024;

global_asm!(
    r#"
    .section .bss.stacks, "aw", @nobits
    .balign {page}
    .global boot_stack_guard
    boot_stack_guard: .skip {page}
    .skip {boot}
    .global boot_stack_top
    boot_stack_top:
    .global ist_df_guard
    ist_df_guard: .skip {page}
    .skip {ist}
    .global ist_df_top
    ist_df_top:
    .global ist_nmi_guard
    ist_nmi_guard: .skip {page}
    .skip {ist}
    .global ist_nmi_top
    ist_nmi_top:
    .global ist_mc_guard
    ist_mc_guard: .skip {page}
    .skip {ist}
    .global ist_mc_top
    ist_mc_top:
    "#,
    boot = const BOOT_STACK_SIZE,
    ist = const IST_STACK_SIZE,
    page = const crate::PAGE_SIZE,
);

unsafe extern "C" {
    static boot_stack_guard: u8;
    static boot_stack_top: u8;
    static ist_df_guard: u8;
    static ist_df_top: u8;
    static ist_nmi_guard: u8;
    static ist_nmi_top: u8;
    static ist_mc_guard: u8;
    static ist_mc_top: u8;
}

/// A stack as the range it may use, plus the guard page under it.
#[derive(Clone, Copy, Debug)]
pub struct GuardedStack {
    pub guard: u64,
    pub bottom: u64,
    pub top: u64,
}

/// One CPU's stacks: kernel (the boot stack on the boot CPU), double fault, NMI,
/// machine check.
#[derive(Clone, Copy, Debug)]
pub struct CpuStacks {
    pub kernel: GuardedStack,
    pub double_fault: GuardedStack,
    pub nmi: GuardedStack,
    pub machine_check: GuardedStack,
}

impl CpuStacks {
    /// The guard pages, which must stay unmapped.
    pub fn guards(&self) -> [u64; 4] {
        [
            self.kernel.guard,
            self.double_fault.guard,
            self.nmi.guard,
            self.machine_check.guard,
        ]
    }
}

/// A stack whose guard page is at `guard` and whose usable part ends at `top`.
pub fn guarded(guard: u64, top: u64) -> GuardedStack {
    GuardedStack {
        guard,
        bottom: guard + crate::PAGE_SIZE,
        top,
    }
}

/// Addresses of the boot CPU's stacks.
pub fn boot_stacks() -> CpuStacks {
    CpuStacks {
        kernel: guarded(
            &raw const boot_stack_guard as u64,
            &raw const boot_stack_top as u64,
        ),
        double_fault: guarded(&raw const ist_df_guard as u64, &raw const ist_df_top as u64),
        nmi: guarded(
            &raw const ist_nmi_guard as u64,
            &raw const ist_nmi_top as u64,
        ),
        machine_check: guarded(&raw const ist_mc_guard as u64, &raw const ist_mc_top as u64),
    }
}
