//! GDT and TSS.
//!
//! Layout (the order `syscall`/`sysret` need: user data right before user code):
//! 0x00 null, 0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code,
//! 0x28 TSS (two slots). The TSS's interrupt stack table gives #DF, NMI and #MC stacks
//! of their own, so they are handled even when the interrupted stack is unusable.

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::percpu::MAX_CPUS;
use crate::stacks::CpuStacks;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// User code selector (RPL 3).
pub const USER_CS: u16 = 0x20 | 3;

/// IST slot (1-based as the IDT encodes it) for double faults.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot for NMIs.
pub const IST_NMI: u8 = 2;
/// IST slot for machine checks.
pub const IST_MACHINE_CHECK: u8 = 3;

static TSS: [spin::Once<TaskStateSegment>; MAX_CPUS] = [const { spin::Once::new() }; MAX_CPUS];
static GDT: [spin::Once<GlobalDescriptorTable<8>>; MAX_CPUS] =
    [const { spin::Once::new() }; MAX_CPUS];

fn build_gdt(tss: &'static TaskStateSegment) -> GlobalDescriptorTable<8> {
    let mut gdt = GlobalDescriptorTable::<8>::new();
    let cs = gdt.append(Descriptor::kernel_code_segment());
    let ds = gdt.append(Descriptor::kernel_data_segment());
    let uds = gdt.append(Descriptor::user_data_segment());
    let ucs = gdt.append(Descriptor::user_code_segment());
    let tss_sel = gdt.append(Descriptor::tss_segment(tss));
    debug_assert_eq!(cs.0, KERNEL_CS);
    debug_assert_eq!(ds.0, KERNEL_DS);
    debug_assert_eq!(uds.0, USER_DS);
    debug_assert_eq!(ucs.0, USER_CS);
    debug_assert_eq!(tss_sel.0, 0x28);
    gdt
}

/// Loads CPU `index`'s GDT and TSS (made on first use) and reloads every segment
/// register. Each CPU has its own TSS, hence its own GDT.
pub(crate) fn init_cpu(index: usize, stacks: &CpuStacks) {
    let tss = TSS[index].call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[(IST_DOUBLE_FAULT - 1) as usize] =
            VirtAddr::new(stacks.double_fault.top);
        tss.interrupt_stack_table[(IST_NMI - 1) as usize] = VirtAddr::new(stacks.nmi.top);
        tss.interrupt_stack_table[(IST_MACHINE_CHECK - 1) as usize] =
            VirtAddr::new(stacks.machine_check.top);
        tss.privilege_stack_table[0] = VirtAddr::new(stacks.kernel.top);
        tss
    });
    let gdt = GDT[index].call_once(|| build_gdt(tss));
    gdt.load();
    // SAFETY: the selectors name the descriptors just loaded: a 64-bit code segment, a
    // data segment, and an available TSS that lives for the kernel's lifetime.
    unsafe {
        CS::set_reg(SegmentSelector(KERNEL_CS));
        SS::set_reg(SegmentSelector(KERNEL_DS));
        DS::set_reg(SegmentSelector(KERNEL_DS));
        ES::set_reg(SegmentSelector(KERNEL_DS));
        // FS and GS selectors are null in long mode; their bases come from MSRs. Loading
        // GS's selector clears its base, so this must precede per-CPU set-up.
        FS::set_reg(SegmentSelector(0));
        GS::set_reg(SegmentSelector(0));
        load_tss(SegmentSelector(0x28));
    }
}

/// Address of CPU `index`'s TSS.RSP0 (the stack ring-3 traps switch to), once its TSS
/// exists; 0 before. The user-mode entry points it at the running kernel stack.
pub fn tss_rsp0_address(index: usize) -> u64 {
    TSS[index].get().map_or(0, |tss| {
        core::ptr::addr_of!(tss.privilege_stack_table) as u64
    })
}

/// The task register's selector (0x28 once the TSS is loaded).
pub fn task_register() -> u16 {
    let tr: u16;
    // SAFETY: STR only reads the task register.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    tr
}
