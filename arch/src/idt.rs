//! The interrupt descriptor table: 256 gates, each pointing at its trap stub.
//!
//! Every vector has a gate, so no exception or stray interrupt can find an empty
//! descriptor (which would itself become a #GP and then a #DF). #DF, NMI and #MC switch
//! to their IST stacks. Breakpoint is reachable from ring 3 (`int3` in user programs).

use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use crate::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CS};
use crate::trap::stub_address;

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64, ist: u8, dpl: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            // present, DPL, 64-bit interrupt gate (interrupts off on entry)
            type_attr: 0x80 | (dpl << 5) | 0xe,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: spin::Once<Idt> = spin::Once::new();

/// Builds the IDT once and loads it on the calling CPU. Every CPU shares it.
pub fn load() {
    let idt = IDT.call_once(|| {
        let mut gates = [Gate::MISSING; 256];
        for (vector, gate) in gates.iter_mut().enumerate() {
            let ist = match vector {
                8 => IST_DOUBLE_FAULT,
                2 => IST_NMI,
                18 => IST_MACHINE_CHECK,
                _ => 0,
            };
            let dpl = if vector == 3 { 3 } else { 0 };
            *gate = Gate::interrupt(stub_address(vector as u8), ist, dpl);
        }
        Idt(gates)
    });
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: the table is 'static and every gate points at a stub of `trap`, which
    // saves the full state and returns with iretq.
    unsafe { lidt(&pointer) };
}
