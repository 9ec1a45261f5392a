//! The TSC as the kernel's clock.
//!
//! The TSC frequency comes from CPUID leaf 0x15 (crystal ratio) or 0x16 when they give
//! it, and otherwise from counting TSC ticks across 5 ms windows of the legacy PIT
//! (channel 2, gated through port 0x61), which every PC and QEMU has. Until
//! calibration, `now_ns` reads 0. Where the ACPI PM timer exists,
//! `calibrate_with_pm_timer` measures against it instead of the PIT.
//!
//! A single window is fragile on a loaded or virtual machine: a CPU held up in the
//! middle of a reference read skews it (seen under TCG with busy vCPUs: 64-238 GHz from
//! the PIT, 4194 MHz instead of about 2600 from the PM timer). So each method takes
//! several windows, brackets every reference read between two TSC reads and drops a
//! window whose reads took over 1/200 of it, takes the median (the PIT: the smallest, as a late
//! look at its gate only ever lengthens a window), and refuses a result outside
//! 100 MHz-20 GHz, keeping the previous estimate.

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;

use crate::cpu::{cpuid, rdtsc};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

/// How the TSC frequency was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calibration {
    Cpuid15,
    Cpuid16,
    Pit,
    AcpiPmTimer,
}

/// Records the TSC at kernel entry; `now_ns` counts from here.
pub fn mark_boot() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

fn from_cpuid() -> Option<(u64, Calibration)> {
    if cpuid(0, 0).eax >= 0x15 {
        let r = cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return Some((
                r.ecx as u64 * r.ebx as u64 / r.eax as u64,
                Calibration::Cpuid15,
            ));
        }
    }
    if cpuid(0, 0).eax >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return Some((mhz as u64 * 1_000_000, Calibration::Cpuid16));
        }
    }
    None
}

pub use panda_firmware::clock::PLAUSIBLE_HZ;
use panda_firmware::clock::{median_rate, Window};

/// The smallest of several 5 ms PIT windows (a window can only come out too long: the
/// gate is seen late, never early).
fn from_pit() -> u64 {
    (0..5)
        .map(|_| pit_window())
        .filter(|hz| PLAUSIBLE_HZ.contains(hz))
        .min()
        .unwrap_or(0)
}

fn pit_window() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 5;
    let count = (PIT_HZ * MS / 1000) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // SAFETY: ports 0x42/0x43/0x61 are the PIT's channel 2 and its gate on every PC;
    // programming them touches no memory.
    unsafe {
        let g = gate.read();
        gate.write((g & !0x02) & !0x01); // speaker off, gate low
        cmd.write(0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
        ch2.write(count as u8);
        ch2.write((count >> 8) as u8);
        let g = gate.read();
        gate.write(g | 0x01); // gate high: count starts
        let start = rdtsc();
        let mut spins: u64 = 0;
        while gate.read() & 0x20 == 0 {
            spins += 1;
            if spins > 1_000_000_000 {
                break;
            }
        }
        let end = rdtsc();
        (end - start) * 1000 / MS
    }
}

/// Finds the TSC frequency. Called once on the boot CPU.
pub fn calibrate() -> (u64, Calibration) {
    let (hz, how) = from_cpuid().unwrap_or_else(|| (from_pit(), Calibration::Pit));
    TSC_HZ.store(hz.max(1), Ordering::Relaxed);
    (hz, how)
}

/// What `calibrate_with_pm_timer` found: the rate it keeps, and how many of its
/// windows were used and how far apart they were (parts per million of the median).
#[derive(Clone, Copy, Debug)]
pub struct PmCalibration {
    pub hz: u64,
    pub windows_used: usize,
    pub windows: usize,
    pub spread_ppm: u64,
    /// False if no window gave a plausible rate: `hz` is then the earlier estimate.
    pub accepted: bool,
}

/// Measures the TSC against the ACPI PM timer (3.579545 MHz) at I/O `port`, replacing
/// the boot-time estimate: the median of 7 windows of 5 ms, each reference read
/// bracketed by TSC reads, windows whose reads took over 1/200 of the window dropped.
/// The PM timer is a fixed-rate reference on every ACPI machine; the PIT is only the
/// fallback before ACPI is parsed.
pub fn calibrate_with_pm_timer(port: u16, bits32: bool) -> PmCalibration {
    const PM_HZ: u64 = 3_579_545;
    const WINDOWS: usize = 7;
    let mask: u32 = if bits32 { u32::MAX } else { 0x00ff_ffff };
    let mut timer: Port<u32> = Port::new(port);
    // SAFETY: the port is the PM timer's, from the FADT; reading it has no side effects.
    let mut read = || unsafe { timer.read() } & mask;
    // A reference read with the TSC just before and after it.
    let mut stamp = || {
        let before = rdtsc();
        let pm = read();
        (pm, before, rdtsc())
    };
    let want = PM_HZ / 200;
    let mut windows = [Window {
        tsc: 0,
        reference: 0,
        read_cost: 0,
    }; WINDOWS];
    for w in windows.iter_mut() {
        let (start_pm, a0, a1) = stamp();
        let (mut end_pm, mut b0, mut b1) = (start_pm, a0, a1);
        let mut spins = 0u64;
        while ((end_pm.wrapping_sub(start_pm) & mask) as u64) < want && spins < 50_000_000 {
            (end_pm, b0, b1) = stamp();
            spins += 1;
        }
        *w = Window {
            // The TSC between the middles of the two reads.
            tsc: (b0 + b1) / 2 - (a0 + a1) / 2,
            reference: (end_pm.wrapping_sub(start_pm) & mask) as u64,
            read_cost: (a1 - a0) + (b1 - b0),
        };
    }
    match median_rate(&mut windows, PM_HZ, 200) {
        Some(rate) => {
            TSC_HZ.store(rate.hz, Ordering::Relaxed);
            PmCalibration {
                hz: rate.hz,
                windows_used: rate.used,
                windows: WINDOWS,
                spread_ppm: rate.spread_ppm,
                accepted: true,
            }
        }
        None => PmCalibration {
            hz: tsc_hz(),
            windows_used: 0,
            windows: WINDOWS,
            spread_ppm: 0,
            accepted: false,
        },
    }
}

/// TSC ticks per second (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = tsc_hz();
    if hz == 0 {
        return 0;
    }
    (ticks as u128 * 1_000_000_000 / hz as u128) as u64
}

/// Nanoseconds since kernel entry.
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed)))
}
