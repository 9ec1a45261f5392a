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
}

impl CommandLine for BootInfo {
    fn unknown_words(&self) -> impl Iterator<Item = &str> {
        self.kernel_words().filter(|w| {
            let key = w.split_once('=').map_or(*w, |(k, _)| k);
            let is_flag = !w.contains('=');
            !((!is_flag && KNOWN_OPTIONS.contains(&key)) || (is_flag && KNOWN_FLAGS.contains(w)))
        })
    }
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
