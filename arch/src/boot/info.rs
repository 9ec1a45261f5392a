//! `BootInfo`: what either boot front-end learned, in one shape.
//!
//! The PVH and Limine front-ends (`pvh.rs`, `limine.rs`) each translate their protocol
//! into a `BootInfo` and nothing after them knows which one ran, except for the banner.
//! Everything is copied into fixed-size, owned storage: there is no heap yet, and
//! bootloader memory may be reclaimed later.
//!
//! Only this crate makes a `BootInfo` (once per boot, in the boot front-end). Its plain
//! fields are information, and code here never trusts them (the kernel may edit them);
//! what carries authority cannot be forged: the memory map (`BootMemoryMap`) and the
//! modules' bytes (`Module::bytes`).

use crate::memory_map::BootMemoryMap;

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

/// A boot module (the initrd): where it is, its command-line string, and its bytes.
#[derive(Clone, Copy)]
pub struct Module {
    /// Physical address and length (for the log: the contents are `bytes()`).
    pub phys: u64,
    pub len: u64,
    pub name: Text<64>,
    /// The same range, kept where the kernel cannot edit it.
    start: u64,
    size: usize,
}

impl Module {
    /// A module at `[phys, phys + len)`, which the front-end has claimed as
    /// `KernelAndModules` in the boot memory map. `None` if the range does not fit the
    /// HHDM.
    pub(crate) fn new(phys: u64, len: u64, name: Text<64>) -> Option<Module> {
        let size = usize::try_from(len).ok()?;
        if phys.checked_add(len)? > crate::HHDM_LIMIT {
            return None;
        }
        Some(Module {
            phys,
            len,
            name,
            start: phys,
            size,
        })
    }

    /// The module's contents, valid for the kernel's lifetime; `None` until the
    /// kernel's own page tables are active (the PVH boot tables map only the first
    /// 4 GiB).
    pub fn bytes(&self) -> Option<&'static [u8]> {
        if crate::kernel_tables::kernel_root() == 0 {
            return None;
        }
        // SAFETY: the range is module memory, claimed as `KernelAndModules` in the boot
        // memory map when this `Module` was made (only the front-ends make one), and
        // such memory is never given away or written (`BootMemoryMap`'s invariant).
        // The kernel's page tables, active now and for good, map every RAM range of
        // the map read-write through the HHDM, and the range lies inside the HHDM.
        Some(unsafe {
            core::slice::from_raw_parts((crate::HHDM_BASE + self.start) as *const u8, self.size)
        })
    }
}

impl core::fmt::Debug for Module {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Module")
            .field("phys", &format_args!("{:#x}", self.phys))
            .field("len", &self.len)
            .field("name", &self.name)
            .finish()
    }
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
#[non_exhaustive]
pub struct BootInfo {
    pub protocol: Protocol,
    /// Virtual base of the higher-half direct map (equal on both paths:
    /// `crate::HHDM_BASE`).
    pub hhdm_offset: u64,
    /// Physical memory, sorted, non-overlapping, with the kernel image, modules and
    /// boot data carved out of the usable ranges.
    pub memory_map: BootMemoryMap,
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

impl BootInfo {
    /// Physical address of the kernel-image byte at virtual `virt`.
    pub fn kernel_virt_to_phys(&self, virt: u64) -> u64 {
        virt - self.kernel_virt + self.kernel_phys
    }

    /// The kernel's words of the command line: those before a lone `--` (the words
    /// after it are init's arguments, `init_args`).
    pub fn kernel_words(&self) -> impl Iterator<Item = &str> {
        self.cmdline
            .as_str()
            .split_ascii_whitespace()
            .take_while(|&t| t != "--")
    }

    /// The words after the first lone `--`: the first program's arguments (argv\[1..\]),
    /// as Linux passes them to init.
    pub fn init_args(&self) -> impl Iterator<Item = &str> {
        self.cmdline
            .as_str()
            .split_ascii_whitespace()
            .skip_while(|&t| t != "--")
            .skip(1)
    }

    /// Whether the kernel's words hold `token` as a whole word.
    pub fn has_flag(&self, token: &str) -> bool {
        self.kernel_words().any(|t| t == token)
    }

    /// The value of `key=value` among the kernel's words.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.kernel_words()
            .find_map(|t| t.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
    }

    /// The modules present.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().flatten()
    }
}
