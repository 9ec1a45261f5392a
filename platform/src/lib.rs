//! `panda-platform`: what the kernel owns and shares between CPUs, built on `arch`.
//!
//! `arch` knows the x86 machine (boot, descriptor tables, traps, the APIC, paging
//! formats, time); it holds no memory policy and does not depend on `mm`. This crate
//! turns those mechanisms into the kernel's trusted services:
//!
//! - `cpu`: the running CPU as a `panda_mm::CpuId` (`cpu::current`), the index of
//!   every per-CPU table of the memory layers;
//! - `frame`: physical frames as owned values (`Frame`, `ZeroedFrame`, `FilledFrame`),
//!   the per-CPU caches, the pools of frames zeroed ahead of demand and the zeroing
//!   method;
//! - `zero`: the zeroing policy: where a fault's zeroed frame comes from (pool hit,
//!   awaited refill, zeroed on the spot), the zeroing task and idle-time top-up;
//! - `heap`: the kernel heap (the global allocator: per-CPU slabs over frames);
//! - `user`: user addresses as checked values (`UserAddr`, `UserRange`), made once
//!   at the system-call boundary and taken by every user-memory copy below it;
//! - `vm`: a user address space (`VmSpace`): its page tables (owning what they map,
//!   through the private `tables`), which CPUs run it, and the TLB shootdowns that keep
//!   them true;
//! - `sync`: the ranked spinlocks every other module uses;
//! - `ipi`: cross-CPU calls, wake-ups and the timer tick, and the one waiting loop
//!   (`ipi::spin_until`) that serves calls while a CPU waits and is watched;
//! - `order`: lock-order state per CPU (held ranks, `nested`, the lock a CPU waits for);
//! - `watchdog`: the per-CPU progress check that turns a hang into a report, with the
//!   lines other modules register (`watchdog::register_reporter`).
//!
//! Among the lock modules imports run one way: `sync` -> `ipi` -> {`order`,
//! `watchdog`}, `sync` -> `order`; `order` and `watchdog` import nothing of this crate.
//!
//! The kernel crate above builds under `#![forbid(unsafe_code)]`; every `unsafe` block
//! here carries a `// SAFETY:` line, and a safe function here must be sound whatever
//! its caller passes.
#![no_std]

extern crate alloc;

pub mod cpu;
pub mod frame;
pub mod heap;
pub mod ipi;
pub mod order;
pub mod sync;
mod tables;
pub mod vm;
pub mod watchdog;
pub mod zero;
