//! The Limine front-end: the protocol's responses into `BootInfo`.
//!
//! The requests live in `.requests` (between the start and end markers the linker
//! script keeps together), where Limine finds and answers them before jumping to
//! `limine_entry`. Base revision 3: the RSDP address is physical; module and other
//! pointers are HHDM addresses.
//!
//! `link_section` is an unsafe attribute: a static placed in a section with a meaning
//! to someone else must have the layout that someone expects. Here Limine reads these
//! sections, and each static is the `limine` crate's request type for it, whose layout
//! that crate defines to match the protocol.

use limine::memory_map::EntryType;
use limine::request::{
    BootloaderInfoRequest, ExecutableAddressRequest, ExecutableCmdlineRequest,
    ExecutableFileRequest, FramebufferRequest, HhdmRequest, MemoryMapRequest, ModuleRequest,
    RequestsEndMarker, RequestsStartMarker, RsdpRequest,
};
use limine::BaseRevision;

use super::info::{BootInfo, Module, Protocol, Text, MAX_MODULES};
use crate::memory_map::{BootMemoryMap, MemoryKind, MemoryMap};

// SAFETY (each `link_section` below): the request types of the `limine` crate, in the
// sections where the linker script gathers what Limine scans (see the module comment).
#[used]
#[unsafe(link_section = ".requests_start_marker")]
static START_MARKER: RequestsStartMarker = RequestsStartMarker::new();

#[used]
#[unsafe(link_section = ".requests")]
static BASE_REVISION: BaseRevision = BaseRevision::with_revision(3);

#[used]
#[unsafe(link_section = ".requests")]
static HHDM: HhdmRequest = HhdmRequest::new();

#[used]
#[unsafe(link_section = ".requests")]
static MEMORY_MAP: MemoryMapRequest = MemoryMapRequest::new();

#[used]
#[unsafe(link_section = ".requests")]
static RSDP: RsdpRequest = RsdpRequest::new();

#[used]
#[unsafe(link_section = ".requests")]
static MODULES: ModuleRequest = ModuleRequest::new();

#[used]
#[unsafe(link_section = ".requests")]
static KERNEL_ADDRESS: ExecutableAddressRequest = ExecutableAddressRequest::new();

#[used]
#[unsafe(link_section = ".requests")]
static CMDLINE: ExecutableCmdlineRequest = ExecutableCmdlineRequest::new();

/// Older Limine (8.x) has no command-line request; the kernel file's string is it.
#[used]
#[unsafe(link_section = ".requests")]
static EXECUTABLE_FILE: ExecutableFileRequest = ExecutableFileRequest::new();

#[used]
#[unsafe(link_section = ".requests")]
static LOADER: BootloaderInfoRequest = BootloaderInfoRequest::new();

/// The screen console draws here (screen.rs).
#[used]
#[unsafe(link_section = ".requests")]
static FRAMEBUFFER: FramebufferRequest = FramebufferRequest::new();

#[used]
#[unsafe(link_section = ".requests_end_marker")]
static END_MARKER: RequestsEndMarker = RequestsEndMarker::new();

fn kind_of(t: EntryType) -> MemoryKind {
    match t {
        EntryType::USABLE => MemoryKind::Usable,
        EntryType::ACPI_RECLAIMABLE => MemoryKind::AcpiReclaimable,
        EntryType::ACPI_NVS => MemoryKind::AcpiNvs,
        EntryType::BAD_MEMORY => MemoryKind::BadMemory,
        EntryType::BOOTLOADER_RECLAIMABLE => MemoryKind::BootloaderReclaimable,
        EntryType::EXECUTABLE_AND_MODULES => MemoryKind::KernelAndModules,
        EntryType::FRAMEBUFFER => MemoryKind::Framebuffer,
        _ => MemoryKind::Reserved,
    }
}

/// Hands the first framebuffer, if it has 32-bit RGB pixels, to the screen console.
fn record_framebuffer(hhdm: u64) {
    let Some(fb) = FRAMEBUFFER
        .get_response()
        .and_then(|r| r.framebuffers().next())
    else {
        return;
    };
    if fb.bpp() != 32 || fb.memory_model() != limine::framebuffer::MemoryModel::RGB {
        return;
    }
    let Some(phys) = (fb.addr() as u64).checked_sub(hhdm) else {
        return;
    };
    crate::screen::set_framebuffer(crate::screen::Framebuffer {
        phys,
        width: fb.width() as usize,
        height: fb.height() as usize,
        pitch: fb.pitch() as usize,
        red_shift: fb.red_mask_shift(),
        green_shift: fb.green_mask_shift(),
        blue_shift: fb.blue_mask_shift(),
    });
}

/// Builds the `BootInfo` from Limine's responses.
pub(crate) fn boot_info() -> Result<BootInfo, &'static str> {
    // An older Limine (8.x supports up to revision 2) boots the kernel with a revision
    // it knows and leaves the tag unconfirmed. Revision 2 differs from 3 here only in
    // the RSDP address (an HHDM pointer there, physical in 3), which is normalised
    // below, so both are accepted.
    let confirmed = BASE_REVISION.is_supported();
    let hhdm = HHDM.get_response().ok_or("Limine gave no HHDM")?.offset();
    if hhdm != crate::HHDM_BASE {
        // Everything after BootInfo assumes one HHDM base on both paths.
        return Err("Limine's HHDM is not at 0xffff800000000000 (5-level paging or KASLR?)");
    }
    let mut map = MemoryMap::new();
    for e in MEMORY_MAP
        .get_response()
        .ok_or("Limine gave no memory map")?
        .entries()
    {
        map.add(
            e.base,
            e.base.saturating_add(e.length),
            kind_of(e.entry_type),
        )
        .map_err(|_| "memory map too large")?;
    }
    let address = KERNEL_ADDRESS
        .get_response()
        .ok_or("Limine gave no kernel address")?;

    let kernel_phys = address.physical_base();
    let image = crate::image::kernel_image();
    if address.virtual_base() != image.start {
        return Err("Limine loaded the kernel at another virtual address than it is linked at");
    }
    // Limine's map has the image and modules as `EXECUTABLE_AND_MODULES` already;
    // claiming them again makes sure that nothing they overlap counts as free.
    let claim = |map: &mut MemoryMap, start: u64, len: u64| {
        map.claim(
            start,
            start.saturating_add(len),
            MemoryKind::KernelAndModules,
        )
        .map_err(|_| "memory map too large")
    };
    claim(&mut map, kernel_phys, image.end - image.start)?;

    let mut modules = [None; MAX_MODULES];
    if let Some(response) = MODULES.get_response() {
        for (slot, file) in modules.iter_mut().zip(response.modules()) {
            let phys = (file.addr() as u64)
                .checked_sub(hhdm)
                .ok_or("Limine module outside the direct map")?;
            claim(&mut map, phys, file.size())?;
            *slot = Some(
                Module::new(
                    phys,
                    file.size(),
                    Text::from_bytes(file.string().to_bytes()),
                )
                .ok_or("Limine module outside the direct map")?,
            );
        }
    }
    crate::image::set_kernel_phys(kernel_phys);
    record_framebuffer(hhdm);

    let cmdline = match (CMDLINE.get_response(), EXECUTABLE_FILE.get_response()) {
        (Some(r), _) => Text::from_bytes(r.cmdline().to_bytes()),
        (None, Some(f)) => Text::from_bytes(f.file().string().to_bytes()),
        (None, None) => Text::empty(),
    };
    let revision: &[u8] = if confirmed {
        b", base revision 3"
    } else {
        b", base revision unconfirmed (older Limine)"
    };
    let mut buf = [0u8; 64];
    let mut len = 0;
    let (name, version): (&[u8], &[u8]) = match LOADER.get_response() {
        Some(r) => (r.name().as_bytes(), r.version().as_bytes()),
        None => (b"Limine", b""),
    };
    for part in [name, b" ", version, revision] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    let loader = Text::from_bytes(&buf[..len]);

    Ok(BootInfo {
        protocol: Protocol::Limine,
        hhdm_offset: hhdm,
        memory_map: BootMemoryMap::new(map),
        rsdp: RSDP.get_response().map(|r| {
            let address = r.address() as u64;
            address.checked_sub(hhdm).unwrap_or(address)
        }),
        modules,
        cmdline,
        kernel_phys,
        kernel_virt: image.start,
        loader,
    })
}
