//! The per-CPU block, reached through GS base.
//!
//! Each CPU's GS base points at its `PerCpu`, whose first field points at itself, so
//! `mov rax, gs:[0]` yields the block's address without a table lookup. Until the boot
//! CPU has installed its block, `current_index()` answers 0. The cores issue adds a
//! block per application processor and the executor and statistics fields.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86_64::registers::model_specific::GsBase;
use x86_64::VirtAddr;

/// One CPU's block. `repr(C)`: `current` reads `self_addr` at offset 0.
#[repr(C)]
pub struct PerCpu {
    self_addr: AtomicU64,
    /// Dense CPU index, 0 for the boot CPU.
    pub index: u32,
    /// Local APIC id.
    pub apic_id: u32,
}

static READY: AtomicBool = AtomicBool::new(false);
static BSP: spin::Once<PerCpu> = spin::Once::new();

/// Installs the boot CPU's block in GS base.
pub fn init_bsp(apic_id: u32) {
    let block = BSP.call_once(|| PerCpu {
        self_addr: AtomicU64::new(0),
        index: 0,
        apic_id,
    });
    let addr = block as *const PerCpu;
    block.self_addr.store(addr as u64, Ordering::Relaxed);
    GsBase::write(VirtAddr::from_ptr(addr));
    READY.store(true, Ordering::Release);
}

/// This CPU's block, if installed.
pub fn current() -> Option<&'static PerCpu> {
    if !READY.load(Ordering::Acquire) {
        return None;
    }
    let ptr: *const PerCpu;
    // SAFETY: once READY is set, GS base on every running CPU points at its PerCpu,
    // whose first word is its own address.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) ptr, options(nostack, readonly, preserves_flags));
        Some(&*ptr)
    }
}

/// This CPU's dense index (0 before per-CPU set-up).
pub fn current_index() -> u32 {
    current().map_or(0, |c| c.index)
}
