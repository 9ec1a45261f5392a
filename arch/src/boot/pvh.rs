//! The PVH front-end: `hvm_start_info` into `BootInfo`.
//!
//! The 32-bit entry (`pvh_start32`) has mapped the first 4 GiB at the HHDM base, where
//! QEMU puts the start info, its memory map, command line and modules; they are read
//! with fault-checked probes (`crate::pvh`).

use crate::pvh::{self, MemmapEntry};

use super::info::{BootInfo, Module, Protocol, Text, MAX_MODULES};
use crate::memory_map::{BootMemoryMap, MemoryKind, MemoryMap};

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
pub(crate) fn boot_info(start_info: u64) -> Result<BootInfo, &'static str> {
    let hhdm = crate::HHDM_BASE;
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

    let image = crate::image::kernel_image();
    let kernel_virt = image.start;
    let kernel_phys = image.start - crate::KERNEL_VMA;
    let claim = |map: &mut MemoryMap, start: u64, len: u64, kind| {
        map.claim(start, start.saturating_add(len), kind)
            .map_err(|_| "memory map too large")
    };
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
        modules[i as usize] = Some(
            Module::new(m.paddr, m.size, Text::from_bytes(&name[..n]))
                .ok_or("PVH module outside the direct map")?,
        );
    }
    if info.nr_modules > 0 {
        claim(
            &mut map,
            info.modlist_paddr,
            info.nr_modules as u64 * 32,
            MemoryKind::BootloaderReclaimable,
        )?;
    }

    // Boot data might overlap the image or a module in a malformed start info: claim
    // those last, so what must never be reused stays `KernelAndModules`.
    let image_len = image.end - image.start;
    claim(
        &mut map,
        kernel_phys,
        image_len,
        MemoryKind::KernelAndModules,
    )?;
    for m in modules.iter().flatten() {
        claim(&mut map, m.phys, m.len, MemoryKind::KernelAndModules)?;
    }
    crate::image::set_kernel_phys(kernel_phys);

    Ok(BootInfo {
        protocol: Protocol::Pvh,
        hhdm_offset: hhdm,
        memory_map: BootMemoryMap::new(map),
        rsdp: (info.rsdp_paddr != 0).then_some(info.rsdp_paddr),
        modules,
        cmdline: Text::from_bytes(&cmdline[..n]),
        kernel_phys,
        kernel_virt,
        loader: Text::from_bytes(b"QEMU -kernel"),
    })
}
