//! Pure decoders of firmware data, tested on the host (`cargo test -p panda-firmware`).
//!
//! `clock`: one TSC rate from several timing windows, robust to a CPU held up mid-read.
//!
//! `s5`: the sleep-type values for ACPI power-off (S5), read from the DSDT's `\_S5`
//! object without an AML interpreter.
//!
//! `srat`: the NUMA affinity of CPUs and memory ranges, from the SRAT.
#![no_std]
#![forbid(unsafe_code)]

pub mod clock;
pub mod s5;
pub mod srat;
