//! The Limine front-end: the protocol's responses into `BootInfo`.
//!
//! The requests live in `.requests` (between the start and end markers the linker
//! script keeps together), where Limine finds and answers them before jumping to
//! `limine_entry`. Base revision 3: the RSDP address is physical; module and other
//! pointers are HHDM addresses.
#![allow(unsafe_code)] // `link_section` on the request statics; nothing else.

use limine::memory_map::EntryType;
use limine::request::{
    BootloaderInfoRequest, ExecutableAddressRequest, ExecutableCmdlineRequest, HhdmRequest,
    MemoryMapRequest, ModuleRequest, RequestsEndMarker, RequestsStartMarker, RsdpRequest,
};
use limine::BaseRevision;

use super::{BootInfo, MemoryKind, MemoryMap, Module, Protocol, Text, MAX_MODULES};

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

#[used]
#[unsafe(link_section = ".requests")]
static LOADER: BootloaderInfoRequest = BootloaderInfoRequest::new();

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

/// Builds the `BootInfo` from Limine's responses.
pub fn boot_info() -> Result<BootInfo, &'static str> {
    if !BASE_REVISION.is_supported() {
        return Err("the bootloader does not support Limine base revision 3");
    }
    let hhdm = HHDM.get_response().ok_or("Limine gave no HHDM")?.offset();
    if hhdm != panda_arch::HHDM_BASE {
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

    let mut modules = [None; MAX_MODULES];
    if let Some(response) = MODULES.get_response() {
        for (slot, file) in modules.iter_mut().zip(response.modules()) {
            *slot = Some(Module {
                phys: file.addr() as u64 - hhdm,
                len: file.size(),
                name: Text::from_bytes(file.string().to_bytes()),
            });
        }
    }

    let cmdline = CMDLINE
        .get_response()
        .map_or(Text::empty(), |r| Text::from_bytes(r.cmdline().to_bytes()));
    let loader = LOADER
        .get_response()
        .map_or(Text::from_bytes(b"Limine"), |r| {
            let mut buf = [0u8; 64];
            let (name, version) = (r.name().as_bytes(), r.version().as_bytes());
            let n = name.len().min(40);
            buf[..n].copy_from_slice(&name[..n]);
            buf[n] = b' ';
            let m = version.len().min(63 - n);
            buf[n + 1..n + 1 + m].copy_from_slice(&version[..m]);
            Text::from_bytes(&buf[..n + 1 + m])
        });

    Ok(BootInfo {
        protocol: Protocol::Limine,
        hhdm_offset: hhdm,
        memory_map: map,
        rsdp: RSDP.get_response().map(|r| r.address() as u64),
        modules,
        cmdline,
        kernel_phys: address.physical_base(),
        kernel_virt: address.virtual_base(),
        loader,
    })
}
