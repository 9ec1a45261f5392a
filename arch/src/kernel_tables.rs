//! The kernel's own page tables, built once from the boot memory map, and every later
//! edit of them.
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
//!
//! Everything here is safe to call whatever the arguments: frames come only from the
//! boot memory map (`BootMemoryMap`, which nothing outside this crate can forge), the
//! tables are built once, and later edits only fill empty entries, in windows whose
//! addresses are chosen here (the HHDM below `HHDM_LIMIT`, the MMIO window, the stack
//! window), so no mapping in use ever changes.

use crate::memory_map::{BootMemoryMap, MemoryKind, MemoryMap};
use crate::paging::{flags, EarlyFrames, FrameSource, MapError, PageSize, TableBuilder};
use crate::percpu::MAX_CPUS;
use crate::stacks::{guarded, CpuStacks, BOOT_STACK_SIZE, IST_STACK_SIZE};
use crate::{page_floor, HHDM_BASE, HHDM_LIMIT, PAGE_SIZE};

/// Page-table frames kept for mappings made after boot and before the frame allocator
/// exists (firmware tables in reserved RAM, device registers, AP stacks).
const RESERVE_BYTES: u64 = 512 * 1024;

/// Virtual window for uncached device mappings (PML4 slot 508).
pub const MMIO_BASE: u64 = 0xffff_fe00_0000_0000;
const MMIO_WINDOW: u64 = 1 << 39;

/// Virtual window for per-CPU stacks (PML4 slot 506): CPU i's stacks start at
/// `STACKS_BASE + i * STACK_STRIDE`, each behind an unmapped guard page.
pub const STACKS_BASE: u64 = 0xffff_fd00_0000_0000;
const STACK_STRIDE: u64 = 256 * 1024;
/// Bytes of the stack window that CPU stacks can occupy (one stride per possible CPU).
pub(crate) const STACK_WINDOW: u64 = MAX_CPUS as u64 * STACK_STRIDE;
/// Physical bytes one CPU's stacks need.
pub const CPU_STACK_BYTES: u64 = BOOT_STACK_SIZE + 3 * IST_STACK_SIZE;

/// The live kernel hierarchy and what is needed to extend it.
struct KernelSpace {
    tables: TableBuilder,
    /// Frames for later edits (the reserve).
    frames: EarlyFrames,
    mmio_next: u64,
    /// The RAM ranges as the map had them when the tables were built, so that device
    /// mappings can refuse RAM.
    ram: MemoryMap,
}

static SPACE: spin::Mutex<Option<KernelSpace>> = spin::Mutex::new(None);
/// The kernel PML4's physical address, once the kernel runs on it (0 before).
static ROOT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Set by the first `build_and_switch`.
static BUILT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The kernel's PML4 (physical), or 0 before `build_and_switch`.
pub fn kernel_root() -> u64 {
    ROOT.load(core::sync::atomic::Ordering::Acquire)
}

/// Switches this CPU to the kernel's page tables (flushing its non-global TLB
/// entries). Returns false, and changes nothing, before they exist. Safe from anywhere
/// in the kernel: they map everything the kernel uses, its stacks included, and their
/// kernel half is the one every address space shares.
pub fn load() -> bool {
    let root = kernel_root();
    if root == 0 {
        return false;
    }
    // SAFETY: the kernel's hierarchy maps the kernel image, the HHDM over all RAM, the
    // MMIO and stack windows: everything kernel code touches, with the rights it needs.
    // Every address space shares this kernel half, so the code and stack running now
    // (kernel-half addresses) stay mapped across the switch.
    unsafe { crate::paging::switch_to(root) };
    true
}

/// Makes `[phys, phys + len)` (RAM, including firmware tables in reserved RAM)
/// readable through the HHDM, write-back, and returns the HHDM address of `phys`.
/// Pages the HHDM maps already are left as they are. `None` if part of the range is
/// not memory (above 1 MiB, a page must lie in a range of the memory map that is
/// neither bad memory nor a framebuffer; below, the legacy BIOS area is allowed), lies
/// beyond `HHDM_LIMIT`, if the kernel tables do not exist yet, or the reserve of
/// page-table frames ran out.
pub fn map_ram(phys: u64, len: u64) -> Option<u64> {
    let end = phys.checked_add(len.max(1))?;
    if end > HHDM_LIMIT {
        return None;
    }
    let mut guard = SPACE.lock();
    let space = guard.as_mut()?;
    let memory = |page: u64| {
        page < 0x10_0000
            || space.ram.regions().iter().any(|r| {
                r.start <= page
                    && page < r.end
                    && !matches!(r.kind, MemoryKind::BadMemory | MemoryKind::Framebuffer)
            })
    };
    let mut page = page_floor(phys);
    while page < end {
        if !memory(page) {
            return None;
        }
        page += PAGE_SIZE;
    }
    let nx = crate::paging::nx_bit();
    let mut page = page_floor(phys);
    while page < end {
        if space.tables.translate(HHDM_BASE + page).is_none() {
            // SAFETY: `page` is RAM (or the legacy BIOS area), checked above, mapped at
            // its HHDM address like all RAM; the HHDM is where the kernel reaches RAM.
            unsafe {
                space.tables.map(
                    HHDM_BASE + page,
                    page,
                    PageSize::Size4K,
                    flags::WRITABLE | nx | flags::GLOBAL,
                    &mut space.frames,
                )
            }
            .ok()?;
        }
        page += PAGE_SIZE;
    }
    Some(HHDM_BASE + phys)
}

/// Maps device registers `[phys, phys + len)` uncached in the MMIO window and returns
/// the virtual address of `phys`. `None` for ranges the memory map has as RAM (an
/// uncached alias of cached memory is not allowed), when the window or the reserve of
/// page-table frames is exhausted, or before the kernel tables exist.
pub fn map_mmio(phys: u64, len: u64) -> Option<u64> {
    let first = page_floor(phys);
    let end = phys.checked_add(len.max(1))?;
    if end > 1 << 52 {
        return None;
    }
    let pages = (end - first).div_ceil(PAGE_SIZE);
    let mut guard = SPACE.lock();
    let space = guard.as_mut()?;
    let is_ram = space
        .ram
        .regions()
        .iter()
        .any(|r| r.kind.is_ram() && r.start < end && first < r.end);
    if is_ram {
        return None;
    }
    let nx = crate::paging::nx_bit();
    let virt = space.mmio_next;
    if pages > (MMIO_BASE + MMIO_WINDOW - virt) / PAGE_SIZE {
        return None;
    }
    // The window only grows, so these pages are fresh even if a mapping below fails.
    space.mmio_next = virt + pages * PAGE_SIZE;
    for i in 0..pages {
        let bits = flags::WRITABLE | flags::NO_CACHE | flags::WRITE_THROUGH | nx | flags::GLOBAL;
        // SAFETY: the range is not RAM (checked above): device registers, mapped
        // uncached at fresh addresses of the MMIO window, for the caller to use.
        unsafe {
            space.tables.map(
                virt + i * PAGE_SIZE,
                first + i * PAGE_SIZE,
                PageSize::Size4K,
                bits,
                &mut space.frames,
            )
        }
        .ok()?;
    }
    Some(virt + (phys - first))
}

/// Takes `CPU_STACK_BYTES` from the boot memory map for CPU `index`'s stacks (kernel,
/// #DF, NMI, #MC), maps them in the stack window, each below-guarded, and returns where
/// they are. `None` if `index` is out of range, its stacks are mapped already, or
/// memory or page-table frames ran out.
pub(crate) fn map_cpu_stacks(index: usize, map: &mut BootMemoryMap) -> Option<CpuStacks> {
    if index == 0 || index >= MAX_CPUS {
        return None;
    }
    let mut guard = SPACE.lock();
    let space = guard.as_mut()?;
    let base = STACKS_BASE + index as u64 * STACK_STRIDE;
    if space.tables.translate(base + PAGE_SIZE).is_some() {
        return None;
    }
    let mut phys = map.take(
        CPU_STACK_BYTES,
        0x10_0000,
        HHDM_LIMIT,
        MemoryKind::KernelEarly,
    )?;
    let nx = crate::paging::nx_bit();
    let mut virt = base;
    let mut stacks = [guarded(0, 0); 4];
    for (slot, size) in stacks.iter_mut().zip([
        BOOT_STACK_SIZE,
        IST_STACK_SIZE,
        IST_STACK_SIZE,
        IST_STACK_SIZE,
    ]) {
        let guard_page = virt;
        virt += PAGE_SIZE;
        for off in (0..size).step_by(PAGE_SIZE as usize) {
            // SAFETY: the stacks' memory was just taken from the boot memory map for
            // this CPU's stacks alone.
            unsafe {
                space.tables.map(
                    virt + off,
                    phys + off,
                    PageSize::Size4K,
                    flags::WRITABLE | nx | flags::GLOBAL,
                    &mut space.frames,
                )
            }
            .ok()?;
        }
        *slot = guarded(guard_page, virt + size);
        virt += size;
        phys += size;
    }
    Some(CpuStacks {
        kernel: stacks[0],
        double_fault: stacks[1],
        nmi: stacks[2],
        machine_check: stacks[3],
    })
}

/// A new, empty hierarchy for a user address space: a fresh PML4 from `frames` that
/// shares the kernel half of these tables. `None` before the kernel tables exist or if
/// `frames` has no frame.
pub fn user_tables(frames: &mut dyn FrameSource) -> Option<TableBuilder> {
    // Take the frame without the lock held (the source may take locks of its own);
    // once made, the kernel tables stay.
    SPACE.lock().as_ref()?;
    let mut tables = TableBuilder::new(frames).ok()?;
    tables.confine_to_user_half();
    let guard = SPACE.lock();
    tables.share_kernel_half(&guard.as_ref()?.tables);
    Some(tables)
}

/// What the kernel tables map `virt` to: (physical address, leaf entry bits). `None`
/// if nothing is mapped there or before the tables exist.
pub fn translate(virt: u64) -> Option<(u64, u64)> {
    SPACE.lock().as_ref()?.tables.translate(virt)
}

/// Entry `slot` (0..512) of the kernel PML4 (0 before the tables exist).
pub fn root_entry(slot: usize) -> u64 {
    SPACE
        .lock()
        .as_ref()
        .map_or(0, |space| space.tables.root_entry(slot))
}

/// A PML4 for the AP trampoline: the low 2 MiB identity-mapped (where the trampoline
/// runs when paging comes on) and the kernel half shared. It lives below 4 GiB, as the
/// trampoline loads it from 32-bit code (`None` if the reserve is not there).
pub(crate) fn trampoline_root() -> Option<u64> {
    let mut guard = SPACE.lock();
    let space = guard.as_mut()?;
    let mut tables = TableBuilder::new(&mut space.frames).ok()?;
    // SAFETY: the identity map of the low 2 MiB is used only by the AP trampoline while
    // paging comes on (the trampoline page and the real-mode area lie there).
    unsafe { tables.map(0, 0, PageSize::Size2M, flags::WRITABLE, &mut space.frames) }.ok()?;
    tables.share_kernel_half(&space.tables);
    (tables.root() < 1 << 32).then_some(tables.root())
}

/// What `build_and_switch` made, for the log and the tests.
#[derive(Clone, Copy, Debug)]
pub struct KernelTables {
    pub root: u64,
    pub hhdm_bytes: u64,
    pub table_bytes: u64,
    /// Frames set aside for later mappings (claimed as `KernelEarly` too).
    pub reserve_bytes: u64,
}

/// Why the kernel tables could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// A mapping failed (out of frames below 4 GiB, or a malformed map).
    Map(MapError),
    /// They exist already: they are built once.
    AlreadyBuilt,
    /// The boot front-end has not recorded where the kernel image is.
    NoKernelImage,
}

impl From<MapError> for BuildError {
    fn from(e: MapError) -> Self {
        BuildError::Map(e)
    }
}

/// Builds the kernel's page tables from the boot memory map, switches this CPU to them,
/// and claims the frames they use (and a reserve for later edits) in the map. Runs
/// once; later calls fail with `AlreadyBuilt`.
pub fn build_and_switch(map: &mut BootMemoryMap) -> Result<KernelTables, BuildError> {
    const LOW: u64 = 0x10_0000;
    const HIGH: u64 = 0x1_0000_0000;
    let kernel_phys = crate::image::kernel_phys();
    if kernel_phys == 0 {
        return Err(BuildError::NoKernelImage);
    }
    if BUILT.swap(true, core::sync::atomic::Ordering::AcqRel) {
        return Err(BuildError::AlreadyBuilt);
    }
    let free = map.regions().iter().filter_map(|r| {
        let (start, end) = (r.start.max(LOW), r.end.min(HIGH));
        (r.kind == MemoryKind::Usable && start < end).then_some((start, end))
    });
    // SAFETY: usable ranges of the boot memory map are free RAM nobody uses (its
    // invariant: the kernel image, modules and boot data were claimed out of them, and
    // every later user claims what it takes), and below 4 GiB both boot paths map them
    // writable through the HHDM. Nothing takes from the map while this runs (it is
    // borrowed mutably), and what the frames handed out is claimed below.
    let mut frames = unsafe { EarlyFrames::new(free) };
    let mut tables = TableBuilder::new(&mut frames)?;
    let nx = crate::paging::nx_bit();
    let global = flags::GLOBAL;

    for slot in 256..512 {
        tables.ensure_pml4_slot(slot, &mut frames)?;
    }

    let mut hhdm_bytes = 0;
    for r in map.regions() {
        let low_reserved = r.kind == MemoryKind::Reserved && r.end <= 0x10_0000;
        if !(r.kind.is_ram() || low_reserved) || r.start >= HHDM_LIMIT {
            continue;
        }
        let end = r.end.min(HHDM_LIMIT);
        // SAFETY: the HHDM is where the kernel reaches RAM (and the low reserved
        // area); the range is RAM of the boot memory map, or below 1 MiB.
        unsafe {
            tables.map_range(
                HHDM_BASE + r.start,
                r.start,
                end - r.start,
                flags::WRITABLE | nx | global,
                &mut frames,
            )?
        };
        hhdm_bytes += end - r.start;
    }

    let image = crate::image::kernel_image();
    let guards = crate::stacks::boot_stacks().guards();
    let sections = [
        (image.text, global),
        (image.rodata, nx | global),
        (image.data, flags::WRITABLE | nx | global),
    ];
    for ((start, end), bits) in sections {
        let mut page = start;
        while page < end {
            if !guards.contains(&page) {
                let phys = page - image.start + kernel_phys;
                // SAFETY: the kernel image's own page, at the physical address the
                // boot protocol loaded it, mapped at its link address.
                unsafe { tables.map(page, phys, PageSize::Size4K, bits, &mut frames)? };
            }
            page += PAGE_SIZE;
        }
    }

    let root = tables.root();
    // SAFETY: the new hierarchy maps the kernel image (this code, its data, the boot
    // stack in use) at the same virtual addresses as the boot tables, at the physical
    // addresses the boot protocol reported for it, and the HHDM over all RAM; nothing
    // the kernel touches afterwards relies on the old lower-half maps.
    unsafe { crate::paging::switch_to(root) };
    crate::paging::flush_all();
    ROOT.store(root, core::sync::atomic::Ordering::Release);
    map.tables_switched();

    let table_bytes = frames.used_bytes();
    for (start, end) in frames.used() {
        if start != end {
            // The map has room: a claim splits at most one region into three.
            let _ = map.claim(start, end, MemoryKind::KernelEarly);
        }
    }

    // Keep a reserve of frames for mappings made before the frame allocator exists.
    let reserve = map.take(RESERVE_BYTES, LOW, HIGH, MemoryKind::KernelEarly);
    let reserve_range = reserve.map_or((0, 0), |start| (start, start + RESERVE_BYTES));
    // SAFETY: the range (if any) was usable and is now claimed for this pool alone; it
    // lies below 4 GiB, inside the HHDM just built.
    let frames = unsafe { EarlyFrames::new(core::iter::once(reserve_range)) };
    let ram = (**map).clone();
    *SPACE.lock() = Some(KernelSpace {
        tables,
        frames,
        mmio_next: MMIO_BASE,
        ram,
    });
    Ok(KernelTables {
        root,
        hhdm_bytes,
        table_bytes,
        reserve_bytes: reserve_range.1 - reserve_range.0,
    })
}
