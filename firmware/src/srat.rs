//! The ACPI System Resource Affinity Table (SRAT): which NUMA node (proximity domain)
//! each CPU and each memory range belongs to (ACPI 6.5, section 5.2.16).
//!
//! `entries` decodes the table's body, the bytes after its 36-byte header and 12
//! reserved bytes, into CPU and memory affinities. Entries it does not know (GIC,
//! generic initiators) and entries too short for their type are skipped; disabled
//! entries are reported as disabled, not dropped.

/// One affinity structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// A CPU, by local (x)APIC id.
    Cpu {
        apic_id: u32,
        domain: u32,
        enabled: bool,
    },
    /// A physical memory range `[base, base + length)`.
    Memory {
        base: u64,
        length: u64,
        domain: u32,
        enabled: bool,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// Bytes of the SRAT before its first affinity structure (header + reserved).
pub const BODY_OFFSET: usize = 48;

/// The affinity structures in `body` (the table from `BODY_OFFSET` on).
pub fn entries(body: &[u8]) -> impl Iterator<Item = Affinity> + '_ {
    let mut at = 0usize;
    core::iter::from_fn(move || loop {
        let header = body.get(at..at + 2)?;
        let (kind, len) = (header[0], usize::from(header[1]));
        if len < 2 {
            return None; // a zero length would loop for ever: the table is corrupt
        }
        let e = body.get(at..at + len)?;
        at += len;
        match (kind, len) {
            // Processor Local APIC/SAPIC affinity: domain bits 0-7 at 2, APIC id at 3,
            // flags at 4, domain bits 8-31 at 9.
            (0, 16..) => {
                let domain = u32::from(e[2])
                    | (u32::from(e[9]) << 8)
                    | (u32::from(e[10]) << 16)
                    | (u32::from(e[11]) << 24);
                return Some(Affinity::Cpu {
                    apic_id: u32::from(e[3]),
                    domain,
                    enabled: u32_at(e, 4) & 1 != 0,
                });
            }
            // Memory affinity: domain at 2, base at 8, length at 16, flags at 28.
            (1, 40..) => {
                return Some(Affinity::Memory {
                    base: u64_at(e, 8),
                    length: u64_at(e, 16),
                    domain: u32_at(e, 2),
                    enabled: u32_at(e, 28) & 1 != 0,
                });
            }
            // Processor Local x2APIC affinity: domain at 4, x2APIC id at 8, flags at 12.
            (2, 24..) => {
                return Some(Affinity::Cpu {
                    apic_id: u32_at(e, 8),
                    domain: u32_at(e, 4),
                    enabled: u32_at(e, 12) & 1 != 0,
                });
            }
            _ => continue,
        }
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn cpu(apic: u8, domain: u32, flags: u32) -> Vec<u8> {
        let mut e = std::vec![0u8, 16, domain as u8, apic];
        e.extend_from_slice(&flags.to_le_bytes());
        e.push(0); // SAPIC EID
        e.extend_from_slice(&(domain >> 8).to_le_bytes()[..3]);
        e.extend_from_slice(&[0; 4]); // clock domain
        e
    }

    fn x2cpu(apic: u32, domain: u32, flags: u32) -> Vec<u8> {
        let mut e = std::vec![2u8, 24, 0, 0];
        e.extend_from_slice(&domain.to_le_bytes());
        e.extend_from_slice(&apic.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        e
    }

    fn memory(base: u64, length: u64, domain: u32, flags: u32) -> Vec<u8> {
        let mut e = std::vec![1u8, 40];
        e.extend_from_slice(&domain.to_le_bytes());
        e.extend_from_slice(&[0; 2]);
        e.extend_from_slice(&base.to_le_bytes());
        e.extend_from_slice(&length.to_le_bytes());
        e.extend_from_slice(&[0; 4]);
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        e
    }

    #[test]
    fn cpus_and_memory_of_two_nodes() {
        let body: Vec<u8> = [
            cpu(0, 0, 1),
            cpu(1, 1, 1),
            memory(0, 0xa_0000, 0, 1),
            memory(0x1000_0000, 0x1000_0000, 1, 1),
            x2cpu(300, 0x1_0203, 1),
            cpu(7, 0x0102_0304, 0),
        ]
        .concat();
        let got: Vec<_> = entries(&body).collect();
        assert_eq!(
            got,
            [
                Affinity::Cpu {
                    apic_id: 0,
                    domain: 0,
                    enabled: true
                },
                Affinity::Cpu {
                    apic_id: 1,
                    domain: 1,
                    enabled: true
                },
                Affinity::Memory {
                    base: 0,
                    length: 0xa_0000,
                    domain: 0,
                    enabled: true
                },
                Affinity::Memory {
                    base: 0x1000_0000,
                    length: 0x1000_0000,
                    domain: 1,
                    enabled: true
                },
                Affinity::Cpu {
                    apic_id: 300,
                    domain: 0x1_0203,
                    enabled: true
                },
                Affinity::Cpu {
                    apic_id: 7,
                    domain: 0x0102_0304,
                    enabled: false
                },
            ]
        );
    }

    /// Unknown types are skipped by their length; a truncated or zero-length entry
    /// ends the walk instead of reading past the table or looping.
    #[test]
    fn unknown_truncated_and_zero_length_entries() {
        let mut body = std::vec![3u8, 18];
        body.extend_from_slice(&[0; 16]); // GICC affinity: skipped
        body.extend(cpu(4, 2, 1));
        let got: Vec<_> = entries(&body).collect();
        assert_eq!(
            got,
            [Affinity::Cpu {
                apic_id: 4,
                domain: 2,
                enabled: true
            }]
        );
        let mut cut = cpu(5, 0, 1);
        cut.truncate(10);
        assert_eq!(entries(&cut).count(), 0, "truncated");
        let zero = [0u8, 0, 0, 0];
        assert_eq!(entries(&zero).count(), 0, "zero length");
        let short = [1u8, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            entries(&short).count(),
            0,
            "a memory entry shorter than 40 bytes"
        );
    }
}
