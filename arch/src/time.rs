//! The TSC as the kernel's clock, and reference counters for waits that must not
//! depend on it.
//!
//! `calibrate` measures the TSC against every reference counter the machine has: the
//! HPET (from the ACPI HPET table), the ACPI PM timer (from the FADT) and the PIT
//! (channel 2, free-running, read by latching its count), each in 8 windows; CPUID
//! leaves 0x15/0x16, where present, add a stated rate. `panda_firmware::clock::choose`
//! accepts a rate only when two references agree or one has many windows that agree
//! among themselves (see there for the tolerances). If not, it measures again with
//! windows 4 times longer (5, 20, 80, 320 ms), and after the last round it gives up: the
//! caller stops the machine. Until then `now_ns` reads 0.
//!
//! A window's two ends are reference reads bracketed by TSC reads (the tightest of
//! three at each end); a CPU held up between them does not skew it, since the TSC and
//! the reference both keep counting. The reference is polled throughout, so its wraps
//! are counted, and a window in which two polls (from the start of one read to the end
//! of the next, in TSC ticks) were further apart than the counter's wrap period could
//! be at the lowest plausible TSC rate starts afresh (a PIT wraps
//! every 55 ms, a 24-bit PM timer every 4.7 s).
//!
//! `Stopwatch` and `wait_us` measure time on a reference counter, never the TSC: the
//! counter that won calibration, and before calibration the PIT. A bad TSC rate
//! therefore cannot turn a one-second time-out into microseconds or hours. Where the
//! CPU is held up for longer than the counter's wrap period a wrap is missed and the
//! wait comes out longer, never shorter.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86_64::instructions::port::Port;

use crate::cpu::{cpuid, rdtsc};
use panda_firmware::clock::{choose, estimate, Window};

/// The HPET's register block (physical) as the ACPI HPET table names it, and the PM
/// timer's I/O port (bits 0..16, bit 16: 32 bits wide, bit 17: present) as the FADT
/// names it; recorded by `acpi::discover` (0: none), so `Counter` touches only the
/// registers the firmware's tables named, never an address or port a caller chose.
static HPET_BASE: AtomicU64 = AtomicU64::new(0);
static PM_TIMER_PORT: AtomicU64 = AtomicU64::new(0);

/// Records the HPET the ACPI tables name (`acpi::discover`; 0: none).
pub(crate) fn record_hpet(base: u64) {
    HPET_BASE.store(base, Ordering::Release);
}

/// Records the PM timer's I/O port the FADT names (`acpi::discover`).
pub(crate) fn record_pm_timer(port: u16, bits32: bool) {
    PM_TIMER_PORT.store(
        u64::from(port) | u64::from(bits32) << 16 | 1 << 17,
        Ordering::Release,
    );
}

/// The HPET's physical register block, once `acpi::discover` found one.
fn hpet_base() -> Option<u64> {
    Some(HPET_BASE.load(Ordering::Acquire)).filter(|&b| b != 0)
}

/// The PM timer's I/O port and whether it is 32 bits wide, once `acpi::discover` found
/// one in I/O space.
fn pm_timer_port() -> Option<(u16, bool)> {
    let v = PM_TIMER_PORT.load(Ordering::Acquire);
    (v & 1 << 17 != 0).then_some((v as u16, v & 1 << 16 != 0))
}

pub use panda_firmware::clock::{Choice, Estimate, Refusal, Source, PLAUSIBLE_HZ};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

/// Records the TSC at kernel entry; `now_ns` counts from here.
pub fn mark_boot() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// A free-running reference counter, counting up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    kind: Kind,
    /// Ticks per second.
    hz: u64,
    /// The counter's width: it wraps from `mask` to 0.
    mask: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The HPET's main counter, at this virtual address.
    Hpet(u64),
    /// The ACPI PM timer at this I/O port.
    PmTimer(u16),
    /// PIT channel 2 (ports 0x42/0x43/0x61).
    Pit,
}

const PIT_HZ: u64 = 1_193_182;
const PM_HZ: u64 = 3_579_545;

impl Counter {
    pub fn source(&self) -> Source {
        match self.kind {
            Kind::Hpet(_) => Source::Hpet,
            Kind::PmTimer(_) => Source::PmTimer,
            Kind::Pit => Source::Pit,
        }
    }

    /// The PIT's channel 2, set free-running (mode 2, full 16-bit count, gate high,
    /// speaker off). Every PC and QEMU has it; on some new chipsets it may not count,
    /// which calibration sees as a reference with no plausible window.
    pub fn pit() -> Counter {
        let mut gate: Port<u8> = Port::new(0x61);
        let mut cmd: Port<u8> = Port::new(0x43);
        let mut ch2: Port<u8> = Port::new(0x42);
        // SAFETY: ports 0x42/0x43/0x61 are the PIT's channel 2 and its gate on every PC;
        // programming them touches no memory. Channel 2 drives only the speaker, kept off.
        unsafe {
            let g = gate.read();
            gate.write((g & !0x02) | 0x01); // speaker off, gate high
            cmd.write(0b1011_0100); // channel 2, lo/hi byte, mode 2, binary
            ch2.write(0); // a reload of 0 is 65536
            ch2.write(0);
        }
        Counter {
            kind: Kind::Pit,
            hz: PIT_HZ,
            mask: 0xffff,
        }
    }

    /// The ACPI PM timer at the I/O port the FADT names (24 or 32 bits wide), as
    /// `acpi::discover` recorded it; `None` without one in I/O space. Takes no port: a
    /// read of another device's port can change that device (pop a FIFO, clear a flag).
    pub fn pm_timer() -> Option<Counter> {
        let (port, bits32) = pm_timer_port()?;
        Some(Counter {
            kind: Kind::PmTimer(port),
            hz: PM_HZ,
            mask: if bits32 { 0xffff_ffff } else { 0x00ff_ffff },
        })
    }

    /// The HPET whose registers the ACPI HPET table names (as `acpi::discover`
    /// recorded it): maps them, checks the tick period is one the specification allows
    /// (at most 100 ns), and starts the main counter if the firmware left it stopped.
    /// `None` without an HPET, or if it cannot be mapped or its period is invalid.
    /// Takes no address: it writes the configuration register, which at any other
    /// device's address would be a write to that device.
    pub fn hpet() -> Option<Counter> {
        let base = hpet_base()?;
        let virt = crate::kernel_tables::map_mmio(base, 1024)?;
        let reg = |off: u64| (virt + off) as *mut u64;
        // SAFETY: `virt` maps the HPET's 1 KiB register block uncached (just above);
        // the capabilities register (offset 0) is read-only.
        let caps = unsafe { reg(0).read_volatile() };
        let period_fs = caps >> 32;
        if period_fs == 0 || period_fs > 100_000_000 {
            return None;
        }
        // SAFETY: as above; the general configuration register (0x10): setting bit 0
        // (ENABLE_CNF) starts the main counter. Legacy replacement (bit 1) is left as
        // it is, and no comparator interrupt is enabled here.
        unsafe {
            let config = reg(0x10).read_volatile();
            if config & 1 == 0 {
                reg(0x10).write_volatile(config | 1);
            }
        }
        Some(Counter {
            kind: Kind::Hpet(virt + 0xf0),
            hz: 1_000_000_000_000_000 / period_fs,
            mask: if caps & (1 << 13) != 0 {
                u64::MAX
            } else {
                0xffff_ffff
            },
        })
    }

    /// Reads the counter.
    pub fn read(&self) -> u64 {
        match self.kind {
            // SAFETY: the address is the HPET main counter in the mapping made by
            // `Counter::hpet`; reading it has no side effects.
            Kind::Hpet(addr) => unsafe { (addr as *const u64).read_volatile() & self.mask },
            Kind::PmTimer(port) => {
                let mut p: Port<u32> = Port::new(port);
                // SAFETY: the port is the PM timer's, from the FADT; reading it has no
                // side effects.
                u64::from(unsafe { p.read() }) & self.mask
            }
            Kind::Pit => {
                let mut cmd: Port<u8> = Port::new(0x43);
                let mut ch2: Port<u8> = Port::new(0x42);
                // SAFETY: latching and reading channel 2's count (set up by
                // `Counter::pit`) touches no memory.
                let count = unsafe {
                    cmd.write(0b1000_0000); // latch channel 2
                    let lo = ch2.read();
                    let hi = ch2.read();
                    u16::from_le_bytes([lo, hi])
                };
                // It counts down: turn it around.
                u64::from(!count)
            }
        }
    }

    /// Ticks from `earlier` to `later`, across at most one wrap.
    fn since(&self, earlier: u64, later: u64) -> u64 {
        later.wrapping_sub(earlier) & self.mask
    }

    /// TSC ticks that are certainly shorter than one wrap of this counter, whatever
    /// the (plausible) TSC rate: two reads that far apart cannot have missed a wrap.
    fn safe_gap_tsc(&self) -> u64 {
        let wrap = u128::from(self.mask) + 1;
        let ticks = wrap * u128::from(PLAUSIBLE_HZ.start) / u128::from(self.hz);
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// A reading with the TSC just before and after it.
    fn stamp(&self) -> Stamp {
        let before = rdtsc();
        let value = self.read();
        Stamp {
            value,
            before,
            after: rdtsc(),
        }
    }
}

#[derive(Clone, Copy)]
struct Stamp {
    value: u64,
    before: u64,
    after: u64,
}

impl Stamp {
    fn cost(&self) -> u64 {
        self.after.wrapping_sub(self.before)
    }
    fn middle(&self) -> u64 {
        self.before + self.cost() / 2
    }
}

/// One window of `want` reference ticks, or at least half that if the CPU was held up
/// for longer than a wrap after that (see the module doc). A window that
/// cannot be had (the counter does not move, or the CPU keeps being held up longer
/// than a wrap) comes back with `reference: 0`, which no estimate uses.
fn measure(c: &Counter, want: u64) -> Window {
    // However slow the reference, a window is given up after twice its length at the
    // highest plausible TSC rate (so at least twice its length in real time).
    let give_up =
        u64::try_from(u128::from(want) * u128::from(PLAUSIBLE_HZ.end) * 2 / u128::from(c.hz))
            .unwrap_or(u64::MAX);
    let gap = c.safe_gap_tsc();
    let tightest = |s: [Stamp; 3]| s.into_iter().min_by_key(Stamp::cost).unwrap_or(s[0]);
    let began = rdtsc();
    let mut start = tightest([c.stamp(), c.stamp(), c.stamp()]);
    let (mut last, mut ticks) = (start, 0u64);
    let mut cut = false;
    while ticks < want {
        let s = c.stamp();
        if s.after.wrapping_sub(began) > give_up {
            return Window {
                tsc: 1,
                reference: 0,
                read_cost: 0,
            };
        }
        if s.after.wrapping_sub(last.before) > gap {
            // Held up for longer than a wrap might take, between the reads or in one of
            // them (the span runs from the start of one read to the end of the next):
            // end the window before it if it has half its length, else start again
            // from here. (A PIT, wrapping every 55 ms, meets this often on a busy host.)
            if ticks >= want / 2 {
                cut = true;
                break;
            }
            (start, last, ticks) = (s, s, 0);
            continue;
        }
        ticks += c.since(last.value, s.value);
        last = s;
    }
    // The end: the tightest of this read and two more (counting their ticks too).
    let mut end = (last, ticks);
    for _ in 0..if cut { 0 } else { 2 } {
        let s = c.stamp();
        if s.after.wrapping_sub(last.before) > gap {
            break;
        }
        ticks += c.since(last.value, s.value);
        last = s;
        if s.cost() < end.0.cost() {
            end = (s, ticks);
        }
    }
    Window {
        tsc: end.0.middle().wrapping_sub(start.middle()),
        reference: end.1,
        read_cost: start.cost() + end.0.cost(),
    }
}

/// Windows per reference per round.
pub const WINDOWS: usize = 8;
/// The window length of each round, in milliseconds.
pub const ROUND_MS: [u64; 4] = [5, 20, 80, 320];

/// The reference counters and stated rates there are to calibrate against.
#[derive(Clone, Copy, Debug, Default)]
pub struct References {
    pub hpet: Option<Counter>,
    pub pm_timer: Option<Counter>,
    pub pit: Option<Counter>,
}

/// One round of calibration: the window length, each reference's estimate, and the
/// outcome.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    pub number: usize,
    pub window_ms: u64,
    /// HPET, PM timer, PIT, CPUID 0x15, CPUID 0x16 (those present).
    pub estimates: [Option<Estimate>; 5],
    pub outcome: Result<Choice, Refusal>,
}

fn stated_rates() -> [Option<Estimate>; 2] {
    let max_leaf = cpuid(0, 0).eax;
    let leaf15 = (max_leaf >= 0x15)
        .then(|| cpuid(0x15, 0))
        .filter(|r| r.eax != 0 && r.ebx != 0 && r.ecx != 0)
        .map(|r| u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax))
        .map(|hz| Estimate::nominal(Source::Cpuid15, hz));
    let leaf16 = (max_leaf >= 0x16)
        .then(|| u64::from(cpuid(0x16, 0).eax & 0xffff))
        .filter(|&mhz| mhz != 0)
        .map(|mhz| Estimate::nominal(Source::Cpuid16, mhz * 1_000_000));
    [leaf15, leaf16]
}

/// Finds the TSC rate (see the module doc), reporting each round to `report`. On
/// success the rate is the clock's and the winning reference becomes the counter for
/// `wait_us` and `Stopwatch`; on failure nothing changes and the caller must not trust
/// the TSC (the kernel stops).
pub fn calibrate(refs: References, mut report: impl FnMut(&Round)) -> Result<Choice, Refusal> {
    let [leaf15, leaf16] = stated_rates();
    let counters = [refs.hpet, refs.pm_timer, refs.pit];
    let mut outcome = Err(Refusal::NoReference);
    for (i, ms) in ROUND_MS.into_iter().enumerate() {
        let mut estimates = [None, None, None, leaf15, leaf16];
        for (slot, c) in estimates.iter_mut().zip(counters) {
            let Some(c) = c else { continue };
            let want = c.hz * ms / 1000;
            let mut windows = [Window {
                tsc: 0,
                reference: 0,
                read_cost: 0,
            }; WINDOWS];
            // A reference that twice could not give a window (it does not count, or
            // the CPU is held up longer than its wraps) is not waited on again.
            let mut given_up = 0;
            for w in windows.iter_mut() {
                *w = measure(&c, want);
                given_up += usize::from(w.reference == 0);
                if given_up == 2 {
                    break;
                }
            }
            *slot = Some(estimate(c.source(), &mut windows, c.hz));
        }
        let mut all = [Estimate::nominal(Source::Cpuid16, 0); 5];
        let mut n = 0;
        for e in estimates.iter().flatten() {
            all[n] = *e;
            n += 1;
        }
        outcome = choose(&all[..n]);
        report(&Round {
            number: i + 1,
            window_ms: ms,
            estimates,
            outcome,
        });
        if let Ok(choice) = outcome {
            TSC_HZ.store(choice.winner.hz, Ordering::Relaxed);
            if let Some(c) = counters
                .into_iter()
                .flatten()
                .find(|c| c.source() == choice.winner.source)
            {
                set_wait_counter(c);
            }
            break;
        }
    }
    outcome
}

/// TSC ticks per second (0 before calibration).
#[inline]
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC ticks to nanoseconds (0 before calibration).
#[inline]
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = tsc_hz();
    if hz == 0 {
        return 0;
    }
    (ticks as u128 * 1_000_000_000 / hz as u128) as u64
}

/// Nanoseconds since kernel entry (0 before calibration).
#[inline]
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed)))
}

/// The counter `wait_us` and `Stopwatch` use, in atomics (a fatal path may wait while
/// another CPU is stopped anywhere): its kind (0 until `set_wait_counter`: the PIT),
/// address, rate and mask. Written once, on the boot CPU, before the APs start.
static WAIT_KIND: AtomicU64 = AtomicU64::new(0);
static WAIT_ADDR: AtomicU64 = AtomicU64::new(0);
static WAIT_HZ: AtomicU64 = AtomicU64::new(0);
static WAIT_MASK: AtomicU64 = AtomicU64::new(0);
static PIT_READY: AtomicBool = AtomicBool::new(false);

fn set_wait_counter(c: Counter) {
    let (kind, addr) = match c.kind {
        Kind::Hpet(addr) => (1, addr),
        Kind::PmTimer(port) => (2, u64::from(port)),
        Kind::Pit => (3, 0),
    };
    WAIT_ADDR.store(addr, Ordering::Relaxed);
    WAIT_HZ.store(c.hz, Ordering::Relaxed);
    WAIT_MASK.store(c.mask, Ordering::Relaxed);
    WAIT_KIND.store(kind, Ordering::Release);
}

/// The counter waits are measured on: the one that won calibration, before that the
/// PIT (set up on first use).
pub fn wait_counter() -> Counter {
    let kind = match WAIT_KIND.load(Ordering::Acquire) {
        1 => Kind::Hpet(WAIT_ADDR.load(Ordering::Relaxed)),
        2 => Kind::PmTimer(WAIT_ADDR.load(Ordering::Relaxed) as u16),
        3 => Kind::Pit,
        _ => {
            if PIT_READY.swap(true, Ordering::AcqRel) {
                return Counter {
                    kind: Kind::Pit,
                    hz: PIT_HZ,
                    mask: 0xffff,
                };
            }
            return Counter::pit();
        }
    };
    Counter {
        kind,
        hz: WAIT_HZ.load(Ordering::Relaxed),
        mask: WAIT_MASK.load(Ordering::Relaxed),
    }
}

/// Elapsed time on a reference counter (not the TSC), accumulated across the
/// counter's wraps as long as it is read at least once per wrap period (a CPU held up
/// for longer misses a wrap, and the time comes out short: waits come out long).
pub struct Stopwatch {
    counter: Counter,
    last: u64,
    ticks: u64,
    last_tsc: u64,
    tsc_still: u64,
    /// Microseconds between counter reads.
    poll_us: u64,
}

impl Stopwatch {
    /// A stopwatch that reads its counter about every millisecond.
    pub fn start() -> Stopwatch {
        Stopwatch::polling_every(1000)
    }

    /// A stopwatch that reads its counter about every `poll_us` microseconds (by the
    /// TSC; every call before calibration). Reference reads are slow, and under an
    /// emulator each takes its global lock, which APs being started need as well.
    pub fn polling_every(poll_us: u64) -> Stopwatch {
        let counter = wait_counter();
        Stopwatch {
            counter,
            last: counter.read(),
            ticks: 0,
            last_tsc: rdtsc(),
            tsc_still: 0,
            poll_us,
        }
    }

    /// Microseconds since `start`, as of the last counter read.
    pub fn elapsed_us(&mut self) -> u64 {
        let now_tsc = rdtsc();
        let since = now_tsc.wrapping_sub(self.last_tsc);
        if since >= tsc_hz() / 1_000_000 * self.poll_us {
            self.last_tsc = now_tsc;
            let value = self.counter.read();
            let moved = self.counter.since(self.last, value);
            if moved == 0 {
                self.tsc_still = self.tsc_still.saturating_add(since);
            } else {
                self.tsc_still = 0;
            }
            self.ticks += moved;
            self.last = value;
        }
        (u128::from(self.ticks) * 1_000_000 / u128::from(self.counter.hz)) as u64
    }

    /// Whether the counter has not moved for longer than a second at any plausible TSC
    /// rate: it is broken, and a wait on it would never end.
    pub fn stuck(&self) -> bool {
        self.tsc_still > PLAUSIBLE_HZ.end
    }
}

/// Waits up to `us` microseconds, measured on the reference counter (`wait_counter`),
/// for `done`; returns its last value. Also ends if the counter is stuck.
pub fn wait_us(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let mut clock = Stopwatch::polling_every((us / 16).clamp(1, 1000));
    while clock.elapsed_us() < us && !clock.stuck() {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}
