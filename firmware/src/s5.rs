//! The `\_S5` package of a DSDT: the values to write into the SLP_TYP field of the
//! PM1a and PM1b control registers to power the machine off (ACPI S5, "soft off").
//!
//! Firmware declares it in AML (ACPI's bytecode) as a named package, e.g. QEMU's
//! `Name (_S5, Package (4) { Zero, Zero, Zero, Zero })`, which is encoded as
//!
//! ```text
//! 08          NameOp
//! 5F 53 35 5F "_S5_" (name segments are four bytes, padded with '_')
//! 12          PackageOp
//! 06          PkgLength (1 to 4 bytes)
//! 04          NumElements
//! 00 00 ...   elements: ZeroOp, OneOp, or BytePrefix 0A nn / WordPrefix 0B nnnn / ...
//! ```
//!
//! Instead of running an AML interpreter, `sleep_types` looks for that pattern: the name
//! `_S5_` after a NameOp (optionally with the root prefix `\`), followed by a package
//! whose first two elements are integer constants. Firmware that computes `_S5` in a
//! method is not understood (`None`); the kernel then tries the other ways to stop.

/// SLP_TYPa and SLP_TYPb (3 bits each, already masked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepTypes {
    pub a: u8,
    pub b: u8,
}

const NAME_OP: u8 = 0x08;
const ROOT_PREFIX: u8 = b'\\';
const PACKAGE_OP: u8 = 0x12;

/// Finds `Name (_S5, Package () { a, b, ... })` in the AML byte code `aml` (the DSDT
/// without its 36-byte header, or with it: the header cannot contain the pattern by
/// accident unless it also decodes). Returns the first such package that decodes.
pub fn sleep_types(aml: &[u8]) -> Option<SleepTypes> {
    let mut from = 0;
    while let Some(pos) = find(&aml[from..], b"_S5_").map(|p| p + from) {
        from = pos + 1;
        let named = match pos {
            0 => false,
            _ if aml[pos - 1] == NAME_OP => true,
            _ => pos >= 2 && aml[pos - 1] == ROOT_PREFIX && aml[pos - 2] == NAME_OP,
        };
        if !named {
            continue;
        }
        if let Some(types) = package(&aml[pos + 4..]) {
            return Some(types);
        }
    }
    None
}

/// Decodes `PackageOp PkgLength NumElements a b ...` at the start of `bytes`.
fn package(bytes: &[u8]) -> Option<SleepTypes> {
    if *bytes.first()? != PACKAGE_OP {
        return None;
    }
    let (length, used) = pkg_length(&bytes[1..])?;
    // The package's bytes (PkgLength counts itself, not the PackageOp).
    let body = bytes.get(1 + used..1 + length)?;
    let (&count, mut rest) = body.split_first()?;
    if count == 0 {
        return None;
    }
    let (a, n) = integer(rest)?;
    rest = &rest[n..];
    let b = if count >= 2 { integer(rest)?.0 } else { a };
    Some(SleepTypes {
        a: (a & 7) as u8,
        b: (b & 7) as u8,
    })
}

/// A PkgLength: its value and how many bytes it took.
fn pkg_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let lead = *bytes.first()?;
    let follow = usize::from(lead >> 6);
    if follow == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut value = usize::from(lead & 0x0f);
    for i in 0..follow {
        value |= usize::from(*bytes.get(1 + i)?) << (4 + 8 * i);
    }
    Some((value, 1 + follow))
}

/// An integer constant: its value and how many bytes it took.
fn integer(bytes: &[u8]) -> Option<(u64, usize)> {
    let le = |n: usize| -> Option<u64> {
        let raw = bytes.get(1..1 + n)?;
        Some(raw.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b)))
    };
    match *bytes.first()? {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0xff => Some((u64::MAX, 1)),
        0x0a => Some((le(1)?, 2)),
        0x0b => Some((le(2)?, 3)),
        0x0c => Some((le(4)?, 5)),
        0x0e => Some((le(8)?, 9)),
        _ => None,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(a: u8, b: u8) -> Option<SleepTypes> {
        Some(SleepTypes { a, b })
    }

    #[test]
    fn qemu_q35_package_of_zeros() {
        // What QEMU 8's q35 DSDT carries (disassembled: Name (_S5, Package (0x04) {0, 0, 0, 0})).
        let aml = [
            0x10, 0x08, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0,
        ];
        assert_eq!(sleep_types(&aml), types(0, 0));
    }

    #[test]
    fn byte_prefixed_values_from_real_firmware() {
        // Name (\_S5, Package (0x04) { 0x07, 0x07, 0, 0 }) as many PCs' firmware has it.
        let aml = [
            0xa0, 0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x07, 0x0a, 0x07, 0,
            0,
        ];
        assert_eq!(sleep_types(&aml), types(7, 7));
    }

    #[test]
    fn a_and_b_differ_and_are_masked_to_three_bits() {
        let aml = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x02, 0x0b, 0x05, 0x00, 0x0a, 0x0e,
        ];
        assert_eq!(sleep_types(&aml), types(5, 6));
    }

    #[test]
    fn a_single_element_serves_both_registers() {
        let aml = [0x08, b'_', b'S', b'5', b'_', 0x12, 0x03, 0x01, 0x01];
        assert_eq!(sleep_types(&aml), types(1, 1));
    }

    #[test]
    fn two_byte_package_length() {
        // Lead byte 0x47: one more length byte follows, low nibble 7; the next byte
        // (0x00) gives bits 4-11. Length 7 = itself (2) + count (1) + two values (4).
        let aml = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x47, 0x00, 0x02, 0x0a, 0x03, 0x0a, 0x04,
        ];
        assert_eq!(sleep_types(&aml), types(3, 4));
    }

    #[test]
    fn a_mention_that_is_not_a_name_is_skipped() {
        // "_S5_" inside a string, then the real declaration.
        let aml = [
            0x0d, b'_', b'S', b'5', b'_', 0x00, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02,
            0x0a, 0x05, 0x01,
        ];
        assert_eq!(sleep_types(&aml), types(5, 1));
    }

    #[test]
    fn a_method_or_a_non_constant_is_not_understood() {
        // Method (_S5_, ...) is 0x14 before the name, not NameOp.
        let method = [0x14, 0x08, b'_', b'S', b'5', b'_', 0x00, 0xa4, 0x00];
        assert_eq!(sleep_types(&method), None);
        // A package whose first element is a name reference (not a constant).
        let reference = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, b'S', b'L', b'P', b'5',
        ];
        assert_eq!(sleep_types(&reference), None);
    }

    #[test]
    fn truncated_tables_give_none() {
        let full = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x0a, 0x05, 0x0a, 0x05,
        ];
        for len in 0..full.len() {
            assert_eq!(sleep_types(&full[..len]), None, "{len} bytes");
        }
        assert_eq!(sleep_types(&[]), None);
        assert_eq!(sleep_types(b"no sleep states here"), None);
    }
}
