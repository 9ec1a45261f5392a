//! The kernel's own page tables, built once from `BootInfo`.
//!
//! Whichever bootloader ran, the kernel replaces its page tables with these:
//! - the HHDM (`HHDM_BASE + phys`) maps every RAM range of the memory map, and reserved
//!   ranges below 1 MiB (BIOS data, where the RSDP lives on legacy systems), write-back,
//!   read-write, no-execute, with 2 MiB pages wherever alignment allows;
//! - the kernel image at its link address: text read-only + executable, rodata
//!   read-only + NX, data and bss read-write + NX, except the guard pages under each
//!   boot stack, which stay unmapped;
//! - PML4 slots 256..511 all point at page-directory-pointer tables made here, once, so
//!   every later address space can share the kernel half by copying those 256 entries
//!   and no kernel mapping ever needs propagating;
//! - nothing in the lower half: user space starts empty, and a null pointer faults.
//!
//! Frames for the tables come from `EarlyFrames`, a bump allocator over usable memory
//! below 4 GiB (the part both boot paths map); what it used is then claimed in the
//! memory map as `KernelEarly`, so the frame allocator never hands it out.

use panda_arch::paging::{flags, EarlyFrames, MapError, PageSize, TableBuilder};

use crate::boot::{BootInfo, MemoryKind};

/// What `build` made, for the log and the tests.
#[derive(Clone, Copy, Debug)]
pub struct KernelTables {
    pub root: u64,
    pub hhdm_bytes: u64,
    pub table_bytes: u64,
}

/// Builds the kernel's page tables and switches to them.
pub fn build_and_switch(boot: &mut BootInfo) -> Result<KernelTables, MapError> {
    const LOW: u64 = 0x10_0000;
    const HIGH: u64 = 0x1_0000_0000;
    let free = boot.memory_map.regions().iter().filter_map(|r| {
        let (start, end) = (r.start.max(LOW), r.end.min(HIGH));
        (r.kind == MemoryKind::Usable && start < end).then_some((start, end))
    });
    // SAFETY: usable ranges are free RAM nobody else uses yet (the kernel image,
    // modules and boot data were claimed out of them), and below 4 GiB both boot paths
    // map them through the HHDM.
    #[allow(unsafe_code)]
    let mut frames = unsafe { EarlyFrames::new(boot.hhdm_offset, free) };
    let mut tables = TableBuilder::new(&mut frames, boot.hhdm_offset)?;
    let nx = if panda_arch::cpu::nx_enabled() {
        flags::NO_EXECUTE
    } else {
        0
    };
    let global = flags::GLOBAL;

    for slot in 256..512 {
        tables.ensure_pml4_slot(slot, &mut frames)?;
    }

    let mut hhdm_bytes = 0;
    for r in boot.memory_map.regions() {
        let low_reserved = r.kind == MemoryKind::Reserved && r.end <= 0x10_0000;
        if !(r.kind.is_ram() || low_reserved) {
            continue;
        }
        tables.map_range(
            boot.hhdm_offset + r.start,
            r.start,
            r.len(),
            flags::WRITABLE | nx | global,
            &mut frames,
        )?;
        hhdm_bytes += r.len();
    }

    let image = panda_arch::boot::kernel_image();
    let guards = panda_arch::stacks::boot_stacks().guards();
    let sections = [
        (image.text, global),
        (image.rodata, nx | global),
        (image.data, flags::WRITABLE | nx | global),
    ];
    for ((start, end), bits) in sections {
        let mut page = start;
        while page < end {
            if !guards.contains(&page) {
                let phys = boot.kernel_virt_to_phys(page);
                tables.map(page, phys, PageSize::Size4K, bits, &mut frames)?;
            }
            page += 4096;
        }
    }

    let root = tables.root();
    // SAFETY: the new hierarchy maps the kernel image (this code, its data, the boot
    // stack in use) at the same virtual addresses as the boot tables, and the HHDM over
    // all RAM; nothing the kernel touches afterwards relies on the old lower-half maps.
    #[allow(unsafe_code)]
    unsafe {
        panda_arch::paging::switch_to(root)
    };
    panda_arch::paging::flush_all();

    let table_bytes = frames.used_bytes();
    for (start, end) in frames.used() {
        if start != end {
            // The map has room: a claim splits at most one region into three.
            let _ = boot.memory_map.claim(start, end, MemoryKind::KernelEarly);
        }
    }
    Ok(KernelTables {
        root,
        hhdm_bytes,
        table_bytes,
    })
}
