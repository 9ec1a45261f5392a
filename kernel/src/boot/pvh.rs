//! The PVH front-end: `hvm_start_info` into `BootInfo`.
//!
//! The 32-bit entry (in `panda_arch::boot`) has mapped the first 4 GiB at the HHDM
//! base, where QEMU puts the start info, its memory map, command line and modules.

use panda_arch::pvh::{self, MemmapEntry};

use super::{BootInfo, MemoryKind, MemoryMap, Module, Protocol, Text, MAX_MODULES};

fn kind_of(e820: u32) -> MemoryKind {
    match e820 {
        1 => MemoryKind::Usable,
        3 => MemoryKind::AcpiReclaimable,
        4 => MemoryKind::AcpiNvs,
        5 => MemoryKind::BadMemory,
        _ => MemoryKind::Reserved,
    }
}

/// Builds the `BootInfo` from the start info at physical `start_info`.
pub fn boot_info(start_info: u64) -> Result<BootInfo, &'static str> {
    let hhdm = panda_arch::HHDM_BASE;
    let info =
        pvh::start_info(hhdm, start_info).map_err(|_| "PVH start info unreadable or bad magic")?;
    if info.memmap_entries == 0 {
        return Err("PVH start info has no memory map (version 0 is not supported)");
    }

    let mut map = MemoryMap::new();
    for i in 0..info.memmap_entries {
        let MemmapEntry { addr, size, kind } =
            pvh::memmap_entry(hhdm, &info, i).map_err(|_| "PVH memory map unreadable")?;
        map.add(addr, addr.saturating_add(size), kind_of(kind))
            .map_err(|_| "memory map too large")?;
    }

    let image = panda_arch::boot::kernel_image();
    let kernel_virt = image.start;
    let kernel_phys = image.start - panda_arch::KERNEL_VMA;
    let claim = |map: &mut MemoryMap, start: u64, len: u64, kind| {
        map.claim(start, start + len, kind)
            .map_err(|_| "memory map too large")
    };
    claim(
        &mut map,
        kernel_phys,
        image.end - image.start,
        MemoryKind::KernelAndModules,
    )?;
    claim(&mut map, start_info, 56, MemoryKind::BootloaderReclaimable)?;
    claim(
        &mut map,
        info.memmap_paddr,
        info.memmap_entries as u64 * 24,
        MemoryKind::BootloaderReclaimable,
    )?;

    let mut cmdline = [0u8; 256];
    let n = pvh::c_string(hhdm, info.cmdline_paddr, &mut cmdline)
        .map_err(|_| "PVH command line unreadable")?;
    if info.cmdline_paddr != 0 {
        claim(
            &mut map,
            info.cmdline_paddr,
            n as u64 + 1,
            MemoryKind::BootloaderReclaimable,
        )?;
    }

    let mut modules = [None; MAX_MODULES];
    for i in 0..info.nr_modules.min(MAX_MODULES as u32) {
        let m = pvh::module(hhdm, &info, i).map_err(|_| "PVH module list unreadable")?;
        let mut name = [0u8; 64];
        let n = pvh::c_string(hhdm, m.cmdline_paddr, &mut name)
            .map_err(|_| "PVH module name unreadable")?;
        claim(&mut map, m.paddr, m.size, MemoryKind::KernelAndModules)?;
        modules[i as usize] = Some(Module {
            phys: m.paddr,
            len: m.size,
            name: Text::from_bytes(&name[..n]),
        });
    }
    if info.nr_modules > 0 {
        claim(
            &mut map,
            info.modlist_paddr,
            info.nr_modules as u64 * 32,
            MemoryKind::BootloaderReclaimable,
        )?;
    }

    Ok(BootInfo {
        protocol: Protocol::Pvh,
        hhdm_offset: hhdm,
        memory_map: map,
        rsdp: (info.rsdp_paddr != 0).then_some(info.rsdp_paddr),
        modules,
        cmdline: Text::from_bytes(&cmdline[..n]),
        kernel_phys,
        kernel_virt,
        loader: Text::from_bytes(b"QEMU -kernel"),
    })
}
