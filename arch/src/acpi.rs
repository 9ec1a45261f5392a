//! ACPI discovery through the `acpi` crate: processors, I/O APICs, interrupt source
//! overrides, HPET, the PM timer and the NUMA affinity of CPUs and memory (SRAT,
//! decoded by `panda_firmware::srat`), copied out into plain data.
//!
//! The crate maps tables through an `AcpiHandler`. Panda's handler asks the kernel
//! tables (`kernel_tables::map_ram`) for a virtual address of each physical range: RAM,
//! including firmware tables in "reserved" RAM, is reached through the HHDM, which is
//! extended on demand. Nothing is unmapped: firmware tables stay readable. The tables
//! are found from the RSDP the boot protocol reported, which the boot entry records
//! here (`rsdp`); no caller names a physical address.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use acpi::madt::{Madt, MadtEntry};
use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiHandler, AcpiTable, AcpiTables, HpetInfo, PhysicalMapping};
use panda_firmware::srat::{self, Affinity};

use crate::percpu::MAX_CPUS;
use crate::probe::Fault;

/// The SRAT as the `acpi` crate finds it: its header (the body is decoded from bytes).
#[repr(C, packed)]
struct Srat {
    header: SdtHeader,
}

// SAFETY: `Srat` is `repr(C)` and starts with the SDT header, as the trait requires, and
// claims the SRAT's signature; the crate validates the header's signature and checksum.
unsafe impl AcpiTable for Srat {
    const SIGNATURE: Signature = Signature::SRAT;

    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// Most NUMA nodes, and memory ranges with an affinity, kept.
pub const MAX_NODES: usize = 16;
pub const MAX_NUMA_RANGES: usize = 64;

/// One NUMA node (an SRAT proximity domain) as the SRAT describes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Node {
    pub domain: u32,
    /// Enabled CPUs in it.
    pub cpus: usize,
    /// Bytes of enabled memory ranges in it.
    pub memory: u64,
}

/// The machine's NUMA layout (empty without an SRAT: one node, no affinities known).
#[derive(Clone, Debug)]
pub struct Numa {
    pub nodes: [Node; MAX_NODES],
    pub node_count: usize,
    /// Each enabled CPU's domain: (APIC id, domain).
    pub cpu_domains: [(u32, u32); MAX_CPUS],
    pub cpu_count: usize,
    /// Enabled memory ranges: (base, length, domain).
    pub ranges: [(u64, u64, u32); MAX_NUMA_RANGES],
    pub range_count: usize,
    /// Affinities that did not fit (more nodes or ranges than kept).
    pub dropped: usize,
}

impl Numa {
    const fn empty() -> Self {
        Self {
            nodes: [Node {
                domain: 0,
                cpus: 0,
                memory: 0,
            }; MAX_NODES],
            node_count: 0,
            cpu_domains: [(0, 0); MAX_CPUS],
            cpu_count: 0,
            ranges: [(0, 0, 0); MAX_NUMA_RANGES],
            range_count: 0,
            dropped: 0,
        }
    }

    /// The nodes found (none without an SRAT).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes[..self.node_count]
    }

    /// The domain of the CPU with local APIC id `apic_id`, if the SRAT names it.
    pub fn domain_of_cpu(&self, apic_id: u32) -> Option<u32> {
        self.cpu_domains[..self.cpu_count]
            .iter()
            .find(|&&(a, _)| a == apic_id)
            .map(|&(_, d)| d)
    }

    /// The index of `domain`'s node, added if new (`None`: no room for another).
    fn node(&mut self, domain: u32) -> Option<usize> {
        match self.nodes().iter().position(|n| n.domain == domain) {
            Some(i) => Some(i),
            None if self.node_count < MAX_NODES => {
                self.nodes[self.node_count].domain = domain;
                self.node_count += 1;
                Some(self.node_count - 1)
            }
            None => None,
        }
    }

    fn add(&mut self, affinity: Affinity) {
        match affinity {
            Affinity::Cpu {
                apic_id,
                domain,
                enabled: true,
            } => match self.node(domain) {
                Some(i) if self.cpu_count < MAX_CPUS => {
                    self.nodes[i].cpus += 1;
                    self.cpu_domains[self.cpu_count] = (apic_id, domain);
                    self.cpu_count += 1;
                }
                _ => self.dropped += 1,
            },
            Affinity::Memory {
                base,
                length,
                domain,
                enabled: true,
            } => match self.node(domain) {
                Some(i) if self.range_count < MAX_NUMA_RANGES => {
                    self.nodes[i].memory += length;
                    self.ranges[self.range_count] = (base, length, domain);
                    self.range_count += 1;
                }
                _ => self.dropped += 1,
            },
            _ => {}
        }
    }
}

/// The NUMA layout from the SRAT, if the machine has one.
fn numa(tables: &AcpiTables<Handler>) -> Numa {
    let mut numa = Numa::empty();
    let Ok(table) = tables.find_table::<Srat>() else {
        return numa;
    };
    let len = { table.get().header.length } as usize;
    let Some(virt) = crate::kernel_tables::map_ram(table.physical_start() as u64, len as u64)
    else {
        return numa;
    };
    // SAFETY: `map_ram` made the table's `len` bytes readable at `virt` for good, and
    // firmware tables are not written while the kernel runs.
    let bytes = unsafe { core::slice::from_raw_parts(virt as *const u8, len) };
    if let Some(body) = bytes.get(srat::BODY_OFFSET..) {
        srat::entries(body).for_each(|a| numa.add(a));
    }
    numa
}

/// The most I/O APICs and interrupt source overrides kept.
pub const MAX_IOAPICS: usize = 8;
pub const MAX_OVERRIDES: usize = 16;

/// Maps `[phys, phys + len)` and returns the virtual address of `phys`, or `None` if
/// it cannot be mapped.
type MapFn = fn(phys: u64, len: u64) -> Option<u64>;

#[derive(Clone)]
struct Handler {
    map: MapFn,
}

impl AcpiHandler for Handler {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let Some(virt) = (self.map)(phys as u64, size as u64) else {
            // The acpi crate's interface has no error path here; the kernel's map
            // function only fails when it runs out of early page-table frames.
            panic!("acpi: cannot map firmware table at {phys:#x} (+{size:#x})");
        };
        let virt = NonNull::new(virt as *mut T).expect("map function returned null");
        // SAFETY: `virt` maps `size` bytes from `phys` for as long as the kernel runs
        // (mappings are never removed), which is what PhysicalMapping requires.
        unsafe { PhysicalMapping::new(phys, virt, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// One processor from the MADT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processor {
    pub apic_id: u32,
    pub uid: u32,
    /// Usable now (flags bit 0).
    pub enabled: bool,
    /// Not enabled, but may be brought online later (flags bit 1).
    pub online_capable: bool,
}

/// An I/O APIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct IoApic {
    pub id: u8,
    pub address: u64,
    pub gsi_base: u32,
}

/// An ISA IRQ routed to another global system interrupt.
#[derive(Clone, Copy, Debug, Default)]
pub struct Override {
    pub irq: u8,
    pub gsi: u32,
    pub flags: u16,
}

/// Where the ACPI PM timer is.
#[derive(Clone, Copy, Debug)]
pub struct PmTimer {
    /// I/O port (system I/O space) or physical address (memory space).
    pub address: u64,
    pub io_port: bool,
    pub bits32: bool,
}

/// What ACPI says about this machine.
#[derive(Clone, Debug)]
pub struct Platform {
    pub processors: [Processor; MAX_CPUS],
    pub processor_count: usize,
    /// Usable processors (enabled or online-capable) listed beyond MAX_CPUS: not run,
    /// and said so in a warning at boot.
    pub processors_dropped: usize,
    /// Of those, the enabled ones (they count in the `N of M CPUs online` summary).
    pub enabled_dropped: usize,
    /// Entries neither enabled nor online-capable (firmware lists them for CPUs that
    /// can never run): skipped, taking no slot.
    pub processors_unusable: usize,
    pub local_apic_address: u64,
    pub ioapics: [IoApic; MAX_IOAPICS],
    pub ioapic_count: usize,
    pub overrides: [Override; MAX_OVERRIDES],
    pub override_count: usize,
    pub has_8259: bool,
    pub hpet: Option<u64>,
    pub pm_timer: Option<PmTimer>,
    /// NUMA nodes and affinities (SRAT).
    pub numa: Numa,
}

impl Platform {
    /// The processors found that can run: enabled, or online-capable.
    pub fn processors(&self) -> &[Processor] {
        &self.processors[..self.processor_count]
    }

    pub fn ioapics(&self) -> &[IoApic] {
        &self.ioapics[..self.ioapic_count]
    }

    pub fn overrides(&self) -> &[Override] {
        &self.overrides[..self.override_count]
    }

    fn add_processor(&mut self, p: Processor) {
        // x2APIC entries may repeat xAPIC ones (firmware lists both for ids < 255).
        if self.processors().iter().any(|q| q.apic_id == p.apic_id) {
            return;
        }
        if !p.enabled && !p.online_capable {
            self.processors_unusable += 1;
            return;
        }
        if self.processor_count == MAX_CPUS {
            self.processors_dropped += 1;
            self.enabled_dropped += usize::from(p.enabled);
            return;
        }
        self.processors[self.processor_count] = p;
        self.processor_count += 1;
    }
}

/// Why discovery failed.
#[derive(Debug)]
pub enum Error {
    /// The boot protocol reported no RSDP.
    NoRsdp,
    Tables(acpi::AcpiError),
    NoMadt,
}

/// The FADT's power-off and reset registers (those in I/O space) and the DSDT's `\_S5`.
fn power_info(
    tables: &AcpiTables<Handler>,
    fadt: &acpi::fadt::Fadt,
    map: MapFn,
) -> crate::power::AcpiPower {
    let io_port = |a: acpi::address::GenericAddress| {
        (a.address_space == acpi::address::AddressSpace::SystemIo && a.address != 0)
            .then_some(a.address as u16)
    };
    let flags = fadt.flags;
    let reset = if flags.supports_system_reset_via_fadt() {
        fadt.reset_register()
            .ok()
            .and_then(io_port)
            .map(|port| (port, { fadt.reset_value }))
    } else {
        None
    };
    let s5 = tables.dsdt().ok().and_then(|dsdt| {
        let len = dsdt.length as usize;
        let virt = map(dsdt.address as u64, len as u64)?;
        // SAFETY: `map` made `len` bytes from the DSDT's AML stream readable at `virt`
        // for good (the same contract the acpi crate's handler relies on), and firmware
        // tables are not written while the kernel runs.
        let aml = unsafe { core::slice::from_raw_parts(virt as *const u8, len) };
        panda_firmware::s5::sleep_types(aml)
    });
    crate::power::AcpiPower {
        pm1a_control: fadt.pm1a_control_block().ok().and_then(io_port),
        pm1b_control: fadt.pm1b_control_block().ok().flatten().and_then(io_port),
        s5,
        reset,
        smi_command: { fadt.smi_cmd_port } as u16,
        acpi_enable: { fadt.acpi_enable },
    }
}

/// The RSDP's physical address as the boot protocol reported it (0: none), recorded by
/// the boot entry; kept here, where the kernel cannot change it, so that the tables are
/// only ever parsed from the firmware's RSDP.
static RSDP: AtomicU64 = AtomicU64::new(0);

/// Records the boot protocol's RSDP (the boot entry calls it once, before the kernel
/// runs).
pub(crate) fn record_rsdp(rsdp: Option<u64>) {
    RSDP.store(rsdp.unwrap_or(0), Ordering::Release);
}

/// The RSDP's physical address as the boot protocol reported it, if it did.
pub fn rsdp() -> Option<u64> {
    Some(RSDP.load(Ordering::Acquire)).filter(|&p| p != 0)
}

/// The first 8 bytes of the RSDP (`rsdp()`), read through the HHDM, which must be the
/// signature `"RSD PTR "`; a fault reading them is reported. `None` without an RSDP.
///
/// Sound: no argument; the address is the firmware's RSDP, in RAM or the legacy BIOS
/// area (both mapped in the HHDM as memory, never device registers), so the read has no
/// side effect, and the exception-table probe forms no Rust reference to it.
pub fn rsdp_signature() -> Option<Result<[u8; 8], Fault>> {
    let rsdp = rsdp()?;
    let mut sig = [0u8; 8];
    Some(crate::probe::read_bytes(crate::HHDM_BASE + rsdp, &mut sig).map(|()| sig))
}

/// Parses the ACPI tables reachable from the boot protocol's RSDP (`rsdp()`), mapping
/// them with the kernel tables' `map_ram`; `Error::NoRsdp` if the boot protocol gave
/// none. Tables are only read, and every one is checksummed by the `acpi` crate.
///
/// Takes no address: the `acpi` crate forms references to what it parses, which is
/// sound only for firmware tables, which nothing writes while the kernel runs.
pub fn discover() -> Result<Platform, Error> {
    // One function and a plain `Result`: a `Platform` is large, and the boot stack
    // has room for few copies of it.
    let rsdp = rsdp().ok_or(Error::NoRsdp)?;
    let handler = Handler {
        map: crate::kernel_tables::map_ram,
    };
    // SAFETY: `rsdp` is the boot protocol's (recorded by the boot entry, see `RSDP`),
    // which got it from firmware; the handler maps every range the crate asks for
    // before it is read.
    let tables = unsafe { AcpiTables::from_rsdp(handler, rsdp as usize) }.map_err(Error::Tables)?;
    let madt = tables.find_table::<Madt>().map_err(|_| Error::NoMadt)?;

    let mut platform = Platform {
        processors: [Processor::default(); MAX_CPUS],
        processor_count: 0,
        processors_dropped: 0,
        enabled_dropped: 0,
        processors_unusable: 0,
        local_apic_address: madt.get().local_apic_address as u64,
        ioapics: [IoApic::default(); MAX_IOAPICS],
        ioapic_count: 0,
        overrides: [Override::default(); MAX_OVERRIDES],
        override_count: 0,
        has_8259: madt.get().supports_8259(),
        hpet: None,
        pm_timer: None,
        numa: Numa::empty(),
    };
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(e) => {
                let flags = e.flags;
                platform.add_processor(Processor {
                    apic_id: e.apic_id as u32,
                    uid: e.processor_id as u32,
                    enabled: flags & 1 != 0,
                    online_capable: flags & 2 != 0,
                });
            }
            MadtEntry::LocalX2Apic(e) => {
                let (id, flags, uid) = (e.x2apic_id, e.flags, e.processor_uid);
                platform.add_processor(Processor {
                    apic_id: id,
                    uid,
                    enabled: flags & 1 != 0,
                    online_capable: flags & 2 != 0,
                });
            }
            MadtEntry::IoApic(e) if platform.ioapic_count < MAX_IOAPICS => {
                platform.ioapics[platform.ioapic_count] = IoApic {
                    id: e.io_apic_id,
                    address: e.io_apic_address as u64,
                    gsi_base: e.global_system_interrupt_base,
                };
                platform.ioapic_count += 1;
            }
            MadtEntry::InterruptSourceOverride(e) if platform.override_count < MAX_OVERRIDES => {
                platform.overrides[platform.override_count] = Override {
                    irq: e.irq,
                    gsi: e.global_system_interrupt,
                    flags: e.flags,
                };
                platform.override_count += 1;
            }
            MadtEntry::LocalApicAddressOverride(e) => {
                platform.local_apic_address = e.local_apic_address;
            }
            _ => {}
        }
    }
    platform.hpet = HpetInfo::new(&tables).ok().map(|h| h.base_address as u64);
    crate::time::record_hpet(platform.hpet.unwrap_or(0));
    platform.numa = numa(&tables);
    if let Ok(fadt) = tables.find_table::<acpi::fadt::Fadt>() {
        crate::power::set_acpi(power_info(
            &tables,
            &fadt.get(),
            crate::kernel_tables::map_ram,
        ));
        if let Ok(Some(block)) = fadt.get().pm_timer_block() {
            let pm = PmTimer {
                address: block.address,
                io_port: block.address_space == acpi::address::AddressSpace::SystemIo,
                bits32: {
                    let flags = fadt.get().flags;
                    flags.pm_timer_is_32_bit()
                },
            };
            if pm.io_port && pm.address <= u64::from(u16::MAX) {
                crate::time::record_pm_timer(pm.address as u16, pm.bits32);
            }
            platform.pm_timer = Some(pm);
        }
    }
    Ok(platform)
}
