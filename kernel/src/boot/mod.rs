//! What boot handed the kernel, and the command line's vocabulary.
//!
//! The boot entries, the PVH and Limine front-ends and the boot memory map live in
//! `panda_arch::boot` (they are platform code, and the memory map is the authority on
//! which physical memory is free, so only trusted code may make one); their types are
//! re-exported here so the rest of the kernel names them `crate::boot::...`. The
//! kernel's part is the command line: which words it knows.

pub use panda_arch::boot::{BootInfo, MemoryKind, MemoryMap};

/// Command-line `key=value` keys the kernel reads (README lists what they do).
pub const KNOWN_OPTIONS: &[&str] = &[
    "crash",
    "init",
    "init.arg",
    "log",
    "mm.poison",
    "mm.prezero",
    "mm.zero",
    "smp.silent",
    "smp.late",
    "test.filter",
    "watchdog",
];
/// Command-line flags the kernel reads.
pub const KNOWN_FLAGS: &[&str] = &["test", "test.inject_failure", "qemu.exit", "halt", "reboot"];

/// The kernel's reading of the command line, beyond `BootInfo::has_flag` and `option`.
pub trait CommandLine {
    /// Command-line words the kernel does not know (neither a flag nor `key=value` of
    /// a known key): boot logs each, so a typo is not silently ignored.
    fn unknown_words(&self) -> impl Iterator<Item = &str>;

    /// The number `key=N` gives, if the word is there and `N` fits a `T`; a value that
    /// does not (too large, not a number) gets one warning naming the key, and `None`,
    /// so the caller keeps its default.
    fn number_option<T: core::str::FromStr<Err = core::num::ParseIntError>>(
        &self,
        key: &str,
    ) -> Option<T>;
}

impl CommandLine for BootInfo {
    fn unknown_words(&self) -> impl Iterator<Item = &str> {
        self.kernel_words().filter(|w| {
            let key = w.split_once('=').map_or(*w, |(k, _)| k);
            let is_flag = !w.contains('=');
            !((!is_flag && KNOWN_OPTIONS.contains(&key)) || (is_flag && KNOWN_FLAGS.contains(w)))
        })
    }

    fn number_option<T: core::str::FromStr<Err = core::num::ParseIntError>>(
        &self,
        key: &str,
    ) -> Option<T> {
        let text = self.option(key)?;
        number(text)
            .inspect_err(|e| {
                log::warn!(target: "boot", "{key}={text} is {} (a whole number that fits {} bits): ignored", e.describe(), core::mem::size_of::<T>() * 8)
            })
            .ok()
    }
}

/// Why a number on the command line was not taken. Every number the kernel reads
/// there goes through `number` or `watchdog_limit_ns`: checked arithmetic only, so a
/// value too large for its type is refused (the caller logs one line and keeps its
/// default), never wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadNumber {
    /// Not a decimal number of the expected form.
    NotANumber,
    /// Larger than the value it sets can hold.
    TooLarge,
    /// Below the least value that makes sense.
    TooSmall,
}

impl BadNumber {
    pub fn describe(self) -> &'static str {
        match self {
            BadNumber::NotANumber => "not a number",
            BadNumber::TooLarge => "too large",
            BadNumber::TooSmall => "too small",
        }
    }
}

/// `text` as a decimal number of type `T`.
pub fn number<T: core::str::FromStr<Err = core::num::ParseIntError>>(
    text: &str,
) -> Result<T, BadNumber> {
    use core::num::IntErrorKind::{NegOverflow, PosOverflow};
    text.parse()
        .map_err(|e: core::num::ParseIntError| match e.kind() {
            PosOverflow | NegOverflow => BadNumber::TooLarge,
            _ => BadNumber::NotANumber,
        })
}

/// `"3"` or `"2.5"` seconds (at most three decimals) in milliseconds.
pub fn seconds_as_ms(text: &str) -> Result<u64, BadNumber> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadNumber::NotANumber);
    }
    let whole: u64 = number(whole)?;
    let mut ms = 0;
    for (i, digit) in fraction.bytes().enumerate() {
        ms += u64::from(digit - b'0') * [100, 10, 1][i];
    }
    whole
        .checked_mul(1000)
        .and_then(|w| w.checked_add(ms))
        .ok_or(BadNumber::TooLarge)
}

/// The least watchdog limit, in milliseconds.
pub const WATCHDOG_MIN_MS: u64 = 500;

/// `watchdog=SECONDS` as the watchdog's limit in nanoseconds: at least 0.5 s, and at
/// most what a `u64` of nanoseconds holds (about 584 years). `watchdog=20000000000`
/// used to wrap round in the multiplication to a limit of a fraction of a second.
pub fn watchdog_limit_ns(text: &str) -> Result<u64, BadNumber> {
    let ms = seconds_as_ms(text)?;
    if ms < WATCHDOG_MIN_MS {
        return Err(BadNumber::TooSmall);
    }
    ms.checked_mul(1_000_000).ok_or(BadNumber::TooLarge)
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
