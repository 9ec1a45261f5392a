//! Choosing the TSC rate from several references that may lie: the HPET, the ACPI PM
//! timer and the PIT (each measured in timing windows) and CPUID's stated rate.
//!
//! A window is the TSC ticks and reference ticks between two reference reads, plus how
//! long those reads took in TSC ticks. A CPU held up *between* the reads does not skew a
//! window (the TSC and the reference both keep counting); one held up *in* a read does,
//! and shows as a read that took long: such a window is dropped (`MAX_READ_SHARE`).
//! Of the rest, rates outside `PLAUSIBLE_HZ` are dropped, and the largest group of
//! windows that agree with each other within `WINDOW_AGREE_PPM` is the reference's
//! estimate (`estimate`).
//!
//! `choose` then accepts a rate only when
//! - two independent references agree: two measured ones within `SOURCE_AGREE_PPM`,
//!   each with at least `PAIR_WINDOWS` agreeing windows, or a measured one and CPUID's
//!   stated rate within `NOMINAL_AGREE_PPM`; or
//! - a single measured reference has at least `ALONE_WINDOWS` agreeing windows and no
//!   other measured reference contradicts it.
//!
//! Otherwise it says why (`Refusal`), and the caller measures again with longer windows
//! or gives up: a kernel without a trustworthy clock stops instead of running on one
//! that is off by a factor of four.

use core::fmt;

/// Plausible TSC rates: anything else is a measuring error. (Seen under TCG on an
/// overloaded host: 10952 and 19227 MHz for a 2596 MHz TSC from one reference alone;
/// the range cannot catch such values, the cross-check does.)
pub const PLAUSIBLE_HZ: core::ops::Range<u64> = 100_000_000..10_000_000_000;
/// A window's two reference reads may take at most 1/`MAX_READ_SHARE` of it (so the
/// uncertainty of where in a read the reference was sampled is at most 500 ppm).
pub const MAX_READ_SHARE: u64 = 1000;
/// Windows of one reference agree if their rates are within this of each other.
pub const WINDOW_AGREE_PPM: u64 = 1000;
/// Two measured references agree if their rates are within this of each other.
pub const SOURCE_AGREE_PPM: u64 = 2000;
/// CPUID's stated rate (leaf 0x16 is whole MHz, and a nominal base frequency that can
/// be a little off the TSC) agrees with a measured one within this.
pub const NOMINAL_AGREE_PPM: u64 = 10_000;
/// Agreeing windows a measured reference needs to count in a pair of references.
pub const PAIR_WINDOWS: usize = 3;
/// Agreeing windows a measured reference needs to be trusted on its own.
pub const ALONE_WINDOWS: usize = 6;

/// One measurement window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// TSC ticks between the middles of the two reference reads.
    pub tsc: u64,
    /// Reference ticks between the two reads.
    pub reference: u64,
    /// TSC ticks the two reads themselves took.
    pub read_cost: u64,
}

/// Where a rate comes from, in order of preference when two agree (the most precise
/// measured reference first; CPUID's stated rate only ever confirms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Hpet,
    PmTimer,
    Pit,
    /// CPUID leaf 0x15 (crystal clock times a ratio).
    Cpuid15,
    /// CPUID leaf 0x16 (nominal base frequency, whole MHz).
    Cpuid16,
}

impl Source {
    /// Whether this is a stated rate rather than a measurement.
    pub fn nominal(self) -> bool {
        matches!(self, Source::Cpuid15 | Source::Cpuid16)
    }

    pub fn name(self) -> &'static str {
        match self {
            Source::Hpet => "HPET",
            Source::PmTimer => "ACPI PM timer",
            Source::Pit => "PIT",
            Source::Cpuid15 => "CPUID 0x15",
            Source::Cpuid16 => "CPUID 0x16",
        }
    }
}

/// One reference's estimate of the TSC rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub source: Source,
    /// The median of the agreeing windows (0 if none qualified).
    pub hz: u64,
    /// Windows in the largest agreeing group.
    pub agreeing: usize,
    /// Windows measured.
    pub windows: usize,
    /// Highest minus lowest rate in the agreeing group, in ppm of `hz`.
    pub spread_ppm: u64,
}

impl Estimate {
    /// A stated rate (CPUID).
    pub fn nominal(source: Source, hz: u64) -> Estimate {
        Estimate {
            source,
            hz,
            agreeing: 1,
            windows: 1,
            spread_ppm: 0,
        }
    }

    /// Whether it can take part in a pair of agreeing references.
    fn usable(&self) -> bool {
        PLAUSIBLE_HZ.contains(&self.hz) && (self.source.nominal() || self.agreeing >= PAIR_WINDOWS)
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source.nominal() {
            write!(
                f,
                "{} {} MHz (stated)",
                self.source.name(),
                self.hz / 1_000_000
            )
        } else if self.agreeing == 0 {
            write!(
                f,
                "{} no usable window of {}",
                self.source.name(),
                self.windows
            )
        } else {
            write!(
                f,
                "{} {}.{:03} MHz ({} of {} windows agree, spread {} ppm)",
                self.source.name(),
                self.hz / 1_000_000,
                self.hz / 1000 % 1000,
                self.agreeing,
                self.windows,
                self.spread_ppm
            )
        }
    }
}

fn ppm_apart(a: u64, b: u64) -> u64 {
    let (a, b) = (u128::from(a), u128::from(b));
    (a.abs_diff(b) * 1_000_000 / a.max(b).max(1)) as u64
}

/// `source`'s estimate from `windows` against a reference of `reference_hz`: windows
/// whose reads took over 1/`MAX_READ_SHARE` of them or whose rate is implausible are
/// dropped, and the largest group agreeing within `WINDOW_AGREE_PPM` of one of its
/// windows gives the median. Reorders `windows` (and overwrites their `tsc` with rates).
pub fn estimate(source: Source, windows: &mut [Window], reference_hz: u64) -> Estimate {
    let total = windows.len();
    let mut used = 0;
    for i in 0..total {
        let w = windows[i];
        if w.reference == 0 || w.read_cost.saturating_mul(MAX_READ_SHARE) > w.tsc {
            continue;
        }
        let hz = u128::from(w.tsc) * u128::from(reference_hz) / u128::from(w.reference);
        let hz = u64::try_from(hz).unwrap_or(u64::MAX);
        if PLAUSIBLE_HZ.contains(&hz) {
            // Keep plausible windows at the front, their rate in `tsc`.
            windows[used] = Window { tsc: hz, ..w };
            used += 1;
        }
    }
    let rates = &mut windows[..used];
    rates.sort_unstable_by_key(|w| w.tsc);
    // The largest run of sorted rates within WINDOW_AGREE_PPM of its lowest.
    let (mut best_start, mut best_len) = (0, 0);
    for start in 0..used {
        let len = rates[start..]
            .iter()
            .take_while(|w| ppm_apart(w.tsc, rates[start].tsc) <= WINDOW_AGREE_PPM)
            .count();
        if len > best_len {
            (best_start, best_len) = (start, len);
        }
    }
    let group = &rates[best_start..best_start + best_len];
    match (group.first(), group.last()) {
        (Some(low), Some(high)) => {
            let hz = group[best_len / 2].tsc;
            Estimate {
                source,
                hz,
                agreeing: best_len,
                windows: total,
                spread_ppm: (high.tsc - low.tsc) * 1_000_000 / hz,
            }
        }
        _ => Estimate {
            source,
            hz: 0,
            agreeing: 0,
            windows: total,
            spread_ppm: 0,
        },
    }
}

/// The rate `choose` accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The winning measured reference's estimate (its rate is the TSC rate).
    pub winner: Estimate,
    /// The reference that agreed with it; `None` if it was trusted on its own windows.
    pub confirmed_by: Option<Estimate>,
}

/// Why `choose` accepted no rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No reference was measured.
    NoReference,
    /// No measured reference gave a plausible window.
    NoPlausibleWindow,
    /// The best measured reference had too few agreeing windows to stand alone, and no
    /// other reference agreed with it.
    TooFewWindows(Estimate),
    /// Two measured references each had enough agreeing windows but disagree.
    Disagree(Estimate, Estimate),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoReference => write!(f, "no reference timer to measure against"),
            Refusal::NoPlausibleWindow => write!(f, "no reference gave a plausible window"),
            Refusal::TooFewWindows(e) => write!(
                f,
                "only {} of {}'s windows agree ({} needed alone) and no other reference confirms it",
                e.agreeing,
                e.source.name(),
                ALONE_WINDOWS
            ),
            Refusal::Disagree(a, b) => write!(
                f,
                "{} says {} MHz, {} says {} MHz",
                a.source.name(),
                a.hz / 1_000_000,
                b.source.name(),
                b.hz / 1_000_000
            ),
        }
    }
}

fn agree(a: &Estimate, b: &Estimate) -> bool {
    let tolerance = if a.source.nominal() || b.source.nominal() {
        NOMINAL_AGREE_PPM
    } else {
        SOURCE_AGREE_PPM
    };
    a.source != b.source && ppm_apart(a.hz, b.hz) <= tolerance
}

/// Picks the TSC rate from the references' estimates (see the module doc for the
/// rules), or says why none can be trusted.
pub fn choose(estimates: &[Estimate]) -> Result<Choice, Refusal> {
    let measured = || estimates.iter().filter(|e| !e.source.nominal());
    let usable = || measured().filter(|e| e.usable());
    // The most preferred measured reference that another reference agrees with, a
    // measured partner before a stated one.
    let paired = usable()
        .filter_map(|e| {
            estimates
                .iter()
                .filter(|o| o.usable() && agree(e, o))
                .min_by_key(|o| (o.source.nominal(), o.source))
                .map(|p| Choice {
                    winner: *e,
                    confirmed_by: Some(*p),
                })
        })
        .min_by_key(|c| c.winner.source);
    if let Some(choice) = paired {
        return Ok(choice);
    }
    // No two agree. One measured reference with many agreeing windows stands alone,
    // unless another measured one with enough windows contradicts it. (A stated rate
    // that disagrees does not block it: CPUID's figures can be off under a hypervisor.)
    let first = usable().min_by_key(|e| e.source);
    let second = first.and_then(|a| {
        usable()
            .filter(|e| e.source != a.source)
            .min_by_key(|e| e.source)
    });
    match (first, second) {
        (Some(a), Some(b)) => Err(Refusal::Disagree(*a, *b)),
        (Some(a), None) if a.agreeing >= ALONE_WINDOWS => Ok(Choice {
            winner: *a,
            confirmed_by: None,
        }),
        (Some(a), None) => Err(Refusal::TooFewWindows(*a)),
        (None, _) => match measured().max_by_key(|e| e.agreeing) {
            None => Err(Refusal::NoReference),
            Some(e) if e.agreeing > 0 && PLAUSIBLE_HZ.contains(&e.hz) => {
                Err(Refusal::TooFewWindows(*e))
            }
            Some(_) => Err(Refusal::NoPlausibleWindow),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PM_HZ: u64 = 3_579_545;
    const TRUE_HZ: u64 = 2_596_000_000;

    /// A 5 ms window at `hz`, its reads costing `read_cost` TSC ticks.
    fn window(hz: u64, read_cost: u64) -> Window {
        let reference = PM_HZ / 200;
        Window {
            tsc: hz * reference / PM_HZ,
            reference,
            read_cost,
        }
    }

    fn close(a: u64, b: u64) -> bool {
        a.abs_diff(b) * 1000 < b
    }

    /// An estimate of `source` with `n` windows agreeing at `hz`.
    fn measured(source: Source, hz: u64, n: usize) -> Estimate {
        Estimate {
            source,
            hz,
            agreeing: n,
            windows: 7,
            spread_ppm: 100,
        }
    }

    #[test]
    fn the_estimate_ignores_windows_skewed_by_a_stalled_cpu() {
        let mut w = [
            window(2_600_000_000, 100),
            window(2_601_000_000, 100),
            window(4_194_000_000, 100), // the CPU was held up between the reads
            window(2_599_000_000, 100),
            window(10_952_000_000 / 2, 100),
            window(2_600_500_000, 100),
        ];
        let e = estimate(Source::PmTimer, &mut w, PM_HZ);
        assert!(close(e.hz, 2_600_000_000), "{e:?}");
        assert_eq!((e.agreeing, e.windows), (4, 6), "{e:?}");
        assert!(e.spread_ppm <= WINDOW_AGREE_PPM, "{e:?}");
    }

    #[test]
    fn windows_with_slow_reads_are_dropped() {
        // Reads that took 1/100 of their window: the CPU was held up in them.
        let slow = |hz| {
            let w = window(hz, 0);
            Window {
                read_cost: w.tsc / 100,
                ..w
            }
        };
        let mut w = [
            slow(9_000_000_000),
            window(2_600_000_000, 10),
            slow(9_000_000_000),
            slow(9_000_000_000),
        ];
        let e = estimate(Source::PmTimer, &mut w, PM_HZ);
        assert!(close(e.hz, 2_600_000_000), "{e:?}");
        assert_eq!(e.agreeing, 1);
    }

    #[test]
    fn a_garbage_reference_gives_no_estimate() {
        let mut w = [
            window(64_000_000_000, 1),
            window(238_000_000_000, 1),
            window(50_000_000, 1),
            Window {
                tsc: 1000,
                reference: 0,
                read_cost: 0,
            },
            Window {
                tsc: u64::MAX,
                reference: 1,
                read_cost: 0,
            },
        ];
        let e = estimate(Source::Pit, &mut w, PM_HZ);
        assert_eq!((e.hz, e.agreeing, e.windows), (0, 0, 5), "{e:?}");
        let mut none: [Window; 0] = [];
        assert_eq!(estimate(Source::Pit, &mut none, PM_HZ).agreeing, 0);
    }

    #[test]
    fn scattered_windows_do_not_agree() {
        // Every window off from every other by more than WINDOW_AGREE_PPM.
        let mut w = [
            window(2_600_000_000, 1),
            window(2_620_000_000, 1),
            window(2_640_000_000, 1),
            window(2_660_000_000, 1),
        ];
        let e = estimate(Source::PmTimer, &mut w, PM_HZ);
        assert_eq!(e.agreeing, 1, "{e:?}");
        assert_eq!(
            choose(&[e]),
            Err(Refusal::TooFewWindows(e)),
            "one window is not enough"
        );
    }

    #[test]
    fn spread_is_reported() {
        let mut w = [
            window(2_600_000_000, 1),
            window(2_601_300_000, 1),
            window(2_600_650_000, 1),
        ];
        let e = estimate(Source::Hpet, &mut w, PM_HZ);
        assert!(close(e.hz, 2_600_650_000));
        assert!((480..=520).contains(&e.spread_ppm), "{e:?}");
    }

    #[test]
    fn two_agreeing_references_win_over_a_wild_one() {
        // The PIT, read late by a starved CPU, says 3x; the HPET and PM timer agree.
        let hpet = measured(Source::Hpet, TRUE_HZ, 3);
        let pm = measured(Source::PmTimer, TRUE_HZ + TRUE_HZ / 2000, 3);
        let pit = measured(Source::Pit, 3 * TRUE_HZ, 7);
        let c = choose(&[pit, pm, hpet]).unwrap();
        assert_eq!(c.winner, hpet);
        assert_eq!(c.confirmed_by, Some(pm));
        // Without the HPET, the PM timer still has its partner... only if one agrees.
        assert_eq!(choose(&[pit, pm]), Err(Refusal::Disagree(pm, pit)));
    }

    #[test]
    fn two_references_that_disagree_are_refused() {
        // Both self-consistent, 0.5% apart: one of them is wrong, and which is unknown.
        let hpet = measured(Source::Hpet, TRUE_HZ, 7);
        let pm = measured(Source::PmTimer, TRUE_HZ / 1000 * 1005, 7);
        assert_eq!(choose(&[hpet, pm]), Err(Refusal::Disagree(hpet, pm)));
        // 0.1% apart: they agree, and the HPET (more precise) gives the rate.
        let pm = measured(Source::PmTimer, TRUE_HZ / 1000 * 1001, 3);
        assert_eq!(choose(&[pm, hpet]).unwrap().winner, hpet);
    }

    #[test]
    fn one_reference_alone_needs_many_agreeing_windows() {
        let few = measured(Source::PmTimer, TRUE_HZ, ALONE_WINDOWS - 1);
        assert_eq!(choose(&[few]), Err(Refusal::TooFewWindows(few)));
        let many = measured(Source::PmTimer, TRUE_HZ, ALONE_WINDOWS);
        let c = choose(&[many]).unwrap();
        assert_eq!((c.winner, c.confirmed_by), (many, None));
        // A garbage second reference (no plausible window) does not block it.
        let garbage = measured(Source::Pit, 0, 0);
        assert_eq!(choose(&[garbage, many]).unwrap().winner, many);
    }

    #[test]
    fn cpuid_confirms_but_never_decides() {
        let stated = Estimate::nominal(Source::Cpuid16, 2_600_000_000);
        // Alone it is refused: a stated rate is not a measurement.
        assert_eq!(choose(&[stated]), Err(Refusal::NoReference));
        // It confirms a measured reference within 1%, which then gives the rate.
        let pit = measured(Source::Pit, TRUE_HZ, 3);
        let c = choose(&[stated, pit]).unwrap();
        assert_eq!((c.winner, c.confirmed_by), (pit, Some(stated)));
        // Not one that is 3x off.
        let wild = measured(Source::Pit, 3 * TRUE_HZ, 3);
        assert_eq!(choose(&[stated, wild]), Err(Refusal::TooFewWindows(wild)));
    }

    #[test]
    fn all_implausible_is_an_error() {
        assert_eq!(choose(&[]), Err(Refusal::NoReference));
        let mut w = [window(50_000_000, 1), window(64_000_000_000, 1)];
        let pm = estimate(Source::PmTimer, &mut w, PM_HZ);
        let mut w = [window(30_000_000_000, 1)];
        let pit = estimate(Source::Pit, &mut w, PM_HZ);
        assert_eq!(choose(&[pm, pit]), Err(Refusal::NoPlausibleWindow));
    }
}
