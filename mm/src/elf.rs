//! The load plan of a user executable: which pages of the ELF region get which bytes
//! and rights. Parsing uses `goblin` (header and program headers only, every offset
//! bounds-checked), and the plan is checked against the address-space contract before
//! the kernel maps anything, so a hostile file is refused with a reason, never a panic.
//!
//! Accepted: a static ELF64 little-endian x86_64 executable (`ET_EXEC`), whose
//! `PT_LOAD` segments lie in the ELF region `[ELF_LOAD_BASE, HEAP_BASE)`, do not share a
//! page with each other, are not writable and executable at once, have
//! `p_filesz <= p_memsz` and file bytes inside the file, and whose entry point lies in
//! an executable segment. The kernel copies each segment's file bytes into zeroed
//! frames; the rest of the segment (BSS) is demand-zero.

use alloc::vec::Vec;

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{EM_X86_64, ET_DYN, ET_EXEC};
use goblin::elf::program_header::{ProgramHeader, PT_DYNAMIC, PT_INTERP, PT_LOAD, PT_TLS};
use goblin::elf::Elf;

use crate::region::Rights;
use panda_abi::{page_ceil, page_floor, ELF_REGION};

/// The most program headers accepted (real executables have about ten).
pub const MAX_PROGRAM_HEADERS: usize = 64;

/// One segment to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// Virtual address of the segment's first byte.
    pub vaddr: u64,
    /// Size in memory (file bytes then zeros).
    pub mem_size: u64,
    /// Where its file bytes start in the file, and how many there are.
    pub file_offset: u64,
    pub file_size: u64,
    pub rights: Rights,
}

impl LoadSegment {
    /// The pages the segment covers, `[start, end)`.
    pub fn pages(&self) -> (u64, u64) {
        (
            page_floor(self.vaddr),
            page_ceil(self.vaddr + self.mem_size),
        )
    }
}

/// What to map and where to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    pub entry: u64,
    pub segments: Vec<LoadSegment>,
}

/// Why an executable was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF file, or its header or program headers are cut off.
    Malformed(&'static str),
    /// A valid ELF the kernel does not run (class, machine, type, dynamic linking).
    Unsupported(&'static str),
    /// A segment breaks the address-space rules.
    BadSegment(&'static str),
}

impl ElfError {
    pub fn describe(self) -> &'static str {
        match self {
            ElfError::Malformed(s) | ElfError::Unsupported(s) | ElfError::BadSegment(s) => s,
        }
    }
}

/// Checks `file` and returns its load plan.
pub fn plan(file: &[u8]) -> Result<LoadPlan, ElfError> {
    let header = Elf::parse_header(file).map_err(|_| ElfError::Malformed("not an ELF file"))?;
    if header.e_ident[goblin::elf::header::EI_CLASS] != goblin::elf::header::ELFCLASS64 {
        return Err(ElfError::Unsupported("not a 64-bit ELF"));
    }
    if header.e_ident[goblin::elf::header::EI_DATA] != goblin::elf::header::ELFDATA2LSB {
        return Err(ElfError::Unsupported("not little-endian"));
    }
    if header.e_machine != EM_X86_64 {
        return Err(ElfError::Unsupported("not an x86_64 executable"));
    }
    match header.e_type {
        ET_EXEC => {}
        ET_DYN => {
            return Err(ElfError::Unsupported(
                "position-independent (ET_DYN): link it static at 0x400000 (Rust: -C relocation-model=static and --no-pie; C: -static -no-pie; docs/PROGRAMS.md)",
            ))
        }
        _ => return Err(ElfError::Unsupported("not an executable (ET_EXEC)")),
    }
    let count = header.e_phnum as usize;
    if count == 0 {
        return Err(ElfError::Malformed("no program headers"));
    }
    if count > MAX_PROGRAM_HEADERS {
        return Err(ElfError::Malformed("too many program headers"));
    }
    if header.e_phentsize as usize != goblin::elf64::program_header::SIZEOF_PHDR {
        return Err(ElfError::Malformed("unexpected program header size"));
    }
    let offset = usize::try_from(header.e_phoff)
        .map_err(|_| ElfError::Malformed("program headers past the end of the file"))?;
    if offset > file.len() {
        return Err(ElfError::Malformed(
            "program headers past the end of the file",
        ));
    }
    let ctx = Ctx::new(Container::Big, Endian::Little);
    let headers = ProgramHeader::parse(file, offset, count, ctx)
        .map_err(|_| ElfError::Malformed("program headers cut off"))?;

    let (region_start, region_end) = (ELF_REGION.start as u64, ELF_REGION.end as u64);
    let mut segments: Vec<LoadSegment> = Vec::new();
    for ph in &headers {
        match ph.p_type {
            PT_INTERP | PT_DYNAMIC => {
                return Err(ElfError::Unsupported(
                    "dynamically linked (an interpreter or dynamic section): link it static (docs/PROGRAMS.md)",
                ))
            }
            PT_TLS => {
                return Err(ElfError::Unsupported(
                    "has a thread-local storage segment (PT_TLS), as Linux C libraries' binaries do: Panda runs programs built on panda-rt or user/c (docs/PROGRAMS.md), not Linux binaries",
                ))
            }
            PT_LOAD => {}
            _ => continue,
        }
        if ph.p_memsz == 0 {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(ElfError::BadSegment("file size larger than memory size"));
        }
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .ok_or(ElfError::Malformed(
                "segment bytes past the end of the file",
            ))?;
        if file_end > file.len() as u64 {
            return Err(ElfError::Malformed(
                "segment bytes past the end of the file",
            ));
        }
        let end = ph
            .p_vaddr
            .checked_add(ph.p_memsz)
            .ok_or(ElfError::BadSegment(
                "segment wraps around the address space",
            ))?;
        if ph.p_vaddr < region_start || end > region_end {
            return Err(ElfError::BadSegment(
                "segment outside the ELF region [0x400000, HEAP_BASE)",
            ));
        }
        let rights = Rights {
            write: ph.is_write(),
            execute: ph.is_executable(),
        };
        if rights.write && rights.execute {
            return Err(ElfError::BadSegment("segment both writable and executable"));
        }
        let segment = LoadSegment {
            vaddr: ph.p_vaddr,
            mem_size: ph.p_memsz,
            file_offset: ph.p_offset,
            file_size: ph.p_filesz,
            rights,
        };
        let (start, end) = segment.pages();
        if segments.iter().any(|s| {
            let (s_start, s_end) = s.pages();
            start < s_end && s_start < end
        }) {
            return Err(ElfError::BadSegment("segments overlap (or share a page)"));
        }
        segments.push(segment);
    }
    if segments.is_empty() {
        return Err(ElfError::Malformed("no loadable segment"));
    }
    let entry = header.e_entry;
    if !segments
        .iter()
        .any(|s| s.rights.execute && s.vaddr <= entry && entry < s.vaddr + s.mem_size)
    {
        return Err(ElfError::BadSegment(
            "entry point outside every executable segment",
        ));
    }
    Ok(LoadPlan { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    const PF_X: u32 = 1;
    const PF_W: u32 = 2;
    const PF_R: u32 = 4;

    struct Ph {
        kind: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn load(flags: u32, offset: u64, vaddr: u64, filesz: u64, memsz: u64) -> Ph {
        Ph {
            kind: PT_LOAD,
            flags,
            offset,
            vaddr,
            filesz,
            memsz,
        }
    }

    /// An ELF64 x86_64 executable with `phs`, `size` bytes long.
    fn elf(entry: u64, e_type: u16, phs: &[Ph], size: usize) -> Vec<u8> {
        let mut f = vec![0u8; size.max(64 + 56 * phs.len())];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&e_type.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for (i, ph) in phs.iter().enumerate() {
            let at = 64 + 56 * i;
            f[at..at + 4].copy_from_slice(&ph.kind.to_le_bytes());
            f[at + 4..at + 8].copy_from_slice(&ph.flags.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&ph.offset.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&ph.vaddr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&ph.vaddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&ph.filesz.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&ph.memsz.to_le_bytes());
            f[at + 48..at + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        f
    }

    const BASE: u64 = 0x40_0000;

    fn good() -> Vec<u8> {
        elf(
            BASE + 0x10,
            ET_EXEC,
            &[
                load(PF_R | PF_X, 0x1000, BASE, 0x200, 0x200),
                load(PF_R | PF_W, 0x1200, BASE + 0x1000, 0x100, 0x5000),
            ],
            0x2000,
        )
    }

    #[test]
    fn a_static_executable_is_planned() {
        let p = plan(&good()).expect("valid");
        assert_eq!(p.entry, BASE + 0x10);
        assert_eq!(p.segments.len(), 2);
        assert!(p.segments[0].rights.execute && !p.segments[0].rights.write);
        assert_eq!(p.segments[1].pages(), (BASE + 0x1000, BASE + 0x6000));
        assert_eq!(p.segments[1].file_size, 0x100);
    }

    fn refused(file: &[u8]) -> ElfError {
        plan(file).expect_err("hostile file accepted")
    }

    #[test]
    fn truncated_files_are_refused() {
        let f = good();
        for len in [0, 3, 40, 64, 64 + 56, 0x1100] {
            assert!(
                matches!(refused(&f[..len]), ElfError::Malformed(_)),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn wrong_kinds_are_refused() {
        let mut f = good();
        f[18] = 3; // EM_386
        assert!(matches!(refused(&f), ElfError::Unsupported(_)));
        let f = elf(
            BASE,
            ET_DYN,
            &[load(PF_R | PF_X, 0, BASE, 0x10, 0x10)],
            0x100,
        );
        assert!(matches!(refused(&f), ElfError::Unsupported(_)));
        let mut f = good();
        f[4] = 1; // 32-bit
        assert!(plan(&f).is_err());
        let mut phs = vec![load(PF_R | PF_X, 0x1000, BASE, 0x200, 0x200)];
        phs.push(Ph {
            kind: PT_INTERP,
            flags: PF_R,
            offset: 0x1000,
            vaddr: BASE,
            filesz: 8,
            memsz: 8,
        });
        assert!(matches!(
            refused(&elf(BASE, ET_EXEC, &phs, 0x2000)),
            ElfError::Unsupported(_)
        ));
        // A Linux C library's static binary: refused as such, by its TLS segment.
        let mut phs = vec![load(PF_R | PF_X, 0x1000, BASE, 0x200, 0x200)];
        phs.push(Ph {
            kind: PT_TLS,
            flags: PF_R,
            offset: 0x1000,
            vaddr: BASE + 0x100,
            filesz: 8,
            memsz: 16,
        });
        match refused(&elf(BASE, ET_EXEC, &phs, 0x2000)) {
            ElfError::Unsupported(why) => assert!(why.contains("Linux"), "{why}"),
            other => panic!("a TLS segment gave {other:?}"),
        }
    }

    #[test]
    fn bad_segments_are_refused() {
        let cases: [(&str, Vec<Ph>, u64); 8] = [
            (
                "W+X",
                vec![load(PF_R | PF_W | PF_X, 0x1000, BASE, 0x10, 0x10)],
                BASE,
            ),
            (
                "below the ELF region",
                vec![load(PF_R | PF_X, 0x1000, 0x1000, 0x10, 0x10)],
                0x1000,
            ),
            (
                "into the heap",
                vec![load(PF_R | PF_X, 0x1000, BASE, 0x10, 0x1_0000_0000)],
                BASE,
            ),
            (
                "kernel half",
                vec![load(PF_R | PF_X, 0x1000, 0xffff_8000_0000_0000, 0x10, 0x10)],
                0xffff_8000_0000_0000,
            ),
            (
                "wraps",
                vec![load(PF_R | PF_X, 0x1000, u64::MAX - 0x10, 0x10, 0x100)],
                u64::MAX - 0x10,
            ),
            (
                "filesz > memsz",
                vec![load(PF_R | PF_X, 0x1000, BASE, 0x100, 0x10)],
                BASE,
            ),
            (
                "overlap",
                vec![
                    load(PF_R | PF_X, 0x1000, BASE, 0x100, 0x100),
                    load(PF_R | PF_W, 0x1000, BASE + 0x800, 0x100, 0x100),
                ],
                BASE,
            ),
            (
                "entry outside",
                vec![load(PF_R | PF_X, 0x1000, BASE, 0x10, 0x10)],
                BASE + 0x5000,
            ),
        ];
        for (what, phs, entry) in cases {
            let f = elf(entry, ET_EXEC, &phs, 0x2000);
            assert!(plan(&f).is_err(), "{what} accepted");
        }
        // Entry in a data segment only.
        let f = elf(
            BASE + 0x1000,
            ET_EXEC,
            &[
                load(PF_R | PF_X, 0x1000, BASE, 0x10, 0x10),
                load(PF_R | PF_W, 0x1000, BASE + 0x1000, 0x10, 0x10),
            ],
            0x2000,
        );
        assert!(matches!(refused(&f), ElfError::BadSegment(_)));
        // File bytes past the end of the file.
        let f = elf(
            BASE,
            ET_EXEC,
            &[load(PF_R | PF_X, 0x1f00, BASE, 0x200, 0x200)],
            0x2000,
        );
        assert!(matches!(refused(&f), ElfError::Malformed(_)));
        let f = elf(
            BASE,
            ET_EXEC,
            &[load(PF_R | PF_X, u64::MAX, BASE, 2, 2)],
            0x2000,
        );
        assert!(matches!(refused(&f), ElfError::Malformed(_)));
    }

    #[test]
    fn absurd_header_counts_are_refused() {
        let mut f = good();
        f[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(matches!(refused(&f), ElfError::Malformed(_)));
        let mut f = good();
        f[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(refused(&f), ElfError::Malformed(_)));
        let mut f = good();
        f[54..56].copy_from_slice(&32u16.to_le_bytes());
        assert!(matches!(refused(&f), ElfError::Malformed(_)));
    }

    #[test]
    fn random_corruption_never_panics() {
        // Flip bytes of a valid file many times over; every outcome must be a plan that
        // still obeys the rules, or an error.
        let base = good();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut f = base.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % 0x80) as usize + if next() % 4 == 0 { 0x80 } else { 0 };
                f[at] = next() as u8;
            }
            let len = if next() % 8 == 0 {
                (next() % f.len() as u64) as usize
            } else {
                f.len()
            };
            if let Ok(p) = plan(&f[..len]) {
                for s in &p.segments {
                    assert!(!(s.rights.write && s.rights.execute));
                    let (start, end) = s.pages();
                    assert!(start >= BASE && end <= panda_abi::HEAP_BASE as u64);
                    assert!(s.file_offset + s.file_size <= len as u64);
                }
            }
        }
    }

    fn reason(file: &[u8]) -> &'static str {
        refused(file).describe()
    }

    /// The edges of every rule, each accepted exactly at its limit and refused one
    /// past it, with the reason given.
    #[test]
    fn limits_are_exact_and_reasons_given() {
        let heap = panda_abi::HEAP_BASE as u64;
        let ok = |entry: u64, phs: &[Ph], size: usize| plan(&elf(entry, ET_EXEC, phs, size));
        // File bytes ending exactly at the end of the file.
        assert!(ok(
            BASE,
            &[load(PF_R | PF_X, 0x1e00, BASE, 0x200, 0x200)],
            0x2000
        )
        .is_ok());
        assert_eq!(
            reason(&elf(
                BASE,
                ET_EXEC,
                &[load(PF_R | PF_X, 0x1e01, BASE, 0x200, 0x200)],
                0x2000
            )),
            "segment bytes past the end of the file"
        );
        // A segment ending exactly at the heap.
        let last = heap - 0x1000;
        assert!(ok(
            last,
            &[load(PF_R | PF_X, 0x1000, last, 0x10, 0x1000)],
            0x2000
        )
        .is_ok());
        assert_eq!(
            reason(&elf(
                last,
                ET_EXEC,
                &[load(PF_R | PF_X, 0x1000, last, 0x10, 0x1001)],
                0x2000
            )),
            "segment outside the ELF region [0x400000, HEAP_BASE)"
        );
        // Segments touching, listed in either order; sharing a page, in either order.
        let low = load(PF_R | PF_X, 0x1000, BASE, 0x10, 0x1000);
        let high = load(PF_R | PF_W, 0x1000, BASE + 0x1000, 0x10, 0x10);
        assert!(ok(BASE, &[high, low], 0x2000).is_ok());
        let low = load(PF_R | PF_X, 0x1000, BASE, 0x10, 0x1001);
        let high = load(PF_R | PF_W, 0x1000, BASE + 0x1000, 0x10, 0x10);
        assert_eq!(
            reason(&elf(BASE, ET_EXEC, &[high, low], 0x2000)),
            "segments overlap (or share a page)"
        );
        // The entry point: the first byte of an executable segment, not the one after.
        let code = || load(PF_R | PF_X, 0x1000, BASE, 0x10, 0x100);
        assert!(ok(BASE, &[code()], 0x2000).is_ok());
        assert!(ok(BASE + 0xff, &[code()], 0x2000).is_ok());
        assert_eq!(
            reason(&elf(BASE + 0x100, ET_EXEC, &[code()], 0x2000)),
            "entry point outside every executable segment"
        );
        assert_eq!(
            reason(&elf(BASE - 1, ET_EXEC, &[code()], 0x2000)),
            "entry point outside every executable segment"
        );
        // Segments of no size in memory are skipped, wherever they claim to be.
        let empty = load(PF_R | PF_W | PF_X, 0x1000, 0, 0, 0);
        assert_eq!(
            ok(BASE, &[empty, code()], 0x2000).unwrap().segments.len(),
            1
        );
        // A file size equal to the memory size is fine, one more is not.
        assert!(ok(
            BASE,
            &[load(PF_R | PF_X, 0x1000, BASE, 0x100, 0x100)],
            0x2000
        )
        .is_ok());
        assert_eq!(
            reason(&elf(
                BASE,
                ET_EXEC,
                &[load(PF_R | PF_X, 0x1000, BASE, 0x101, 0x100)],
                0x2000
            )),
            "file size larger than memory size"
        );
    }

    /// Program header counts and offsets at their limits.
    #[test]
    fn header_limits_are_exact() {
        let note = || Ph {
            kind: 4, // PT_NOTE: skipped
            flags: PF_R,
            offset: 0,
            vaddr: 0,
            filesz: 0,
            memsz: 0,
        };
        let size = 64 + 56 * 65 + 0x100;
        let mut phs = vec![load(PF_R | PF_X, 0, BASE, 0x10, 0x10)];
        phs.extend((1..MAX_PROGRAM_HEADERS).map(|_| note()));
        assert!(
            plan(&elf(BASE, ET_EXEC, &phs, size)).is_ok(),
            "the most headers"
        );
        phs.push(note());
        assert_eq!(
            reason(&elf(BASE, ET_EXEC, &phs, size)),
            "too many program headers"
        );
        // Program headers starting exactly at the end of the file, and past it.
        let mut f = good();
        let len = f.len() as u64;
        f[32..40].copy_from_slice(&len.to_le_bytes());
        assert_eq!(reason(&f), "program headers cut off");
        f[32..40].copy_from_slice(&(len + 1).to_le_bytes());
        assert_eq!(reason(&f), "program headers past the end of the file");
        let mut f = good();
        f[56..58].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(reason(&f), "no program headers");
        assert!(matches!(
            refused(&elf(BASE, ET_EXEC, &[note()], 0x100)),
            ElfError::Malformed("no loadable segment")
        ));
        let pie = elf(
            BASE,
            ET_DYN,
            &[load(PF_R | PF_X, 0, BASE, 0x10, 0x10)],
            0x100,
        );
        assert!(reason(&pie).starts_with("position-independent"));
        let mut core = good();
        core[16] = 4; // ET_CORE
        assert_eq!(reason(&core), "not an executable (ET_EXEC)");
        assert_eq!(ElfError::Unsupported("x").describe(), "x");
        assert_eq!(ElfError::BadSegment("y").describe(), "y");
    }
}
