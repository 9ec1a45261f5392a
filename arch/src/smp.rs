//! Starting application processors: the real-mode trampoline and INIT-SIPI-SIPI.
//!
//! The trampoline below is position-independent 16/32/64-bit code, copied to a page
//! below 1 MiB (a start-up IPI names a page number < 256). An AP starts there in real
//! mode with CS = page << 8. It loads the trampoline's GDT, enters protected mode, loads
//! the trampoline CR3 (a PML4 below 4 GiB that identity-maps the low 2 MiB and shares
//! the kernel half), enables long mode and paging, and jumps to the kernel entry with
//! its own stack and argument. The far-jump targets and the parameters are patched into
//! the copy (`Trampoline::prepare`, `Trampoline::set_ap`); the copy is re-patched for
//! each AP, so APs are started one at a time.
//!
//! `ApStarter` is the safe face of all this: it takes the trampoline page and the AP
//! stacks from the boot memory map itself, so no caller can point an AP at memory that
//! is in use. An AP lands in `ap_landing`, which switches to the kernel's page tables,
//! loads its GDT/TSS and the IDT, installs its per-CPU block and calls the kernel's
//! `ap_main(index)`.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::boot::{BootMemoryMap, MemoryKind};
use crate::percpu::MAX_CPUS;
use crate::stacks::CpuStacks;

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start
    ap_trampoline_start:
    .code16
    jmp tr_code16

    /* Data at fixed offsets (TR_* constants in Rust). */
    .balign 8
    tr_gdt:                                 /* offset 8 */
    .quad 0
    .quad 0x00cf9a000000ffff                /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff                /* 0x10: data */
    .quad 0x00af9a000000ffff                /* 0x18: 64-bit code */
    tr_gdtr:                                /* offset 40: limit, base (patched) */
    .word 31
    .long 0
    .balign 8
    .long 0                                 /* offset 48: cr3 */
    .long 0                                 /* offset 52: efer */
    .quad 0                                 /* offset 56: stack top */
    .quad 0                                 /* offset 64: argument */
    .quad 0                                 /* offset 72: entry */

    tr_code16:
    cli
    cld
    mov ax, cs
    mov ds, ax
    xor ebx, ebx
    mov bx, ax
    shl ebx, 4                              /* ebx = trampoline base (linear) */
    lgdt [40]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea                        /* ljmpl 0x08:pm32 (patched) */
    .global tr_pm32_target
    tr_pm32_target: .long 0
    .word 0x08

    .code32
    .global tr_pm32
    tr_pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 1 << 5                          /* PAE */
    mov cr4, eax
    mov eax, dword ptr [ebx + 48]
    mov cr3, eax
    mov ecx, 0xc0000080
    mov eax, dword ptr [ebx + 52]
    xor edx, edx
    wrmsr
    mov eax, cr0
    or eax, 0x80010000                      /* PG | WP */
    mov cr0, eax
    .byte 0xea                              /* ljmp 0x18:lm64 (patched) */
    .global tr_lm64_target
    tr_lm64_target: .long 0
    .word 0x18

    .code64
    .global tr_lm64
    tr_lm64:
    mov ebx, ebx
    mov rsp, qword ptr [rbx + 56]
    mov rdi, qword ptr [rbx + 64]
    mov rax, qword ptr [rbx + 72]
    xor ebp, ebp
    call rax                                /* ends a backtrace; keeps the ABI's alignment */
    ud2
    .global ap_trampoline_end
    ap_trampoline_end:
    "#
);

const TR_GDT: u64 = 8;
const TR_GDTR_BASE: u64 = 42;
const TR_CR3: u64 = 48;
const TR_EFER: u64 = 52;
const TR_STACK: u64 = 56;
const TR_ARG: u64 = 64;
const TR_ENTRY: u64 = 72;

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static tr_pm32_target: u8;
    static tr_pm32: u8;
    static tr_lm64_target: u8;
    static tr_lm64: u8;
}

fn offset(sym: *const u8) -> u64 {
    sym as u64 - &raw const ap_trampoline_start as u64
}

/// The entry an AP jumps to: `entry(arg)` on the given stack, in long mode on the
/// trampoline's page tables. It must load the kernel's CR3 first.
type ApEntry = extern "C" fn(arg: u64) -> !;

/// A trampoline copied into a low page, reached through the HHDM for patching.
struct Trampoline {
    phys: u64,
    virt: u64,
}

impl Trampoline {
    /// Size of the trampoline code and data.
    fn size() -> u64 {
        &raw const ap_trampoline_end as u64 - &raw const ap_trampoline_start as u64
    }

    /// Copies the trampoline to physical page `phys` (< 1 MiB, page-aligned) and patches
    /// its addresses. `cr3` must be a PML4 below 4 GiB that identity-maps `phys` and
    /// maps the kernel half; `efer` is the EFER value to load (LME, and NXE if used).
    ///
    /// # Safety
    /// The page must be RAM reserved for the trampoline alone and mapped writable at
    /// `hhdm + phys`.
    unsafe fn prepare(phys: u64, hhdm: u64, cr3: u32, efer: u32) -> Trampoline {
        assert!(
            phys < 0x10_0000 && phys.is_multiple_of(4096),
            "trampoline page must be below 1 MiB"
        );
        assert!(Self::size() <= 4096, "trampoline larger than a page");
        let virt = hhdm + phys;
        let src = &raw const ap_trampoline_start;
        // SAFETY: the destination page is reserved for the trampoline and mapped (the
        // caller's contract); the source is the trampoline's bytes in .rodata.
        unsafe { core::ptr::copy_nonoverlapping(src, virt as *mut u8, Self::size() as usize) };
        let t = Trampoline { phys, virt };
        t.write_u32(
            offset(&raw const tr_pm32_target),
            (phys + offset(&raw const tr_pm32)) as u32,
        );
        t.write_u32(
            offset(&raw const tr_lm64_target),
            (phys + offset(&raw const tr_lm64)) as u32,
        );
        t.write_u32(TR_GDTR_BASE, (phys + TR_GDT) as u32);
        t.write_u32(TR_CR3, cr3);
        t.write_u32(TR_EFER, efer);
        t
    }

    fn write_u32(&self, off: u64, value: u32) {
        // SAFETY: `off` lies inside the trampoline copy, which this object owns.
        unsafe { ((self.virt + off) as *mut u32).write_unaligned(value) }
    }

    fn write_u64(&self, off: u64, value: u64) {
        // SAFETY: as in `write_u32`.
        unsafe { ((self.virt + off) as *mut u64).write_unaligned(value) }
    }

    /// The page number a start-up IPI names.
    fn sipi_page(&self) -> u8 {
        (self.phys >> 12) as u8
    }

    /// Sets what the next AP to start gets: stack top, argument and entry.
    fn set_ap(&self, stack_top: u64, arg: u64, entry: ApEntry) {
        self.write_u64(TR_STACK, stack_top);
        self.write_u64(TR_ARG, arg);
        self.write_u64(TR_ENTRY, entry as usize as u64);
        core::sync::atomic::fence(Ordering::SeqCst);
    }
}

fn delay_us(us: u64) {
    let hz = crate::time::tsc_hz().max(1_000_000);
    let start = crate::cpu::rdtsc();
    while crate::cpu::rdtsc() - start < hz / 1_000_000 * us {
        core::hint::spin_loop();
    }
}

/// Runs INIT-SIPI-SIPI for `apic_id` with the SDM's delays (10 ms after INIT, 200 us
/// between the start-up IPIs) and waits up to `timeout_us` for `started()`. The second
/// SIPI is skipped if the AP already started.
fn start_ap(
    apic_id: u32,
    trampoline: &Trampoline,
    timeout_us: u64,
    started: impl Fn() -> bool,
) -> bool {
    crate::apic::send_init(apic_id);
    delay_us(10_000);
    crate::apic::send_startup(apic_id, trampoline.sipi_page());
    delay_us(200);
    if !started() {
        crate::apic::send_startup(apic_id, trampoline.sipi_page());
    }
    wait_for(timeout_us, started)
}

/// Each AP's stacks, by CPU index (set before the AP is started, kept if it did not
/// answer, for the next AP given that index).
static AP_STACKS: [spin::Once<CpuStacks>; MAX_CPUS] = [const { spin::Once::new() }; MAX_CPUS];
/// Where APs go once `ap_landing` has set them up.
static AP_MAIN: spin::Once<fn(usize) -> !> = spin::Once::new();
/// Set when the `ApStarter` is made: there is one.
static STARTER_MADE: AtomicBool = AtomicBool::new(false);

/// Starts application processors, one at a time (they share the trampoline copy).
/// There is at most one, made after the kernel's page tables are active.
pub struct ApStarter {
    trampoline: Trampoline,
    tables: u64,
}

/// Why an AP was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The index is 0, beyond `MAX_CPUS`, or a CPU with that index is online already.
    BadIndex,
    /// A CPU with that local APIC id is online already (the boot CPU, or an AP started
    /// before): it is not sent INIT.
    Running,
    /// No memory (or page-table frames) for its stacks.
    NoStacks,
    /// It did not check in within the time-out. It was sent INIT, which parks it in
    /// wait-for-SIPI, so the index and its stacks may go to the next AP.
    TimedOut,
}

impl ApStarter {
    /// Takes a page below 1 MiB for the trampoline from `map`, builds the trampoline's
    /// page tables (from the kernel tables' reserve) and copies the trampoline there.
    /// Every AP started will run `ap_main(index)` once set up. `Err` if the kernel's page
    /// tables are not active yet, if a starter was made before, or without memory.
    pub fn new(
        map: &mut BootMemoryMap,
        ap_main: fn(usize) -> !,
    ) -> Result<ApStarter, &'static str> {
        if crate::kernel_tables::kernel_root() == 0 {
            return Err("the kernel's page tables are not active yet");
        }
        if STARTER_MADE.swap(true, Ordering::AcqRel) {
            return Err("the APs are started by one ApStarter");
        }
        AP_MAIN.call_once(|| ap_main);
        let tables = crate::kernel_tables::trampoline_root()
            .ok_or("no page-table frames for the trampoline")?;
        let page = map
            .take(4096, 0x1000, 0x10_0000, MemoryKind::KernelEarly)
            .ok_or("no free page below 1 MiB for the trampoline")?;
        let (_, _, efer) = crate::cpu::control_registers();
        // LME, and NXE (bit 11) and SCE (bit 0) as the boot CPU has them.
        let efer = (efer as u32 & ((1 << 11) | 1)) | (1 << 8);
        // SAFETY: the page was just taken from the boot memory map's usable memory below
        // 1 MiB, for the trampoline alone, and the HHDM maps usable RAM writable; the
        // trampoline root is below 4 GiB (`trampoline_root`), identity-maps the low
        // 2 MiB and shares the kernel half.
        let trampoline =
            unsafe { Trampoline::prepare(page, crate::HHDM_BASE, tables as u32, efer) };
        Ok(ApStarter { trampoline, tables })
    }

    /// Physical address of the trampoline page.
    pub fn page(&self) -> u64 {
        self.trampoline.phys
    }

    /// Physical address of the trampoline's PML4.
    pub fn tables(&self) -> u64 {
        self.tables
    }

    /// Size of the trampoline code and data.
    pub fn size(&self) -> u64 {
        Trampoline::size()
    }

    /// Starts the AP with local APIC id `apic_id` as CPU `index`, on stacks of its own
    /// (taken from `map` and mapped the first time `index` is used), and waits up to
    /// `timeout_us` for it to check in (`percpu::set_online`, which the kernel's
    /// `ap_main` does once its own set-up is done).
    pub fn start(
        &mut self,
        map: &mut BootMemoryMap,
        index: usize,
        apic_id: u32,
        timeout_us: u64,
    ) -> Result<(), StartError> {
        if index == 0 || index >= MAX_CPUS || crate::percpu::cpu(index).online() {
            return Err(StartError::BadIndex);
        }
        if crate::percpu::online().any(|cpu| cpu.apic_id() == apic_id) {
            return Err(StartError::Running);
        }
        let stacks = match AP_STACKS[index].get() {
            Some(stacks) => *stacks,
            None => {
                let stacks =
                    crate::kernel_tables::map_cpu_stacks(index, map).ok_or(StartError::NoStacks)?;
                *AP_STACKS[index].call_once(|| stacks)
            }
        };
        self.trampoline
            .set_ap(stacks.kernel.top, index as u64, ap_landing);
        let online = || crate::percpu::cpu(index).online();
        if start_ap(apic_id, &self.trampoline, timeout_us, online) {
            Ok(())
        } else {
            // INIT puts the AP back into wait-for-SIPI, so it cannot wake up late on
            // these stacks once they are another AP's.
            crate::apic::send_init(apic_id);
            Err(StartError::TimedOut)
        }
    }
}

/// Where the trampoline lands, on the AP's own stack, still on the trampoline's tables.
extern "C" fn ap_landing(index: u64) -> ! {
    crate::kernel_tables::load();
    let index = index as usize;
    let Some(stacks) = AP_STACKS.get(index).and_then(|s| s.get()) else {
        crate::power::halt_forever()
    };
    crate::gdt::init_cpu(index, stacks);
    crate::idt::load();
    crate::percpu::install(index, crate::cpu::apic_id(), stacks);
    crate::user::init_cpu();
    match AP_MAIN.get() {
        Some(main) => main(index),
        None => crate::power::halt_forever(),
    }
}

/// Waits up to `timeout_us` for `done()`.
pub fn wait_for(timeout_us: u64, done: impl Fn() -> bool) -> bool {
    let hz = crate::time::tsc_hz().max(1_000_000);
    let start = crate::cpu::rdtsc();
    while crate::cpu::rdtsc() - start < hz / 1_000_000 * timeout_us {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Set while the machine is being stopped: NMIs then halt their CPU (`STOP_HALT`), or
/// first write their CPU's report (`STOP_REPORT`, the watchdog).
static STOPPING: AtomicU64 = AtomicU64::new(0);
const STOP_HALT: u64 = 1;
const STOP_REPORT: u64 = 2;

/// Whether `stop_others` or `stop_others_reporting` has been called.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire) != 0
}

/// Whether the machine is being stopped with a report from every CPU.
pub fn stopping_with_reports() -> bool {
    STOPPING.load(Ordering::Acquire) == STOP_REPORT
}

/// Halts every other online CPU through an NMI (which even a CPU spinning with
/// interrupts off takes). Used by panic and fatal-trap paths.
pub fn stop_others() {
    if STOPPING
        .compare_exchange(0, STOP_HALT, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    nmi_others();
}

/// Like `stop_others`, but each CPU writes its report (registers, backtrace) before it
/// halts. Returns false, and sends nothing, if the machine is already being stopped.
pub fn stop_others_reporting() -> bool {
    if STOPPING
        .compare_exchange(0, STOP_REPORT, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    nmi_others();
    true
}

fn nmi_others() {
    let me = crate::percpu::checked_index().unwrap_or(usize::MAX);
    for cpu in crate::percpu::online() {
        if cpu.index() != me {
            crate::apic::send_nmi(cpu.apic_id());
        }
    }
}
