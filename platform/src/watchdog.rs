//! The watchdog: turns a CPU that makes no progress into an all-CPU report and a failed
//! run, instead of a silent hang that only a time-out ends.
//!
//! Progress is the per-CPU timer tick (`PerCpu::ticks`, every 4 ms, also in `hlt`). At
//! most every `CHECK_EVERY_NS`, one CPU (whichever takes `CHECKING` on its tick) looks
//! at every other online CPU's count; a CPU whose count has not moved for the limit
//! (`watchdog=SECONDS`, measured with the TSC) has its interrupts off or its timer
//! stopped. The checker then prints `watchdog: cpu N made no progress for S s`, stops
//! every other CPU with an NMI in reporting mode (`smp::stop_others_reporting`), prints
//! its own registers and backtrace from its tick's frame, waits for the others' reports
//! and exits with failure.
//!
//! The tick check cannot see a hang of every CPU (or of the only one): the crate's
//! waiting loop (`ipi::spin_until`, which every lock and call wait spins in) covers
//! that by calling `stuck_after` after twice the limit; `stuck` does the same for any
//! other code that knows it cannot go on. Both lead to the same report.
//!
//! False alarms: a CPU is only declared stuck after checks ran continuously for the
//! whole limit; if no check ran for half the limit (the whole guest was descheduled by
//! the host, or stopped in a debugger), every observation starts afresh. The watchdog
//! is off until `start` (the kernel starts it once every CPU runs its executor), and
//! CPUs that are not online are ignored.
//!
//! Reports: each CPU's NMI handler takes `REPORT_LOCK` (bounded wait, so a CPU that
//! never lets go cannot silence the rest), writes through `serial::emergency` (which
//! gives up on a console lock held by a stopped CPU) and counts itself in `REPORTED`.
//! After its registers come the lines of the registered reporters (`register_reporter`:
//! `ipi::init` registers the lock a CPU spins for, `order::write_waiting`, and its
//! calls, `ipi::write_state`); the watchdog imports no other module of this crate.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::atomic::AtomicCell;
use panda_arch::percpu::{self, MAX_CPUS};
use panda_arch::trap::TrapFrame;

/// A module's part of a CPU's report: writes lines about CPU `cpu` (each indented two
/// spaces and ended with a newline; nothing if it has nothing to say). It runs on that
/// CPU, stopped in its report (NMI or `stuck`), interrupts off: it must not take locks
/// or allocate, and must be sound for any `cpu` it is passed.
pub type Reporter = fn(&mut dyn core::fmt::Write, usize) -> core::fmt::Result;

/// How many reporters may register.
const MAX_REPORTERS: usize = 8;

// Reporters are read in NMI context: the cells must be plain atomic words, never
// `AtomicCell`'s fallback lock (an `Option<fn>` is one pointer, `None` being null).
const _: () = assert!(AtomicCell::<Option<Reporter>>::is_lock_free());

/// The registered reporters, in the order they registered (the order of their lines).
static REPORTERS: [AtomicCell<Option<Reporter>>; MAX_REPORTERS] =
    [const { AtomicCell::new(None) }; MAX_REPORTERS];
/// Slots of `REPORTERS` handed out so far.
static REPORTERS_TAKEN: AtomicUsize = AtomicUsize::new(0);

/// Adds `reporter` to every CPU's report, after the registers and before the backtrace
/// (modules above the watchdog register theirs: it imports none of them). Panics if
/// more than `MAX_REPORTERS` register (they register once, at start-up).
pub fn register_reporter(reporter: Reporter) {
    let slot = REPORTERS_TAKEN.fetch_add(1, Ordering::Relaxed);
    assert!(
        slot < MAX_REPORTERS,
        "watchdog: more than {MAX_REPORTERS} reporters"
    );
    // A report running meanwhile sees the slot empty or filled: both are whole values.
    REPORTERS[slot].store(Some(reporter));
}

/// How often the tick check runs (on whichever CPU's tick comes first).
const CHECK_EVERY_NS: u64 = 100_000_000;
/// How long a reporting CPU waits for the report lock before writing anyway.
const REPORT_LOCK_WAIT_NS: u64 = 3_000_000_000;
/// How long the first CPU waits for another report before it gives up on the rest.
const REPORT_WAIT_NS: u64 = 3_000_000_000;

/// No progress for this long is a hang; 0 = the watchdog is off.
static LIMIT_NS: AtomicU64 = AtomicU64::new(0);
/// Held by the CPU running the tick check.
static CHECKING: AtomicBool = AtomicBool::new(false);
/// When the last tick check ran.
static LAST_CHECK_NS: AtomicU64 = AtomicU64::new(0);
/// Per CPU: the tick count the last check saw, and when it last saw it change.
static SEEN_TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];
static CHANGED_NS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The longest time a CPU was seen without a tick (for tests and tuning).
static LONGEST_QUIET_NS: AtomicU64 = AtomicU64::new(0);
/// Set once a hang has been declared: there is one report per run.
static FIRED: AtomicBool = AtomicBool::new(false);
/// Serialises the per-CPU reports: the reporting CPU's index + 1, or 0.
static REPORT_LOCK: AtomicUsize = AtomicUsize::new(0);
/// Which CPUs have written their report.
static REPORTED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Starts (or, with 0, stops) the tick check: a CPU without a tick for `limit_ns` is
/// a hang.
pub fn start(limit_ns: u64) {
    LAST_CHECK_NS.store(0, Ordering::Relaxed);
    LIMIT_NS.store(limit_ns, Ordering::Release);
}

/// The limit (0 when the watchdog is off).
pub fn limit_ns() -> u64 {
    LIMIT_NS.load(Ordering::Acquire)
}

/// The longest a CPU has gone without a tick while the watchdog watched (at the check
/// interval's resolution).
pub fn longest_quiet_ns() -> u64 {
    LONGEST_QUIET_NS.load(Ordering::Relaxed)
}

/// Turns of each CPU's executor loop (0: not running an executor yet).
static TURNS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static SEEN_TURNS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static TURN_CHANGED_NS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Counts scheduling progress of the calling CPU: the executor calls it at the start of
/// every poll and at every preemption check (`should_yield`, which every user thread
/// makes at each trap). A CPU whose timer still ticks but which shows no such progress
/// for twice the limit is running one kernel poll that never returns and never checks
/// (a kernel task that never yields): the watchdog reports it like a hang. A CPU that
/// switches between thousands of spinning threads is progressing, however long one
/// round of them lasts.
pub fn executor_turn() {
    if let Some(t) = TURNS.get(percpu::current_index()) {
        t.fetch_add(1, Ordering::Relaxed);
    }
}

/// Called from the timer interrupt on every tick, with the interrupted frame.
pub(crate) fn tick(frame: &TrapFrame) {
    let limit = LIMIT_NS.load(Ordering::Acquire);
    if limit == 0 || FIRED.load(Ordering::Relaxed) {
        return;
    }
    let now = panda_arch::time::now_ns();
    if now.saturating_sub(LAST_CHECK_NS.load(Ordering::Relaxed)) < CHECK_EVERY_NS {
        return;
    }
    if CHECKING.swap(true, Ordering::Acquire) {
        return;
    }
    // Checks that stopped for a while (the guest itself was not running) prove
    // nothing about any one CPU: start every observation afresh.
    let fresh = now.saturating_sub(LAST_CHECK_NS.load(Ordering::Relaxed)) > limit / 2;
    let me = percpu::current_index();
    let mut hung = None;
    for cpu in percpu::online() {
        let i = cpu.index();
        let ticks = cpu.ticks.load(Ordering::Relaxed);
        let quiet = now.saturating_sub(CHANGED_NS[i].load(Ordering::Relaxed));
        if i == me || fresh || SEEN_TICKS[i].load(Ordering::Relaxed) != ticks {
            if !fresh && SEEN_TICKS[i].load(Ordering::Relaxed) != u64::MAX {
                LONGEST_QUIET_NS.fetch_max(quiet, Ordering::Relaxed);
            }
            SEEN_TICKS[i].store(ticks, Ordering::Relaxed);
            CHANGED_NS[i].store(now, Ordering::Relaxed);
        } else if quiet >= limit {
            hung = Some((i, quiet, false));
            break;
        }
        // The executor: ticks arrive, but does the loop come round?
        let turns = TURNS[i].load(Ordering::Relaxed);
        let stuck_for = now.saturating_sub(TURN_CHANGED_NS[i].load(Ordering::Relaxed));
        if fresh || turns == 0 || SEEN_TURNS[i].load(Ordering::Relaxed) != turns {
            SEEN_TURNS[i].store(turns, Ordering::Relaxed);
            TURN_CHANGED_NS[i].store(now, Ordering::Relaxed);
        } else if stuck_for >= limit.saturating_mul(2) {
            hung = Some((i, stuck_for, true));
            break;
        }
    }
    LAST_CHECK_NS.store(now, Ordering::Relaxed);
    CHECKING.store(false, Ordering::Release);
    if let Some((cpu, quiet, in_a_poll)) = hung {
        if claim() {
            panda_arch::serial::emergency(|w| {
                let why = if in_a_poll {
                    "its executor ran one kernel task that never yielded or checked for preemption"
                } else {
                    "(interrupts off?)"
                };
                let _ = writeln!(
                    w,
                    "watchdog: cpu {cpu} made no progress for {}.{} s {why}",
                    quiet / 1_000_000_000,
                    quiet / 100_000_000 % 10
                );
            });
            report_all(frame, "detected the hang")
        }
    }
}

/// For a lock (or any wait) that has spun too long: stops every CPU and reports each
/// one's registers and backtrace, this one's from here, then exits with failure. It
/// works when every CPU is stuck, where the tick check cannot run.
#[inline(never)]
pub fn stuck(what: &str) -> ! {
    stuck_for(what, None)
}

/// For a wait that has spun for `spun_ns` (the waiting loop, `ipi::spin_until`, calls
/// it after twice the limit): like `stuck`, and the first line says how long it spun.
#[inline(never)]
pub fn stuck_after(what: &str, spun_ns: u64) -> ! {
    stuck_for(what, Some(spun_ns))
}

#[inline(never)]
fn stuck_for(what: &str, spun_ns: Option<u64>) -> ! {
    let frame = here();
    if claim() {
        let cpu = percpu::checked_index().unwrap_or(usize::MAX);
        panda_arch::serial::emergency(|w| {
            let _ = write!(w, "watchdog: cpu {cpu} is stuck: {what}");
            let _ = match spun_ns {
                Some(ns) => writeln!(
                    w,
                    " (spun for {}.{} s)",
                    ns / 1_000_000_000,
                    ns / 100_000_000 % 10
                ),
                None => writeln!(w),
            };
        });
        report_all(&frame, "stuck here")
    }
    // Another CPU is already stopping the machine; its NMI will ask for this CPU's
    // report.
    panda_arch::power::halt_forever()
}

/// Whether this caller is the one to report the hang (the first of the tick check and
/// `stuck`; it then writes the line saying why before anything else).
fn claim() -> bool {
    !FIRED.swap(true, Ordering::AcqRel)
}

/// Stops the other CPUs, writes this CPU's report, waits for theirs, exits with failure.
/// If the machine is already being stopped (a panic), halts instead: that path ends
/// the run.
fn report_all(frame: &TrapFrame, role: &str) -> ! {
    x86_64::instructions::interrupts::disable();
    // The lock first, so that this CPU's report comes before those the NMIs ask for.
    let locked = lock_reports();
    if !panda_arch::smp::stop_others_reporting() {
        panda_arch::power::halt_forever()
    }
    let me = percpu::checked_index().unwrap_or(0);
    write_report(frame, role);
    if locked {
        REPORT_LOCK.store(0, Ordering::Release);
    }
    let expected: usize = percpu::online().filter(|c| c.index() != me).count();
    // Wait while reports keep coming; a CPU that takes no NMI must not hold the exit.
    let mut last_progress = panda_arch::time::now_ns();
    let mut seen = 0;
    loop {
        let done = others_reported(me);
        if done >= expected {
            break;
        }
        let now = panda_arch::time::now_ns();
        if done != seen {
            seen = done;
            last_progress = now;
        } else if now.saturating_sub(last_progress) > REPORT_WAIT_NS {
            break;
        }
        core::hint::spin_loop();
    }
    let done = others_reported(me);
    panda_arch::serial::emergency(|w| {
        for cpu in percpu::online().filter(|c| c.index() != me) {
            if !REPORTED[cpu.index()].load(Ordering::Acquire) {
                let _ = writeln!(w, "watchdog: cpu {} did not report", cpu.index());
            }
        }
        let _ = writeln!(
            w,
            "watchdog: {} of {} CPUs reported; stopping with failure",
            done + 1,
            expected + 1
        );
    });
    panda_arch::power::exit(false)
}

fn others_reported(me: usize) -> usize {
    percpu::online()
        .filter(|c| c.index() != me && REPORTED[c.index()].load(Ordering::Acquire))
        .count()
}

/// The NMI handler's part when the machine stops in reporting mode: this CPU's report.
pub(crate) fn report_from_nmi(frame: &TrapFrame) {
    report(frame, "stopped by NMI");
}

/// Writes one CPU's report under the report lock.
fn report(frame: &TrapFrame, role: &str) {
    let locked = lock_reports();
    write_report(frame, role);
    if locked {
        REPORT_LOCK.store(0, Ordering::Release);
    }
}

/// Takes the report lock; gives up after `REPORT_LOCK_WAIT_NS` (returns false), so
/// that a CPU which never lets go cannot silence the rest.
fn lock_reports() -> bool {
    let owner = percpu::checked_index().map_or(usize::MAX, |i| i + 1);
    let start = panda_arch::time::now_ns();
    while panda_arch::time::now_ns().saturating_sub(start) < REPORT_LOCK_WAIT_NS {
        if REPORT_LOCK
            .compare_exchange(0, owner, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// One CPU's report: header, registers, backtrace from the frame; then it counts as
/// reported.
fn write_report(frame: &TrapFrame, role: &str) {
    let me = percpu::checked_index();
    panda_arch::serial::emergency(|w| {
        let _ = writeln!(
            w,
            "watchdog: cpu {} report ({role}): {} mode, interrupts {}",
            me.map_or(usize::MAX, |i| i),
            if frame.from_user() { "user" } else { "kernel" },
            if frame.rflags & (1 << 9) != 0 {
                "on"
            } else {
                "off"
            }
        );
        let _ = writeln!(
            w,
            "  rip={:016x} rsp={:016x} rflags={:016x} cs={:x} ss={:x}",
            frame.rip, frame.rsp, frame.rflags, frame.cs, frame.ss
        );
        let _ = panda_arch::trap::write_registers(w, frame);
        if let Some(i) = me {
            for reporter in REPORTERS.iter().filter_map(AtomicCell::load) {
                let _ = reporter(w, i);
            }
        }
        let _ = panda_arch::backtrace::write(w, frame.rip, frame.rbp);
    });
    if let Some(i) = me {
        REPORTED[i].store(true, Ordering::Release);
    }
}

/// The caller's registers as a frame: RIP is in the caller, RBP its frame.
#[inline(always)]
fn here() -> TrapFrame {
    let mut frame = TrapFrame::default();
    let f: *mut TrapFrame = &mut frame;
    // SAFETY: the asm only stores registers into `frame`, a local the pointer `f`
    // points at, at offsets inside it; `pushfq`/`pop` leave the stack as they found it
    // (the kernel target has no red zone to clobber).
    unsafe {
        core::arch::asm!(
            "mov [{f} + {r15}], r15",
            "mov [{f} + {r14}], r14",
            "mov [{f} + {r13}], r13",
            "mov [{f} + {r12}], r12",
            "mov [{f} + {r11}], r11",
            "mov [{f} + {r10}], r10",
            "mov [{f} + {r9}], r9",
            "mov [{f} + {r8}], r8",
            "mov [{f} + {rbp}], rbp",
            "mov [{f} + {rdi}], rdi",
            "mov [{f} + {rsi}], rsi",
            "mov [{f} + {rdx}], rdx",
            "mov [{f} + {rcx}], rcx",
            "mov [{f} + {rbx}], rbx",
            "mov [{f} + {rax}], rax",
            "mov [{f} + {rsp}], rsp",
            "lea {t}, [rip]",
            "mov [{f} + {rip}], {t}",
            "mov {t}, cs",
            "mov [{f} + {cs}], {t}",
            "mov {t}, ss",
            "mov [{f} + {ss}], {t}",
            "pushfq",
            "pop {t}",
            "mov [{f} + {rflags}], {t}",
            f = in(reg) f,
            t = out(reg) _,
            r15 = const core::mem::offset_of!(TrapFrame, r15),
            r14 = const core::mem::offset_of!(TrapFrame, r14),
            r13 = const core::mem::offset_of!(TrapFrame, r13),
            r12 = const core::mem::offset_of!(TrapFrame, r12),
            r11 = const core::mem::offset_of!(TrapFrame, r11),
            r10 = const core::mem::offset_of!(TrapFrame, r10),
            r9 = const core::mem::offset_of!(TrapFrame, r9),
            r8 = const core::mem::offset_of!(TrapFrame, r8),
            rbp = const core::mem::offset_of!(TrapFrame, rbp),
            rdi = const core::mem::offset_of!(TrapFrame, rdi),
            rsi = const core::mem::offset_of!(TrapFrame, rsi),
            rdx = const core::mem::offset_of!(TrapFrame, rdx),
            rcx = const core::mem::offset_of!(TrapFrame, rcx),
            rbx = const core::mem::offset_of!(TrapFrame, rbx),
            rax = const core::mem::offset_of!(TrapFrame, rax),
            rsp = const core::mem::offset_of!(TrapFrame, rsp),
            rip = const core::mem::offset_of!(TrapFrame, rip),
            cs = const core::mem::offset_of!(TrapFrame, cs),
            ss = const core::mem::offset_of!(TrapFrame, ss),
            rflags = const core::mem::offset_of!(TrapFrame, rflags),
        );
    }
    frame
}
