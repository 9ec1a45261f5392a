//! The kernel's lock order: every ranked lock's rank, in one place.
//!
//! A CPU may take a lock only while every lock it holds has a lower rank
//! (`panda_arch::sync` checks it and panics with both names otherwise). Gaps leave room
//! for new locks. docs/LOCKING.md says what each lock protects and why the order is
//! what it is; keep the two in step.

use panda_arch::sync::Rank;

/// Serialises user console output (one write call is one piece).
pub static USER_OUTPUT: Rank = Rank::new(10, "process::USER_OUTPUT");
/// Live and not yet reaped processes, by pid.
pub static PROCESSES: Rank = Rank::new(20, "process::PROCESSES");
/// One process's thread table.
pub static THREADS: Rank = Rank::new(25, "Process::threads");
/// One process's children (their pids), for wait and kill.
pub static CHILDREN: Rank = Rank::new(26, "Process::children");
/// One address space's layout changes (brk, buffer free, protect), held across their
/// unmap and shootdown.
pub static LAYOUT: Rank = Rank::new(30, "AddressSpace::layout");
/// One address space's page tables.
pub static TABLES: Rank = Rank::new(50, "AddressSpace::tables");
/// One address space's region bookkeeping (read by faults, written by layout changes;
/// a fault that finds the layout changed re-reads it with the tables locked).
pub static REGIONS: Rank = Rank::new(55, "AddressSpace::regions");
/// One initiating CPU's shootdown request: the pages its targets flush.
pub static SCOPE: Rank = Rank::new(65, "aspace::SCOPES[cpu]");
/// The space each CPU last activated.
pub static CURRENT: Rank = Rank::new(70, "aspace::CURRENT");
/// An event's waiters.
pub static EVENT: Rank = Rank::new(80, "process::Event::waiters");
/// The lock `crash=lockheld` never lets go of.
pub static CRASH_HELD: Rank = Rank::new(90, "crash::HELD");
