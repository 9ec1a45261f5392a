//! The `log` facade on COM1 (and the screen, WARN in yellow and ERROR in red): `[seconds.micros] LEVEL cpuN target: message`.
//!
//! One line is written under the console lock, so lines from different CPUs never mix.
//! Targets name the subsystem (`boot`, `mm`, `smp`, ...); the timestamp is the TSC clock
//! since kernel entry (zero until it is calibrated).

use log::{LevelFilter, Log, Metadata, Record};

struct SerialLog;

static LOGGER: SerialLog = SerialLog;

impl Log for SerialLog {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let ns = panda_arch::time::now_ns();
        let cpu = panda_arch::percpu::checked_index().unwrap_or(usize::MAX);
        let colour = match record.level() {
            log::Level::Error => panda_arch::serial::Colour::Error,
            log::Level::Warn => panda_arch::serial::Colour::Warn,
            _ => panda_arch::serial::Colour::Normal,
        };
        panda_arch::serial::with_console_line_in(colour, |w| {
            let _ = writeln!(
                w,
                "[{:>4}.{:06}] {:<5} cpu{} {}: {}",
                ns / 1_000_000_000,
                (ns / 1000) % 1_000_000,
                record.level(),
                cpu,
                record.target(),
                record.args()
            );
        });
    }

    fn flush(&self) {}
}

/// Installs the logger; the command line's `log=LEVEL` sets the level (default info).
pub fn init(level: Option<&str>) {
    let filter = match level {
        Some("error") => LevelFilter::Error,
        Some("warn") => LevelFilter::Warn,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        _ => LevelFilter::Info,
    };
    // A second call (impossible in practice) keeps the first logger; nothing to do.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}

/// Writes a line without log decoration (test results, which scripts parse).
pub fn raw_line(args: core::fmt::Arguments<'_>) {
    panda_arch::serial::with_console_line(|w| {
        let _ = w.write_fmt(args);
        let _ = w.write_str("\n");
    });
}

/// `println!` for raw console lines.
#[macro_export]
macro_rules! console {
    ($($arg:tt)*) => { $crate::logger::raw_line(format_args!($($arg)*)) };
}
