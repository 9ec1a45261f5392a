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

/// Page-table frames kept for mappings made after boot and before the frame allocator
/// exists (firmware tables in reserved RAM, device registers).
const RESERVE_BYTES: u64 = 512 * 1024;

/// Virtual window for uncached device mappings (PML4 slot 508).
pub const MMIO_BASE: u64 = 0xffff_fe00_0000_0000;
const MMIO_WINDOW: u64 = 1 << 39;

/// Virtual window for per-CPU stacks (PML4 slot 506): CPU i's stacks start at
/// `STACKS_BASE + i * STACK_STRIDE`, each behind an unmapped guard page.
pub const STACKS_BASE: u64 = 0xffff_fd00_0000_0000;
const STACK_STRIDE: u64 = 256 * 1024;
/// Physical bytes one CPU's stacks need.
pub const CPU_STACK_BYTES: u64 =
    panda_arch::stacks::BOOT_STACK_SIZE + 3 * panda_arch::stacks::IST_STACK_SIZE;

/// The live kernel hierarchy and what is needed to extend it.
struct KernelSpace {
    root: u64,
    hhdm: u64,
    frames: EarlyFrames,
    mmio_next: u64,
}

static SPACE: spin::Mutex<Option<KernelSpace>> = spin::Mutex::new(None);

/// The live kernel hierarchy, locked: every edit after boot goes through here, so
/// edits are serialised and use the reserve frames.
fn editor() -> Option<(spin::MutexGuard<'static, Option<KernelSpace>>, TableBuilder)> {
    let guard = SPACE.lock();
    let (root, hhdm) = guard.as_ref().map(|s| (s.root, s.hhdm))?;
    #[allow(unsafe_code)]
    // SAFETY: `root` is the live kernel PML4 (its tables reachable through the HHDM)
    // and the returned lock guard serialises every editor.
    let tables = unsafe { TableBuilder::from_root(root, hhdm) };
    Some((guard, tables))
}

/// Makes `[phys, phys + len)` of RAM (including firmware tables in reserved RAM)
/// readable through the HHDM, write-back, and returns the HHDM address of `phys`.
pub fn map_ram(phys: u64, len: u64) -> Option<u64> {
    let (mut guard, mut tables) = editor()?;
    let space = guard.as_mut()?;
    let nx = panda_arch::paging::nx_bit();
    let mut page = phys & !0xfff;
    while page < phys + len.max(1) {
        if tables.translate(space.hhdm + page).is_none() {
            tables
                .map(
                    space.hhdm + page,
                    page,
                    PageSize::Size4K,
                    flags::WRITABLE | nx | flags::GLOBAL,
                    &mut space.frames,
                )
                .ok()?;
        }
        page += 4096;
    }
    Some(space.hhdm + phys)
}

/// Maps device registers `[phys, phys + len)` uncached in the MMIO window and returns
/// the virtual address of `phys`.
pub fn map_mmio(phys: u64, len: u64) -> Option<u64> {
    let (mut guard, mut tables) = editor()?;
    let space = guard.as_mut()?;
    let nx = panda_arch::paging::nx_bit();
    let first = phys & !0xfff;
    let pages = (phys + len.max(1) - first).div_ceil(4096);
    let virt = space.mmio_next;
    if virt + pages * 4096 > MMIO_BASE + MMIO_WINDOW {
        return None;
    }
    for i in 0..pages {
        let bits = flags::WRITABLE | flags::NO_CACHE | flags::WRITE_THROUGH | nx | flags::GLOBAL;
        tables
            .map(
                virt + i * 4096,
                first + i * 4096,
                PageSize::Size4K,
                bits,
                &mut space.frames,
            )
            .ok()?;
    }
    space.mmio_next = virt + pages * 4096;
    Some(virt + (phys - first))
}

/// Maps CPU `index`'s stacks (kernel, #DF, NMI, #MC) onto the `CPU_STACK_BYTES` of
/// physical memory at `phys`, each below-guarded, and returns where they are.
pub fn map_cpu_stacks(index: usize, phys: u64) -> Option<panda_arch::stacks::CpuStacks> {
    use panda_arch::stacks::{guarded, BOOT_STACK_SIZE, IST_STACK_SIZE};
    let (mut guard, mut tables) = editor()?;
    let space = guard.as_mut()?;
    let nx = panda_arch::paging::nx_bit();
    let mut virt = STACKS_BASE + index as u64 * STACK_STRIDE;
    let mut phys = phys;
    let mut stacks = [guarded(0, 0); 4];
    for (slot, size) in stacks.iter_mut().zip([
        BOOT_STACK_SIZE,
        IST_STACK_SIZE,
        IST_STACK_SIZE,
        IST_STACK_SIZE,
    ]) {
        let guard_page = virt;
        virt += 4096;
        for off in (0..size).step_by(4096) {
            tables
                .map(
                    virt + off,
                    phys + off,
                    PageSize::Size4K,
                    flags::WRITABLE | nx | flags::GLOBAL,
                    &mut space.frames,
                )
                .ok()?;
        }
        *slot = guarded(guard_page, virt + size);
        virt += size;
        phys += size;
    }
    Some(panda_arch::stacks::CpuStacks {
        kernel: stacks[0],
        double_fault: stacks[1],
        nmi: stacks[2],
        machine_check: stacks[3],
    })
}

/// A PML4 for the AP trampoline: the low 2 MiB identity-mapped (where the trampoline
/// runs when paging comes on) and the kernel half shared. It lives below 4 GiB, as the
/// trampoline loads it from 32-bit code.
pub fn trampoline_root() -> Option<u64> {
    let mut guard = SPACE.lock();
    let space = guard.as_mut()?;
    let mut tables = TableBuilder::new(&mut space.frames, space.hhdm).ok()?;
    tables
        .map(0, 0, PageSize::Size2M, flags::WRITABLE, &mut space.frames)
        .ok()?;
    tables.share_kernel_half(space.root);
    Some(tables.root())
}

/// The kernel's PML4.
pub fn kernel_root() -> u64 {
    SPACE.lock().as_ref().map_or(0, |s| s.root)
}

/// What `build` made, for the log and the tests.
#[derive(Clone, Copy, Debug)]
pub struct KernelTables {
    pub root: u64,
    pub hhdm_bytes: u64,
    pub table_bytes: u64,
    /// Frames set aside for later mappings (claimed as `KernelEarly` too).
    pub reserve_bytes: u64,
}

/// Builds the kernel's page tables and switches to them.
pub fn build_and_switch(boot: &mut BootInfo) -> Result<KernelTables, MapError> {
    const LOW: u64 = 0x10_0000;
    const HIGH: u64 = 0x1_0000_0000;
    let free = boot.memory_map.regions().iter().filter_map(|r| {
        let (start, end) = (r.start.max(LOW), r.end.min(HIGH));
        (r.kind == MemoryKind::Usable && start < end).then_some((start, end))
    });
    #[allow(unsafe_code)]
    // SAFETY: usable ranges are free RAM nobody else uses yet (the kernel image,
    // modules and boot data were claimed out of them), and below 4 GiB both boot paths
    // map them through the HHDM.
    let mut frames = unsafe { EarlyFrames::new(boot.hhdm_offset, free) };
    let mut tables = TableBuilder::new(&mut frames, boot.hhdm_offset)?;
    let nx = panda_arch::paging::nx_bit();
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
    #[allow(unsafe_code)]
    // SAFETY: the new hierarchy maps the kernel image (this code, its data, the boot
    // stack in use) at the same virtual addresses as the boot tables, and the HHDM over
    // all RAM; nothing the kernel touches afterwards relies on the old lower-half maps.
    // It is also the hierarchy user spaces share the kernel half of, and the one CPUs
    // return to.
    unsafe {
        panda_arch::paging::switch_to(root);
        panda_arch::paging::set_kernel_root(root);
    };
    panda_arch::paging::flush_all();

    let table_bytes = frames.used_bytes();
    for (start, end) in frames.used() {
        if start != end {
            // The map has room: a claim splits at most one region into three.
            let _ = boot.memory_map.claim(start, end, MemoryKind::KernelEarly);
        }
    }

    // Keep a reserve of frames for mappings made before the frame allocator exists.
    let reserve = boot
        .memory_map
        .regions()
        .iter()
        .find(|r| {
            r.kind == MemoryKind::Usable
                && r.start >= LOW
                && r.end <= HIGH
                && r.len() >= RESERVE_BYTES
        })
        .map(|r| (r.start, r.start + RESERVE_BYTES));
    if let Some((start, end)) = reserve {
        let _ = boot.memory_map.claim(start, end, MemoryKind::KernelEarly);
        #[allow(unsafe_code)]
        // SAFETY: the range was usable (free) and is now claimed for this pool alone;
        // it lies below 4 GiB, inside the HHDM just built.
        let frames = unsafe { EarlyFrames::new(boot.hhdm_offset, core::iter::once((start, end))) };
        *SPACE.lock() = Some(KernelSpace {
            root,
            hhdm: boot.hhdm_offset,
            frames,
            mmio_next: MMIO_BASE,
        });
    }
    Ok(KernelTables {
        root,
        hhdm_bytes,
        table_bytes,
        reserve_bytes: reserve.map_or(0, |(s, e)| e - s),
    })
}
