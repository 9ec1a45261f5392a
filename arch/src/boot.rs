//! Boot: the two entries, in assembly; the boot front-ends, which turn either protocol
//! into one `BootInfo`; and the hand-over to the kernel. (The kernel image's
//! boundaries are `crate::image`'s.)
//!
//! * PVH (QEMU `-kernel`): a Xen ELF note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY) names
//!   `pvh_start32`'s physical address. QEMU enters it in 32-bit protected mode, paging
//!   off, EBX = physical address of `hvm_start_info`. The code runs at its physical
//!   (load) address although it is linked in the higher half, so every absolute
//!   reference subtracts `KERNEL_VMA`. It zeroes .bss, builds boot page tables
//!   (identity and HHDM over the first 4 GiB with 2 MiB pages, and the kernel window at
//!   `KERNEL_VMA`), enables long mode with NX when the CPU has it, and calls
//!   `panda_kernel_entry(PVH, start_info_phys)` on the boot stack.
//! * Limine: the ELF entry point `limine_entry`, already in long mode on Limine's page
//!   tables. It moves to the boot stack and calls `panda_kernel_entry(LIMINE, 0)`.
//!
//! `panda_kernel_entry` is `entry::<K>`, where `K` is the kernel's `Kernel`
//! implementation: the kernel crate names it in a `#[used]` static
//! (`static ENTRY: Entry = entry::<K>;`), which makes the compiler emit that
//! instantiation; `entry` is placed in the section `.text.panda_kernel_entry` by the
//! `link_section` attribute here, and the linker script defines `panda_kernel_entry` as
//! the start of that section. So the kernel defines no symbol, needs no unsafe
//! attribute and no unsafe code to be called, and what gets called is this crate's
//! code, of the one type (`Entry`) the assembly calls. `entry` sets up the boot CPU,
//! runs the front-end of the protocol that booted and calls `K::main(boot_info)`.
//! The boot page tables only carry the kernel until it builds its own
//! (`crate::kernel_tables`).

mod info;
mod limine;
mod pvh;

pub use crate::memory_map::{BootMemoryMap, FreeRanges, MapError, MemoryKind, MemoryMap, Region};
pub use info::{BootInfo, Module, Protocol, Text, MAX_MODULES};

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

global_asm!(
    r#"
    .set KVMA, 0xffffffff80000000

    /* The PVH note: QEMU and Xen read it from a PT_NOTE segment. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32 - KVMA
    .balign 4

    .section .bss.boot_tables, "aw", @nobits
    .balign 4096
    boot_pml4:      .skip 4096
    boot_pdpt_low:  .skip 4096
    boot_pdpt_high: .skip 4096
    boot_pd:        .skip 4 * 4096

    .section .rodata.boot_gdt, "a"
    .balign 16
    boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
    boot_gdt_end:
    boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt - KVMA

    .section .rodata.boot_msg, "a"
    no_long_mode_msg:
    .asciz "\r\nPANIC: this CPU has no long mode (64-bit mode, CPUID 0x80000001 EDX bit 29): Panda runs only on x86_64 CPUs\r\n"

    .section .text.boot32, "ax"
    .code32
    .global pvh_start32
    pvh_start32:
    cli
    cld
    mov ebp, ebx                          /* hvm_start_info (physical) */

    /* .bss is not file-backed: zero it before anything relies on it (this also
       zeroes the boot page tables and stacks, none in use yet). */
    mov edi, offset __bss_start - KVMA
    mov ecx, offset __bss_end - KVMA
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd

    mov esp, offset boot_stack_top - KVMA

    /* Long mode is required; without it, say so on COM1 and stop. */
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb 90f
    mov eax, 0x80000001
    cpuid
    test edx, 1 << 29
    jz 90f
    mov esi, edx                          /* bit 20: NX */

    /* 2048 PD entries: 2 MiB pages over the first 4 GiB (present, writable, large). */
    mov edi, offset boot_pd - KVMA
    mov eax, 0x83
    mov ecx, 2048
    2:
    mov dword ptr [edi], eax
    mov dword ptr [edi + 4], 0
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz 2b

    /* PDPT (low): four PDs = 4 GiB. Used for identity and for the HHDM. */
    mov edi, offset boot_pdpt_low - KVMA
    mov eax, offset boot_pd - KVMA
    or eax, 3
    mov dword ptr [edi], eax
    add eax, 4096
    mov dword ptr [edi + 8], eax
    add eax, 4096
    mov dword ptr [edi + 16], eax
    add eax, 4096
    mov dword ptr [edi + 24], eax

    /* PDPT (high): entry 510 = 0xffffffff80000000 -> the first GiB. */
    mov edi, offset boot_pdpt_high - KVMA
    mov eax, offset boot_pd - KVMA
    or eax, 3
    mov dword ptr [edi + 510 * 8], eax

    /* PML4: 0 identity, 256 HHDM (0xffff800000000000), 511 kernel window. */
    mov edi, offset boot_pml4 - KVMA
    mov eax, offset boot_pdpt_low - KVMA
    or eax, 3
    mov dword ptr [edi], eax
    mov dword ptr [edi + 256 * 8], eax
    mov eax, offset boot_pdpt_high - KVMA
    or eax, 3
    mov dword ptr [edi + 511 * 8], eax

    mov eax, cr4
    or eax, 1 << 5                        /* PAE */
    mov cr4, eax
    mov eax, offset boot_pml4 - KVMA
    mov cr3, eax

    mov ecx, 0xc0000080                   /* EFER */
    rdmsr
    or eax, 1 << 8                        /* LME */
    test esi, 1 << 20
    jz 3f
    or eax, 1 << 11                       /* NXE */
    3:
    wrmsr

    mov eax, cr0
    or eax, 0x80010001                    /* PG | WP | PE */
    mov cr0, eax

    lgdt [boot_gdtr - KVMA]
    mov eax, 0x08
    push eax
    mov eax, offset pvh_long_mode - KVMA
    push eax
    retf

    /* No long mode: write the reason to COM1 (waiting, bounded, for the UART to take
       each byte), then end the run as a kernel failure through QEMU's debug-exit
       device (EXIT_FAILURE, 0x11: QEMU exits with 35; on hardware the port does
       nothing) and halt. */
    90:
    mov esi, offset no_long_mode_msg - KVMA
    92:
    mov ah, byte ptr [esi]
    test ah, ah
    jz 93f
    mov dx, 0x3fd                         /* line status: bit 5, ready to send */
    mov ecx, 100000
    94:
    in al, dx
    test al, 0x20
    jnz 95f
    dec ecx
    jnz 94b
    95:
    mov dx, 0x3f8
    mov al, ah
    out dx, al
    inc esi
    jmp 92b
    93:
    mov dx, 0xf4
    mov eax, 0x11
    out dx, eax
    91:
    hlt
    jmp 91b

    .code64
    pvh_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    movabs rax, offset pvh_higher_half
    jmp rax

    .section .text.boot64, "ax"
    pvh_higher_half:
    movabs rsp, offset boot_stack_top
    mov edi, {pvh}                        /* entry(PVH, start_info) */
    mov esi, ebp                          /* zero-extends: start_info physical */
    xor ebp, ebp                          /* ends the frame-pointer chain */
    call panda_kernel_entry
    ud2

    .global limine_entry
    limine_entry:
    cli
    cld
    movabs rsp, offset boot_stack_top
    mov edi, {limine}                     /* entry(LIMINE, 0) */
    xor esi, esi
    xor ebp, ebp
    call panda_kernel_entry
    ud2
    "#,
    pvh = const ENTRY_PVH,
    limine = const ENTRY_LIMINE,
);

/// `entry`'s first argument: which assembly entry ran.
const ENTRY_PVH: u64 = 1;
const ENTRY_LIMINE: u64 = 2;

/// The kernel's side of boot.
pub trait Kernel {
    /// Runs the kernel on the boot CPU, once the platform has set it up (serial port,
    /// GDT/TSS, IDT, per-CPU block, clock started) and read the boot protocol into
    /// `boot`. Never returns.
    fn main(boot: BootInfo) -> !;
}

/// What the assembly entries call: `panda_kernel_entry(protocol, argument)`.
pub type Entry = extern "C" fn(protocol: u64, arg: u64) -> !;

/// Set by the first call of `entry`.
static ENTERED: AtomicBool = AtomicBool::new(false);

/// The boot entry, for the kernel's `Kernel` implementation `K`: the kernel names
/// `entry::<K>` in a `#[used] static ENTRY: Entry`, and the linker script makes
/// `panda_kernel_entry`, which the assembly entries call, the start of the section this
/// lands in (see the module comment). There must be exactly one such static.
///
/// It runs once: a later call (which only kernel code could make) stops the machine,
/// so there is one `BootInfo` and one boot memory map per boot.
#[inline(never)]
// SAFETY: the linker script gathers `.text.panda_kernel_entry` at the symbol
// `panda_kernel_entry`, which the assembly entries call as an `Entry`; only this
// function (in each instantiation, all of type `Entry`) is placed there.
#[unsafe(link_section = ".text.panda_kernel_entry")]
pub extern "C" fn entry<K: Kernel>(protocol: u64, arg: u64) -> ! {
    if ENTERED.swap(true, Ordering::AcqRel) {
        boot_failed("the boot entry ran a second time")
    }
    early_cpu();
    let info = match protocol {
        ENTRY_PVH => pvh::boot_info(arg),
        ENTRY_LIMINE => limine::boot_info(),
        _ => Err("unknown boot entry"),
    };
    match info {
        Ok(info) => {
            crate::acpi::record_rsdp(info.rsdp);
            K::main(info)
        }
        Err(why) => boot_failed(why),
    }
}

/// What the boot CPU sets up before it looks at any bootloader data. Until the kernel
/// installs its fatal-trap hook, a fatal trap is reported and the machine stopped.
fn early_cpu() {
    crate::time::mark_boot();
    crate::serial::init();
    let stacks = crate::stacks::boot_stacks();
    crate::gdt::init_cpu(0, &stacks);
    crate::idt::load();
    crate::percpu::install(
        0,
        crate::cpu::apic_id(),
        crate::gdt::tss_rsp0_address(0),
        &stacks,
    );
    crate::user::init_cpu();
}

fn boot_failed(why: &str) -> ! {
    crate::serial::emergency(|w| {
        let _ = writeln!(w, "panda: boot failed: {why}");
    });
    crate::power::exit(false)
}
