//! Reading the PVH `hvm_start_info` that QEMU (or Xen) hands the PVH entry.
//!
//! All structures are read through the HHDM with fault-checked probes, so a malformed
//! pointer yields an error instead of a fault. Layouts are Xen's `arch-x86/hvm/start_info.h`.
//!
//! The readers take physical addresses (the start info's, and those in it), so they are
//! crate-private: only the PVH boot front-end calls them, with what QEMU handed it,
//! before the kernel tables exist.

use crate::probe::{read_bytes, Fault};

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;

/// The fields of `hvm_start_info` the kernel uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartInfo {
    pub version: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    /// Version 1 and later; 0 otherwise.
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

/// One E820-style memory map entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS, 5 unusable.
    pub kind: u32,
}

/// One boot module (e.g. the initrd).
#[derive(Clone, Copy, Debug, Default)]
pub struct ModuleEntry {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
}

/// Why the start info could not be read.
#[derive(Clone, Copy, Debug)]
pub enum PvhError {
    Unreadable(Fault),
    BadMagic(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

/// Reads the start info at physical `phys`.
pub(crate) fn start_info(hhdm: u64, phys: u64) -> Result<StartInfo, PvhError> {
    let mut b = [0u8; 56];
    read_bytes(hhdm + phys, &mut b).map_err(PvhError::Unreadable)?;
    let magic = u32_at(&b, 0);
    if magic != MAGIC {
        return Err(PvhError::BadMagic(magic));
    }
    let version = u32_at(&b, 4);
    Ok(StartInfo {
        version,
        nr_modules: u32_at(&b, 12),
        modlist_paddr: u64_at(&b, 16),
        cmdline_paddr: u64_at(&b, 24),
        rsdp_paddr: u64_at(&b, 32),
        memmap_paddr: if version >= 1 { u64_at(&b, 40) } else { 0 },
        memmap_entries: if version >= 1 { u32_at(&b, 48) } else { 0 },
    })
}

/// Memory map entry `i` (of `info.memmap_entries`).
pub(crate) fn memmap_entry(hhdm: u64, info: &StartInfo, i: u32) -> Result<MemmapEntry, Fault> {
    let mut b = [0u8; 24];
    read_bytes(hhdm + info.memmap_paddr + i as u64 * 24, &mut b)?;
    Ok(MemmapEntry {
        addr: u64_at(&b, 0),
        size: u64_at(&b, 8),
        kind: u32_at(&b, 16),
    })
}

/// Module entry `i` (of `info.nr_modules`).
pub(crate) fn module(hhdm: u64, info: &StartInfo, i: u32) -> Result<ModuleEntry, Fault> {
    let mut b = [0u8; 32];
    read_bytes(hhdm + info.modlist_paddr + i as u64 * 32, &mut b)?;
    Ok(ModuleEntry {
        paddr: u64_at(&b, 0),
        size: u64_at(&b, 8),
        cmdline_paddr: u64_at(&b, 16),
    })
}

/// Copies the NUL-terminated string at physical `phys` into `buf` (truncating), and
/// returns its length in `buf`.
pub(crate) fn c_string(hhdm: u64, phys: u64, buf: &mut [u8]) -> Result<usize, Fault> {
    if phys == 0 {
        return Ok(0);
    }
    for (i, slot) in buf.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        read_bytes(hhdm + phys + i as u64, &mut byte)?;
        if byte[0] == 0 {
            return Ok(i);
        }
        *slot = byte[0];
    }
    Ok(buf.len())
}
