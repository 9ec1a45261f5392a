//! Per-CPU blocks, reached through GS base.
//!
//! Every CPU's GS base points at its own `PerCpu` in a static array indexed by the dense
//! CPU index (0 = the boot CPU, 1.. = application processors in start order). The first
//! word of each block holds the block's own address, so `mov rax, gs:[0]` finds it
//! without a lookup. Fields are atomics: a block is written by its owner and read by
//! others (statistics, IPI targets). Before the boot CPU installs its block,
//! `current_index()` answers 0.
//!
//! Code that must stay on one CPU while it uses "this CPU's" data holds a `CpuGuard`,
//! which keeps interrupts off (and so, with no preemption inside the kernel, also keeps
//! the code from moving to another CPU).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use x86_64::instructions::interrupts;
use x86_64::registers::model_specific::GsBase;
use x86_64::VirtAddr;

/// Offsets of the fields the user entry/exit assembly uses.
pub const OFFSET_USER_KERNEL_RSP: usize = 8;
pub const OFFSET_USER_CONTEXT: usize = 16;
pub const OFFSET_USER_SCRATCH: usize = 24;
pub const OFFSET_TSS_RSP0: usize = 32;
const _: () = assert!(core::mem::offset_of!(PerCpu, user_kernel_rsp) == OFFSET_USER_KERNEL_RSP);
const _: () = assert!(core::mem::offset_of!(PerCpu, user_context) == OFFSET_USER_CONTEXT);
const _: () = assert!(core::mem::offset_of!(PerCpu, user_scratch) == OFFSET_USER_SCRATCH);
const _: () = assert!(core::mem::offset_of!(PerCpu, tss_rsp0) == OFFSET_TSS_RSP0);

/// The most CPUs Panda keeps track of (a per-CPU block, stacks, TSS and GDT each).
/// Memory's per-CPU tables (`panda_mm::MAX_CPUS`) hold at least as many; the kernel
/// checks that at build time. Not part of the ABI: programs ask `OP_CPU_COUNT`.
pub const MAX_CPUS: usize = 512;

/// One CPU's block. `repr(C)`: `current` reads `self_addr` at offset 0.
#[repr(C, align(128))]
pub struct PerCpu {
    self_addr: AtomicU64,
    /// Offsets 8..40 are read and written by the user-mode entry/exit assembly
    /// (`user.rs`): the kernel stack pointer saved while user code runs, the
    /// `UserContext` being run, scratch for the syscall entry, and the address of this
    /// CPU's TSS.RSP0.
    user_kernel_rsp: AtomicU64,
    user_context: AtomicU64,
    user_scratch: AtomicU64,
    tss_rsp0: AtomicU64,
    index: AtomicU32,
    apic_id: AtomicU32,
    online: AtomicBool,
    /// Timer interrupts taken.
    pub ticks: AtomicU64,
    /// IPIs received, by kind.
    pub wake_ipis: AtomicU64,
    pub call_ipis: AtomicU64,
    stack_guards: [AtomicU64; 4],
    /// The snapshot number (`user::FpuState`) whose contents this CPU's x87/SSE
    /// registers hold, 0 if none is known; and the count behind this CPU's numbers.
    pub(crate) fpu_loaded: AtomicU64,
    fpu_saves: AtomicU64,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_addr: AtomicU64::new(0),
            user_kernel_rsp: AtomicU64::new(0),
            user_context: AtomicU64::new(0),
            user_scratch: AtomicU64::new(0),
            tss_rsp0: AtomicU64::new(0),
            index: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            online: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            wake_ipis: AtomicU64::new(0),
            call_ipis: AtomicU64::new(0),
            stack_guards: [const { AtomicU64::new(0) }; 4],
            fpu_loaded: AtomicU64::new(0),
            fpu_saves: AtomicU64::new(0),
        }
    }

    /// A number for the x87/SSE state this CPU saves now that no save on any CPU has
    /// used or will use: the CPU's index + 1 in the top 16 bits, its count of saves
    /// below (2^48 saves per CPU before a repeat). Never 0. Only this CPU calls it.
    pub(crate) fn next_fpu_snapshot(&self) -> u64 {
        let n = self.fpu_saves.load(Ordering::Relaxed) + 1;
        self.fpu_saves.store(n, Ordering::Relaxed);
        (self.index() as u64 + 1) << 48 | (n & ((1 << 48) - 1))
    }

    /// Dense CPU index.
    pub fn index(&self) -> usize {
        self.index.load(Ordering::Relaxed) as usize
    }

    /// Local APIC id.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    /// The `UserContext` pointer set while this CPU runs user code.
    pub(crate) fn user_context_ptr(&self) -> u64 {
        self.user_context.load(Ordering::Relaxed)
    }

    /// Guard pages of this CPU's stacks (kernel, #DF, NMI, #MC), for fault reports.
    pub fn stack_guards(&self) -> [u64; 4] {
        core::array::from_fn(|i| self.stack_guards[i].load(Ordering::Relaxed))
    }

    /// Whether the CPU has finished its bring-up.
    #[inline]
    pub fn online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }
}

static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);
static READY: AtomicBool = AtomicBool::new(false);

/// Installs block `index` for the calling CPU in GS base. Each index is installed once,
/// by the CPU it belongs to. `tss_rsp0` is the address of that CPU's TSS.RSP0
/// (`gdt::tss_rsp0_address(index)`), which the user-mode entry writes through.
pub(crate) fn install(
    index: usize,
    apic_id: u32,
    tss_rsp0: u64,
    stacks: &crate::stacks::CpuStacks,
) {
    let block = &CPUS[index];
    for (slot, guard) in block.stack_guards.iter().zip(stacks.guards()) {
        slot.store(guard, Ordering::Relaxed);
    }
    block.index.store(index as u32, Ordering::Relaxed);
    block.apic_id.store(apic_id, Ordering::Relaxed);
    block
        .self_addr
        .store(block as *const PerCpu as u64, Ordering::Relaxed);
    block.tss_rsp0.store(tss_rsp0, Ordering::Relaxed);
    GsBase::write(VirtAddr::from_ptr(block));
    READY.store(true, Ordering::Release);
}

/// Marks the calling CPU online: it now answers IPIs and runs its executor.
pub fn set_online() {
    if let Some(cpu) = current() {
        if !cpu.online.swap(true, Ordering::AcqRel) {
            CPU_COUNT.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// This CPU's block, if installed.
#[inline]
pub fn current() -> Option<&'static PerCpu> {
    READY
        .load(Ordering::Acquire)
        .then(|| &CPUS[current_index()])
}

/// This CPU's index, found through the GS base MSR and checked: safe on a CPU whose
/// block is not installed yet (an AP early in its start, a CPU in a fault path). For
/// logs and fault reports; hot paths use `current_index`.
pub fn checked_index() -> Option<usize> {
    let base = GsBase::read().as_u64();
    let first = CPUS.as_ptr() as u64;
    let size = core::mem::size_of::<PerCpu>() as u64;
    let end = first + size * MAX_CPUS as u64;
    (base >= first && base < end && (base - first).is_multiple_of(size))
        .then(|| ((base - first) / size) as usize)
        .or_else(|| {
            // The GS base is the user's (a trap or NMI on the first instructions of
            // an entry from user mode, before `swapgs`): find the CPU by APIC id.
            let id = crate::cpu::apic_id();
            online().find(|c| c.apic_id() == id).map(|c| c.index())
        })
}

/// This CPU's dense index (0 before per-CPU set-up).
#[inline]
pub fn current_index() -> usize {
    if !READY.load(Ordering::Acquire) {
        return 0;
    }
    let addr: u64;
    // SAFETY: as in `current`.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) addr, options(nostack, readonly, preserves_flags));
    }
    let base = CPUS.as_ptr() as u64;
    ((addr - base) / core::mem::size_of::<PerCpu>() as u64) as usize
}

/// Block `index`.
#[inline]
pub fn cpu(index: usize) -> &'static PerCpu {
    &CPUS[index]
}

/// CPUs online.
#[inline]
pub fn online_count() -> usize {
    CPU_COUNT.load(Ordering::Acquire)
}

/// The blocks of CPUs online.
pub fn online() -> impl Iterator<Item = &'static PerCpu> {
    CPUS.iter().filter(|c| c.online())
}

/// Proof that the holder stays on one CPU: interrupts are off while it lives.
pub struct CpuGuard {
    was_enabled: bool,
    index: usize,
    _not_send: core::marker::PhantomData<*const ()>,
}

impl CpuGuard {
    /// Disables interrupts and pins the caller to the current CPU.
    pub fn new() -> Self {
        let was_enabled = interrupts::are_enabled();
        interrupts::disable();
        Self {
            was_enabled,
            index: current_index(),
            _not_send: core::marker::PhantomData,
        }
    }

    /// The CPU the holder is pinned to.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Default for CpuGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CpuGuard {
    fn drop(&mut self) {
        if self.was_enabled {
            interrupts::enable();
        }
    }
}
