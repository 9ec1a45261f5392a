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

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

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

/// The kernel entry an AP jumps to: `entry(arg)` on the given stack, in long mode on
/// the trampoline's page tables. It must load the kernel's CR3 first.
pub type ApEntry = extern "C" fn(arg: u64) -> !;

/// A trampoline copied into a low page, reached through the HHDM for patching.
pub struct Trampoline {
    phys: u64,
    virt: u64,
}

impl Trampoline {
    /// Size of the trampoline code and data.
    pub fn size() -> u64 {
        &raw const ap_trampoline_end as u64 - &raw const ap_trampoline_start as u64
    }

    /// Copies the trampoline to physical page `phys` (< 1 MiB, page-aligned) and patches
    /// its addresses. `cr3` must be a PML4 below 4 GiB that identity-maps `phys` and
    /// maps the kernel half; `efer` is the EFER value to load (LME, and NXE if used).
    ///
    /// # Safety
    /// The page must be RAM reserved for the trampoline alone and mapped writable at
    /// `hhdm + phys`.
    pub unsafe fn prepare(phys: u64, hhdm: u64, cr3: u32, efer: u32) -> Trampoline {
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
    pub fn sipi_page(&self) -> u8 {
        (self.phys >> 12) as u8
    }

    /// Sets what the next AP to start gets: stack top, argument and entry.
    pub fn set_ap(&self, stack_top: u64, arg: u64, entry: ApEntry) {
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
pub fn start_ap(
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
