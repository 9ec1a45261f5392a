//! The kernel's lock order: every ranked lock's rank, in one place (the three that
//! `panda_platform::vm` takes are defined there and named here in their place).
//!
//! A CPU may take a lock only while every lock it holds has a lower rank
//! (`panda_platform::sync` checks it and panics with both names otherwise). Gaps leave room
//! for new locks. docs/LOCKING.md says what each lock protects and why the order is
//! what it is; keep the two in step.

use panda_platform::sync::Rank;

// 10: was user console output; now an async lock (`panda_sched::AsyncLock`), outside
// the ranked order: it is held across yields and its waiters wait as futures.
/// Live and not yet reaped processes, by pid.
pub static PROCESSES: Rank = Rank::new(20, "process::PROCESSES");
/// One process's thread table.
pub static THREADS: Rank = Rank::new(25, "Process::threads");
/// One process's children (their pids), for wait and kill.
pub static CHILDREN: Rank = Rank::new(26, "Process::children");
/// One address space's segment changes (loader, protect), held across protect's
/// shootdown. Brk and buffer frees do not take it (their ranges retire instead).
pub static LAYOUT: Rank = Rank::new(30, "AddressSpace::layout");
// 50: one address space's page tables, `panda_platform::vm::TABLES`.
/// One address space's region bookkeeping (read by faults, written by layout changes;
/// a fault that finds the layout changed re-reads it with the tables locked).
pub static REGIONS: Rank = Rank::new(55, "AddressSpace::regions");
// 65: one initiating CPU's shootdown request, `panda_platform::vm::SCOPE`.
// 70: the space each CPU last activated, `panda_platform::vm::CURRENT`.
/// An event's waiters.
pub static EVENT: Rank = Rank::new(80, "process::Event::waiters");
/// The lock `crash=lockheld` never lets go of.
pub static CRASH_HELD: Rank = Rank::new(90, "crash::HELD");

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
