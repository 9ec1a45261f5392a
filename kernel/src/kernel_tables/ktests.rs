//! In-kernel tests of the kernel's own page tables (probed: what faults and what does not). They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use panda_arch::probe::{self, RetIn};

use crate::boot::MemoryKind;
use crate::ktest::support::{async_tests, ensure, fail, tests, AsyncTest, Context, Outcome, Test};

pub(crate) const TESTS: &[Test] = tests![
    paging_kernel_tables_active,
    paging_text_is_read_only,
    paging_rodata_is_read_only,
    paging_data_is_writable,
    paging_only_text_executes,
    paging_stack_guard_pages_unmapped,
    paging_lower_half_empty,
    paging_hhdm_covers_usable_ram,
    paging_kernel_half_shared_slots
];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![];

fn paging_kernel_tables_active(ctx: &Context<'_>) -> Outcome {
    let active = panda_arch::paging::active_root();
    ensure!(
        active == ctx.tables.root,
        "CR3 {active:#x}, kernel tables at {:#x}",
        ctx.tables.root
    );
    let early = ctx.boot.memory_map.total(MemoryKind::KernelEarly);
    let expected = ctx.tables.table_bytes + ctx.tables.reserve_bytes;
    // AP stacks and the trampoline page are claimed as KernelEarly too.
    ensure!(
        early >= expected,
        "{early} bytes claimed early, but tables use or reserve {expected}"
    );
    let root_claimed =
        ctx.boot.memory_map.regions().iter().any(|r| {
            r.kind == MemoryKind::KernelEarly && (r.start..r.end).contains(&ctx.tables.root)
        });
    ensure!(
        root_claimed,
        "the PML4 frame {:#x} is not claimed",
        ctx.tables.root
    );
    Ok(())
}

fn expect_write_fault(what: &str, addr: u64) -> Outcome {
    // The probe writes the byte's own value: if the write wrongly succeeds, nothing is
    // corrupted and the remaining tests still run.
    let mut current = [0u8; 1];
    probe::read_image_bytes(addr, &mut current)
        .ok_or_else(|| fail(format_args!("{what} at {addr:#x} is outside the image")))?
        .map_err(|f| fail(format_args!("{what} at {addr:#x} unreadable: {f:?}")))?;
    let rewrite = probe::rewrite_image_byte(addr).ok_or_else(|| {
        fail(format_args!(
            "{what} at {addr:#x} is not in the kernel image"
        ))
    })?;
    match rewrite {
        Ok(()) => Err(fail(format_args!(
            "writing {what} at {addr:#x} did not fault"
        ))),
        Err(f) => {
            ensure!(
                f.vector == 14 && f.protection() && f.write(),
                "wrong fault {f:?}"
            );
            ensure!(
                f.address == addr,
                "cr2 {:#x}, expected {addr:#x}",
                f.address
            );
            Ok(())
        }
    }
}

fn paging_text_is_read_only(_: &Context<'_>) -> Outcome {
    let image = panda_arch::image::kernel_image();
    expect_write_fault(".text", probe::ret_address(RetIn::Text))?;
    expect_write_fault(".text start", image.text.0)
}

fn paging_rodata_is_read_only(_: &Context<'_>) -> Outcome {
    expect_write_fault(".rodata", probe::ret_address(RetIn::Rodata))?;
    let image = panda_arch::image::kernel_image();
    expect_write_fault(".rodata end", image.rodata.1 - 1)
}

fn paging_data_is_writable(_: &Context<'_>) -> Outcome {
    let addr = probe::ret_address(RetIn::Data);
    // The probe writes the byte's own value back: the write must not fault, and the
    // byte keeps its value.
    probe::rewrite_image_byte(addr)
        .ok_or_else(|| fail(format_args!("the ret in .data at {addr:#x} was refused")))?
        .map_err(|f| fail(format_args!("write to .data faulted: {f:?}")))?;
    let mut now = [0u8; 1];
    probe::read_image_bytes(addr, &mut now)
        .ok_or_else(|| fail(format_args!(".data at {addr:#x} is outside the image")))?
        .map_err(|f| fail(format_args!(".data at {addr:#x} unreadable: {f:?}")))?;
    ensure!(
        now[0] == 0xc3,
        "the probe changed .data: read back {:#x}",
        now[0]
    );
    Ok(())
}

fn paging_only_text_executes(_: &Context<'_>) -> Outcome {
    probe::exec_ret_in(RetIn::Text)
        .map_err(|f| fail(format_args!("ret in .text faulted: {f:?}")))?;
    for kind in [RetIn::Rodata, RetIn::Data] {
        match probe::exec_ret_in(kind) {
            Ok(()) => return Err(fail(format_args!("executed a ret in {kind:?}: NX missing"))),
            Err(f) => ensure!(f.fetch() && f.protection(), "{kind:?}: wrong fault {f:?}"),
        }
    }
    Ok(())
}

fn paging_stack_guard_pages_unmapped(_: &Context<'_>) -> Outcome {
    // The boot CPU's guards are the boot stacks' (in .bss); every online CPU's guard
    // pages, the APs' in the stack window, must fault.
    let boot = probe::stack_guards(0)
        .ok_or_else(|| fail(format_args!("the boot CPU's stack guards are not recorded")))?;
    let expected = panda_arch::stacks::boot_stacks().guards();
    ensure!(
        boot.map(|p| p.guard) == expected,
        "CPU 0's guards {:x?} are not the boot stacks' {expected:x?}",
        boot.map(|p| p.guard)
    );
    let mut cpus = 0;
    for cpu in panda_arch::percpu::online().map(|c| c.index()) {
        let probes = probe::stack_guards(cpu)
            .ok_or_else(|| fail(format_args!("CPU {cpu}'s stack guards are not recorded")))?;
        for p in probes {
            let guard = p.guard;
            match p.inside {
                Ok(_) => {
                    return Err(fail(format_args!(
                        "CPU {cpu}: guard page {guard:#x} is mapped"
                    )))
                }
                Err(f) => ensure!(
                    f.vector == 14 && !f.protection() && f.address == guard + 8,
                    "CPU {cpu}: wrong fault {f:?}"
                ),
            }
            // The stack right above the guard is mapped.
            p.above.map_err(|f| {
                fail(format_args!(
                    "CPU {cpu}: stack above {guard:#x} unmapped: {f:?}"
                ))
            })?;
        }
        cpus += 1;
    }
    ensure!(cpus > 0, "no CPU is online");
    Ok(())
}

fn paging_lower_half_empty(_: &Context<'_>) -> Outcome {
    for addr in [
        0u64,
        0x1000,
        0x20_0000,
        0x40_0000,
        0x1_0000_0000,
        0x7fff_ffff_f000,
    ] {
        // The user-half probe reads the current (kernel) tables' lower half.
        ensure!(
            probe::read_user_u64(addr).is_err(),
            "lower-half address {addr:#x} is mapped"
        );
    }
    Ok(())
}

fn paging_hhdm_covers_usable_ram(ctx: &Context<'_>) -> Outcome {
    for r in ctx
        .boot
        .memory_map
        .regions()
        .iter()
        .filter(|r| r.kind.is_ram())
    {
        for phys in [r.start, r.end - 8] {
            let virt = ctx.boot.hhdm_offset + phys;
            let (p, bits) = panda_arch::kernel_tables::translate(virt)
                .ok_or_else(|| fail(format_args!("HHDM misses {phys:#x} ({:?})", r.kind)))?;
            ensure!(p == phys, "HHDM maps {virt:#x} to {p:#x}");
            ensure!(
                bits & panda_arch::paging::flags::NO_EXECUTE != 0,
                "HHDM page {phys:#x} is executable"
            );
        }
    }
    Ok(())
}

fn paging_kernel_half_shared_slots(ctx: &Context<'_>) -> Outcome {
    ensure!(
        panda_arch::kernel_tables::kernel_root() == ctx.tables.root,
        "the kernel tables are not the ones built at boot"
    );
    for slot in 256..512 {
        let entry = panda_arch::kernel_tables::root_entry(slot);
        ensure!(
            entry & 1 != 0,
            "PML4 slot {slot} is empty: the kernel half would not be shared"
        );
    }
    for slot in 0..256 {
        let entry = panda_arch::kernel_tables::root_entry(slot);
        ensure!(entry == 0, "PML4 slot {slot} (lower half) is {entry:#x}");
    }
    Ok(())
}
