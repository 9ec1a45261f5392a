//! `BootInfo`: what either boot front-end learned, in one shape.
//!
//! The PVH and Limine front-ends (`pvh.rs`, `limine.rs`) each translate their protocol
//! into a `BootInfo` and nothing after them knows which one ran, except for the banner.
//! Everything is copied into fixed-size, owned storage: there is no heap yet, and
//! bootloader memory may be reclaimed later.

pub mod limine;
pub mod memory_map;
pub mod pvh;

pub use memory_map::{MemoryKind, MemoryMap};

/// Which protocol booted the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Pvh,
    Limine,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "PVH",
            Protocol::Limine => "Limine",
        }
    }
}

/// A boot module (the initrd): physical range and its command-line string.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub phys: u64,
    pub len: u64,
    pub name: Text<64>,
}

/// A short, owned string.
#[derive(Clone, Copy)]
pub struct Text<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    pub const fn empty() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
        }
    }

    /// Copies `s`, truncated to `N` bytes and cut at the first NUL.
    pub fn from_bytes(s: &[u8]) -> Self {
        let s = s.split(|&b| b == 0).next().unwrap_or(&[]);
        let mut t = Self::empty();
        let n = s.len().min(N);
        t.bytes[..n].copy_from_slice(&s[..n]);
        t.len = n;
        t
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("<non-utf8>")
    }
}

impl<const N: usize> core::fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The most boot modules kept.
pub const MAX_MODULES: usize = 8;

/// Everything the kernel needs from its boot protocol.
pub struct BootInfo {
    pub protocol: Protocol,
    /// Virtual base of the higher-half direct map (equal on both paths).
    pub hhdm_offset: u64,
    /// Physical memory, sorted, non-overlapping, with the kernel image, modules and
    /// boot data carved out of the usable ranges.
    pub memory_map: MemoryMap,
    /// Physical address of the ACPI RSDP, if the protocol gave one.
    pub rsdp: Option<u64>,
    pub modules: [Option<Module>; MAX_MODULES],
    pub cmdline: Text<256>,
    /// Where the kernel image was loaded (physical) and linked (virtual).
    pub kernel_phys: u64,
    pub kernel_virt: u64,
    /// The bootloader's name and version, as far as the protocol tells.
    pub loader: Text<64>,
}

/// Command-line `key=value` keys the kernel reads (README lists what they do).
pub const KNOWN_OPTIONS: &[&str] = &[
    "crash",
    "init",
    "init.arg",
    "log",
    "mm.zero",
    "smp.silent",
    "test.filter",
    "watchdog",
];
/// Command-line flags the kernel reads.
pub const KNOWN_FLAGS: &[&str] = &["test", "test.inject_failure"];

impl BootInfo {
    /// Physical address of the kernel-image byte at virtual `virt`.
    pub fn kernel_virt_to_phys(&self, virt: u64) -> u64 {
        virt - self.kernel_virt + self.kernel_phys
    }

    /// Whether the command line holds `token` as a whole word.
    pub fn has_flag(&self, token: &str) -> bool {
        self.cmdline
            .as_str()
            .split_ascii_whitespace()
            .any(|t| t == token)
    }

    /// The value of `key=value` on the command line.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.cmdline
            .as_str()
            .split_ascii_whitespace()
            .find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }

    /// Command-line words the kernel does not know (neither a flag nor `key=value` of a
    /// known key): boot logs each, so a typo is not silently ignored.
    pub fn unknown_words(&self) -> impl Iterator<Item = &str> {
        self.cmdline.as_str().split_ascii_whitespace().filter(|w| {
            let key = w.split_once('=').map_or(*w, |(k, _)| k);
            let is_flag = !w.contains('=');
            !((!is_flag && KNOWN_OPTIONS.contains(&key)) || (is_flag && KNOWN_FLAGS.contains(w)))
        })
    }

    /// The modules present.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().flatten()
    }
}
