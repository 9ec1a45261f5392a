//! Turning timing windows against a reference clock (the ACPI PM timer, the PIT) into
//! one TSC rate that a CPU held up mid-measurement cannot skew.
//!
//! A window is the TSC ticks and reference ticks between two reference reads, plus how
//! long those reads took in TSC ticks. A read that took long means the CPU was held up
//! in it (by the host, SMM, an emulator): its window is dropped. Of the rest, rates
//! outside `PLAUSIBLE_HZ` are dropped, and the median is the answer.

/// Plausible TSC rates: anything else is a measuring error.
pub const PLAUSIBLE_HZ: core::ops::Range<u64> = 100_000_000..20_000_000_000;

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

/// The rate it chose, with how many windows it used and their spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub hz: u64,
    pub used: usize,
    /// Highest minus lowest accepted rate, in parts per million of `hz`.
    pub spread_ppm: u64,
}

/// The median TSC rate of `windows` against a reference of `reference_hz`, using only
/// windows whose reads took at most 1/`max_read_share` of the window and whose rate is
/// plausible. `None` if no window qualifies. Reorders `windows`.
pub fn median_rate(windows: &mut [Window], reference_hz: u64, max_read_share: u64) -> Option<Rate> {
    let mut used = 0;
    for i in 0..windows.len() {
        let w = windows[i];
        if w.reference == 0 || w.read_cost.saturating_mul(max_read_share) > w.tsc {
            continue;
        }
        let hz = (u128::from(w.tsc) * u128::from(reference_hz) / u128::from(w.reference)) as u64;
        if PLAUSIBLE_HZ.contains(&hz) {
            // Keep accepted windows at the front, their rate in `tsc`.
            windows[used] = Window { tsc: hz, ..w };
            used += 1;
        }
    }
    let accepted = &mut windows[..used];
    accepted.sort_unstable_by_key(|w| w.tsc);
    let hz = accepted.get(used / 2)?.tsc;
    let spread = accepted[used - 1].tsc - accepted[0].tsc;
    Some(Rate {
        hz,
        used,
        spread_ppm: spread * 1_000_000 / hz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PM_HZ: u64 = 3_579_545;

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

    #[test]
    fn the_median_ignores_one_wild_window() {
        let mut w = [
            window(2_600_000_000, 100),
            window(2_601_000_000, 100),
            window(4_194_000_000, 100), // the CPU was held up between the reads
            window(2_599_000_000, 100),
            window(2_600_500_000, 100),
        ];
        let r = median_rate(&mut w, PM_HZ, 200).unwrap();
        assert!(close(r.hz, 2_600_500_000), "{r:?}");
        assert_eq!(r.used, 5);
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
            slow(8_000_000_000),
            slow(7_000_000_000),
        ];
        let r = median_rate(&mut w, PM_HZ, 200).unwrap();
        assert!(close(r.hz, 2_600_000_000), "{r:?}");
        assert_eq!(r.used, 1);
    }

    #[test]
    fn implausible_rates_are_refused() {
        let mut w = [
            window(64_000_000_000, 1),
            window(238_000_000_000, 1),
            window(50_000_000, 1),
        ];
        assert_eq!(median_rate(&mut w, PM_HZ, 200), None);
        let mut none: [Window; 0] = [];
        assert_eq!(median_rate(&mut none, PM_HZ, 200), None);
        let mut zero = [Window {
            tsc: 1000,
            reference: 0,
            read_cost: 0,
        }];
        assert_eq!(
            median_rate(&mut zero, PM_HZ, 200),
            None,
            "no reference ticks"
        );
    }

    #[test]
    fn spread_is_reported() {
        let mut w = [
            window(2_600_000_000, 1),
            window(2_626_000_000, 1),
            window(2_613_000_000, 1),
        ];
        let r = median_rate(&mut w, PM_HZ, 200).unwrap();
        assert!(close(r.hz, 2_613_000_000));
        assert!((9_900..=10_000).contains(&r.spread_ppm), "{r:?}");
    }
}
