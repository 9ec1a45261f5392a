//! CPU identification and feature set-up.
//!
//! `enable_features` turns on, on the calling CPU, what Panda relies on or gains from:
//! NX (EFER.NXE), write protection in ring 0 (CR0.WP), global pages, SMEP and SMAP and
//! UMIP when CPUID offers them, OSFXSR/OSXMMEXCPT so user code may use SSE, and PCID
//! where it exists (never required: TCG lacks it).

use core::arch::x86_64::{__cpuid, __cpuid_count, CpuidResult};
use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::registers::control::{Cr0, Cr0Flags, Cr3, Cr4, Cr4Flags};
use x86_64::registers::model_specific::{Efer, EferFlags};

/// Runs CPUID. Always available in long mode.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

fn max_leaf() -> u32 {
    __cpuid(0).eax
}

fn max_ext_leaf() -> u32 {
    cpuid(0x8000_0000, 0).eax
}

/// The vendor string ("GenuineIntel", "AuthenticAMD", ...).
pub fn vendor(buf: &mut [u8; 12]) -> &str {
    let r = cpuid(0, 0);
    buf[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    buf[4..8].copy_from_slice(&r.edx.to_le_bytes());
    buf[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    core::str::from_utf8(buf).unwrap_or("unknown")
}

/// The brand string, trimmed ("QEMU TCG CPU version 2.5+", "Intel(R) Core(TM) ...").
pub fn brand(buf: &mut [u8; 48]) -> &str {
    if max_ext_leaf() < 0x8000_0004 {
        return "unknown model";
    }
    for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
        let r = cpuid(leaf, 0);
        for (j, reg) in [r.eax, r.ebx, r.ecx, r.edx].into_iter().enumerate() {
            let at = i * 16 + j * 4;
            buf[at..at + 4].copy_from_slice(&reg.to_le_bytes());
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(48);
    core::str::from_utf8(&buf[..end])
        .unwrap_or("unknown model")
        .trim()
}

/// Family, model, stepping as CPUID leaf 1 encodes them (with the extended fields).
pub fn signature() -> (u32, u32, u32) {
    let eax = cpuid(1, 0).eax;
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4)
    } else {
        (eax >> 4) & 0xf
    };
    (family, model, eax & 0xf)
}

/// What this CPU offers that the kernel cares about.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    pub nx: bool,
    pub global_pages: bool,
    pub huge_1g: bool,
    pub smep: bool,
    pub smap: bool,
    pub umip: bool,
    pub pcid: bool,
    pub invpcid: bool,
    pub x2apic: bool,
    pub invariant_tsc: bool,
    pub erms: bool,
    pub xsave: bool,
}

/// Reads the feature flags from CPUID.
pub fn features() -> Features {
    let l1 = cpuid(1, 0);
    let l7 = if max_leaf() >= 7 {
        cpuid(7, 0)
    } else {
        CpuidResult {
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    };
    let ext = max_ext_leaf();
    let e1 = if ext >= 0x8000_0001 {
        cpuid(0x8000_0001, 0).edx
    } else {
        0
    };
    let e7 = if ext >= 0x8000_0007 {
        cpuid(0x8000_0007, 0).edx
    } else {
        0
    };
    Features {
        nx: e1 & (1 << 20) != 0,
        global_pages: l1.edx & (1 << 13) != 0,
        huge_1g: e1 & (1 << 26) != 0,
        smep: l7.ebx & (1 << 7) != 0,
        smap: l7.ebx & (1 << 20) != 0,
        umip: l7.ecx & (1 << 2) != 0,
        pcid: l1.ecx & (1 << 17) != 0,
        invpcid: l7.ebx & (1 << 10) != 0,
        x2apic: l1.ecx & (1 << 21) != 0,
        invariant_tsc: e7 & (1 << 8) != 0,
        erms: l7.ebx & (1 << 9) != 0,
        xsave: l1.ecx & (1 << 26) != 0,
    }
}

/// Turns on the protection and feature bits Panda uses, on the calling CPU.
/// Long mode requires NX support in practice; without it, NX bits would fault (reserved
/// bits), so the page-table code asks `nx_enabled()` before setting them.
pub fn enable_features(f: &Features) {
    // SAFETY: each bit set here only adds protection (WP, SMEP, SMAP, UMIP, NXE) or
    // enables a feature CPUID reported (PGE, OSFXSR); none changes the meaning of the
    // current mappings, and the kernel's own tables carry no user pages, so SMEP/SMAP
    // cannot fault on kernel accesses.
    unsafe {
        if f.nx {
            Efer::update(|e| e.insert(EferFlags::NO_EXECUTE_ENABLE));
        }
        Cr0::update(|c| c.insert(Cr0Flags::WRITE_PROTECT));
        Cr4::update(|c| {
            c.insert(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE);
            if f.global_pages {
                c.insert(Cr4Flags::PAGE_GLOBAL);
            }
            if f.smep {
                c.insert(Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION);
            }
            if f.smap {
                c.insert(Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION);
                CLAC_OK.store(true, Ordering::Relaxed);
            }
            if f.umip {
                c.insert(Cr4Flags::USER_MODE_INSTRUCTION_PREVENTION);
            }
            // PCID is enabled where it exists (never required: TCG lacks it). Every CR3
            // load so far uses PCID 0, which keeps today's flush-on-switch behaviour; per-space
            // PCIDs wait for a host that has PCID to test them on (docs/MEMORY.md).
            if f.pcid && Cr3::read_raw().1 == 0 {
                c.insert(Cr4Flags::PCID);
            }
        });
    }
}

/// Whether this machine has SMAP, so the trap entry (`trap.rs`) may use `clac` to clear
/// RFLAGS.AC; without SMAP it clears AC with `pushfq`/`popfq`, which works on every CPU.
/// Set once at boot by `init`, before any user code runs; every CPU of a machine reports
/// the same features.
pub(crate) static CLAC_OK: AtomicBool = AtomicBool::new(false);

/// Whether CR4.SMAP is on (then kernel access to user pages needs stac/clac).
pub fn smap_enabled() -> bool {
    Cr4::read().contains(Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION)
}

/// Whether EFER.NXE is on, i.e. page-table NX bits are honoured rather than reserved.
pub fn nx_enabled() -> bool {
    Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE)
}

/// Current CR0, CR4 and EFER, raw, for reports and tests.
pub fn control_registers() -> (u64, u64, u64) {
    (Cr0::read_raw(), Cr4::read_raw(), Efer::read_raw())
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is never set by Panda.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The local APIC id as CPUID reports it (x2APIC id when leaf 0xB exists).
pub fn apic_id() -> u32 {
    if max_leaf() >= 0xb {
        cpuid(0xb, 0).edx
    } else {
        cpuid(1, 0).ebx >> 24
    }
}

/// Executes `int3`; the breakpoint handler decides what happens.
pub fn breakpoint() {
    x86_64::instructions::interrupts::int3();
}

/// Executes `ud2` outside any exception-table entry: an unexpected #UD.
pub fn invalid_opcode() {
    // SAFETY: ud2 only raises #UD; the trap path handles it (fatally, unless a handler
    // was registered, in which case it must advance RIP).
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
}

/// Reads a u64 at `addr` with no exception-table cover, so a bad address is an
/// unexpected page fault: for checking the fatal path only. `addr` must be in the user
/// (lower) half, which the kernel's tables leave empty; a kernel-half address panics
/// without being touched, so no kernel memory or device register is ever read.
pub fn read_unchecked(addr: u64) -> u64 {
    assert!(
        addr < 0x0000_8000_0000_0000 - 7,
        "read_unchecked: {addr:#x} is not a user-half address"
    );
    let value: u64;
    // SAFETY: a load cannot break memory safety by itself, and `addr` is in the user
    // half (checked above): no kernel data or device register. If it is unmapped (or
    // SMAP forbids it) the page fault is handled by the trap path (fatally).
    unsafe {
        core::arch::asm!("mov {}, [{}]", out(reg) value, in(reg) addr, options(nostack, readonly))
    };
    value
}

/// Remaps the legacy 8259 PICs to vectors 0x20..0x2f and masks every line, so that
/// nothing they raise (the firmware leaves the PIT running on IRQ 0, which the BIOS
/// routes to vector 8) can look like an exception. Interrupts come through the APICs.
pub fn disable_legacy_pic() {
    use x86_64::instructions::port::Port;
    let outb = |port: u16, value: u8| {
        // SAFETY: ports 0x20/0x21/0xa0/0xa1 are the 8259 PICs on every PC; the sequence
        // below is the standard ICW1-4 initialisation followed by masking all lines.
        unsafe { Port::new(port).write(value) }
    };
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}
