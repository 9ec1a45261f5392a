//! In-kernel tests of the boot information and the memory map. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use crate::boot::{MemoryKind, MemoryMap};
use crate::ktest::support::{async_tests, ensure, fail, tests, AsyncTest, Context, Outcome, Test};

pub(crate) const TESTS: &[Test] = tests![
    boot_info_memory_map,
    boot_info_hhdm_and_rsdp,
    boot_info_kernel_claimed,
    memory_map_claim_splits,
    memory_map_usable_never_covers_reserved,
    boot_command_line_numbers_never_wrap
];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![];

fn boot_info_memory_map(ctx: &Context<'_>) -> Outcome {
    let map = &ctx.boot.memory_map;
    ensure!(
        map.check().is_ok(),
        "memory map invariant broken: {:?}",
        map.check()
    );
    let usable = map.total(MemoryKind::Usable);
    ensure!(usable >= 16 << 20, "only {usable} bytes usable");
    ensure!(map.total_ram() >= usable, "RAM total below usable total");
    Ok(())
}

fn boot_info_hhdm_and_rsdp(ctx: &Context<'_>) -> Outcome {
    ensure!(
        ctx.boot.hhdm_offset == panda_arch::HHDM_BASE,
        "HHDM at {:#x}",
        ctx.boot.hhdm_offset
    );
    let rsdp = ctx
        .boot
        .rsdp
        .ok_or_else(|| fail(format_args!("no RSDP from the bootloader")))?;
    ensure!(
        panda_arch::acpi::rsdp() == Some(rsdp),
        "arch recorded the RSDP at {:x?}, the boot info has {rsdp:#x}",
        panda_arch::acpi::rsdp()
    );
    let sig = panda_arch::acpi::rsdp_signature()
        .ok_or_else(|| fail(format_args!("arch recorded no RSDP")))?
        .map_err(|f| {
            fail(format_args!(
                "RSDP at {rsdp:#x} unreadable through the HHDM: {f:?}"
            ))
        })?;
    ensure!(&sig == b"RSD PTR ", "RSDP signature is {sig:?}");
    ensure!(
        ctx.boot.has_flag("test"),
        "command line {:?} lacks `test`",
        ctx.boot.cmdline.as_str()
    );
    Ok(())
}

fn boot_info_kernel_claimed(ctx: &Context<'_>) -> Outcome {
    let image = panda_arch::image::kernel_image();
    let (start, end) = (
        ctx.boot.kernel_virt_to_phys(image.start),
        ctx.boot.kernel_virt_to_phys(image.end),
    );
    for r in ctx.boot.memory_map.regions() {
        let overlaps = r.start < end && start < r.end;
        ensure!(
            !(overlaps && r.kind == MemoryKind::Usable),
            "kernel image [{start:#x},{end:#x}) overlaps usable {r:?}"
        );
    }
    Ok(())
}

fn memory_map_claim_splits(_: &Context<'_>) -> Outcome {
    let mut map = MemoryMap::new();
    let _ = map.add(0x10_0000, 0x80_0000, MemoryKind::Usable);
    let _ = map.claim(0x20_0000, 0x30_0000, MemoryKind::KernelAndModules);
    let _ = map.claim(0x30_0000, 0x30_1000, MemoryKind::BootloaderReclaimable);
    let r = map.regions();
    ensure!(r.len() == 4, "expected 4 regions, got {r:?}");
    ensure!(
        r[0].start == 0x10_0000 && r[0].end == 0x20_0000 && r[0].kind == MemoryKind::Usable,
        "{:?}",
        r[0]
    );
    ensure!(
        r[1].kind == MemoryKind::KernelAndModules && r[1].end == 0x30_0000,
        "{:?}",
        r[1]
    );
    ensure!(
        r[2].kind == MemoryKind::BootloaderReclaimable && r[2].end == 0x30_1000,
        "{:?}",
        r[2]
    );
    ensure!(
        r[3].start == 0x30_1000 && r[3].end == 0x80_0000 && r[3].kind == MemoryKind::Usable,
        "{:?}",
        r[3]
    );
    ensure!(map.check().is_ok(), "invariant broken");
    Ok(())
}

fn memory_map_usable_never_covers_reserved(_: &Context<'_>) -> Outcome {
    let mut map = MemoryMap::new();
    let _ = map.add(0x9_f000, 0xa_0000, MemoryKind::Reserved);
    let _ = map.add(0x0, 0xa_0000, MemoryKind::Usable);
    let _ = map.add(0x10_0000, 0x200_0000, MemoryKind::Usable);
    let _ = map.add(0x100_0000, 0x100_0800, MemoryKind::AcpiNvs);
    ensure!(map.check().is_ok(), "invariant broken: {map:?}");
    for r in map.regions() {
        let covers = |a: u64| r.start <= a && a < r.end;
        ensure!(
            !(r.kind == MemoryKind::Usable && (covers(0x9_f000) || covers(0x100_0400))),
            "usable covers reserved: {map:?}"
        );
    }
    ensure!(
        map.total(MemoryKind::Usable) == 0x9_f000 + 0x1f0_0000 - 0x1000,
        "usable total {:#x}",
        map.total(MemoryKind::Usable)
    );
    Ok(())
}

/// Numbers on the command line are parsed with checked arithmetic: a value too large
/// for what it sets is refused (the caller logs it and keeps its default), never
/// wrapped. `watchdog=18446744074` (seconds) used to wrap in the multiplication to
/// nanoseconds, to a limit of 0.29 s.
fn boot_command_line_numbers_never_wrap(_: &Context<'_>) -> Outcome {
    use crate::boot::{number, watchdog_limit_ns, BadNumber::*};
    let s = 1_000_000_000u64;
    for (text, want) in [
        ("5", Ok(5 * s)),
        ("2.5", Ok(2_500_000_000)),
        ("0.5", Ok(500_000_000)),
        ("0.499", Err(TooSmall)),
        ("0", Err(TooSmall)),
        // The most a u64 of nanoseconds holds, in whole milliseconds, and past it.
        ("18446744073.709", Ok(18_446_744_073_709_000_000)),
        ("18446744073.710", Err(TooLarge)),
        ("18446744074", Err(TooLarge)),
        ("20000000000", Err(TooLarge)),
        // Past u64 in milliseconds, and in the parse itself.
        ("18446744073709552", Err(TooLarge)),
        ("99999999999999999999999", Err(TooLarge)),
        ("", Err(NotANumber)),
        ("-1", Err(NotANumber)),
        ("1.2345", Err(NotANumber)),
        ("1.x", Err(NotANumber)),
        ("ten", Err(NotANumber)),
    ] {
        let got = watchdog_limit_ns(text);
        ensure!(got == want, "watchdog={text}: {got:?}, want {want:?}");
    }
    ensure!(
        number::<u64>("18446744073709551615") == Ok(u64::MAX),
        "u64::MAX"
    );
    ensure!(
        number::<u64>("18446744073709551616") == Err(TooLarge),
        "u64::MAX + 1 taken"
    );
    ensure!(
        number::<u32>("4294967296") == Err(TooLarge),
        "u32::MAX + 1 taken"
    );
    ensure!(number::<u32>("0x10") == Err(NotANumber), "hex taken");
    Ok(())
}
