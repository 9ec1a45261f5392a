//! Interrupt handlers for the local APIC's vectors, IPIs and cross-CPU calls.
//!
//! - `TIMER_VECTOR`: counts the tick, runs the watchdog's check, runs the tick hook (the executor's timer check),
//!   acknowledges.
//! - `WAKE_VECTOR`: only wakes the CPU from `hlt` (the executor then looks at its queue).
//! - `CALL_VECTOR`: runs the calls posted to this CPU (`serve_calls`).
//! - spurious: ignored, as the SDM says (no EOI). APIC error: logged, acknowledged.
//! - NMI: halts the CPU when the machine is being stopped (`smp::stop_others`), after
//!   writing its report if the watchdog stops it (`smp::stop_others_reporting`), and is
//!   fatal otherwise.
//!
//! A cross-CPU call (`call_on`, or `call_on_set` for several CPUs at once) fills in the
//! caller's own request record (function, argument, how many targets), sets the
//! caller's bit in each target's inbox and sends `CALL_VECTOR`. A target takes the bits
//! of its inbox with one swap (so each posted call runs exactly once, whether its IPI
//! handler or one of its waiting loops gets there first), runs each caller's function
//! and counts the caller's request down. Callers never wait for each other to post: one
//! record per caller and one bit per caller in each inbox. While it waits for its
//! answers, a caller serves its own inbox, so two CPUs calling each other cannot
//! deadlock; after a short spin it waits halted, and the target that finishes last
//! wakes it (on an overcommitted host a spinning caller takes host time from the very
//! virtual CPUs it waits for).
//!
//! `spin_until` is the crate's one waiting loop: call waits and lock waits (`sync`)
//! spin there, serving this CPU's inbox between attempts and reporting to the watchdog
//! after twice its limit. This module imports `order` (a served call's fresh lock
//! order) and `watchdog` (tick, NMI report, stuck), never `sync`.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::atomic::AtomicCell;
use panda_arch::apic::{
    self, CALL_VECTOR, ERROR_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR, WAKE_VECTOR,
};
use panda_arch::percpu::{self, MAX_CPUS};
use panda_arch::trap::{self, TrapFrame};
use panda_mm::tlb::{CpuMask, CpuSet};

/// A function run on another CPU: takes an argument, returns a value.
pub type CallFn = fn(u64) -> u64;

// Function pointers are kept in `AtomicCell`s, read in interrupt context (the tick
// hook, served calls): the cells must be plain atomic words, never `AtomicCell`'s
// fallback lock, which an interrupted holder on the same CPU would never release.
// A `fn` is one pointer (an `Option<fn>` too, `None` being null).
const _: () = assert!(AtomicCell::<CallFn>::is_lock_free());
const _: () = assert!(AtomicCell::<Option<fn()>>::is_lock_free());

/// What an idle request record's function slot holds (never run: no bit is posted).
fn no_call(_: u64) -> u64 {
    0
}

/// A CPU's cross-CPU call in progress. A CPU makes one call (or one set call) at a
/// time and waits for it, so one record per CPU suffices.
struct Request {
    /// Written by the caller before it posts (see `post_all` for the ordering).
    function: AtomicCell<CallFn>,
    argument: AtomicU64,
    /// The result (of a call to one CPU; a set call's targets each overwrite it).
    result: AtomicU64,
    /// Targets that have not finished the call yet.
    remaining: AtomicUsize,
    /// The targets that have not finished; each leaves the set when it has (resends and
    /// the watchdog's report go to those left).
    pending: CpuSet,
    /// The caller waits halted and wants a wake-up IPI when `remaining` reaches 0.
    halted: AtomicBool,
    /// The caller has a call in flight (a call made from inside a served call would
    /// overwrite it).
    busy: AtomicBool,
}

static REQUESTS: [Request; MAX_CPUS] = [const {
    Request {
        function: AtomicCell::new(no_call),
        argument: AtomicU64::new(0),
        result: AtomicU64::new(0),
        remaining: AtomicUsize::new(0),
        pending: CpuSet::new(),
        halted: AtomicBool::new(false),
        busy: AtomicBool::new(false),
    }
}; MAX_CPUS];

/// Per target CPU: bit `c` is set while caller `c`'s request waits to be run there.
static INBOX: [[AtomicU64; MAX_CPUS / 64]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; MAX_CPUS / 64] }; MAX_CPUS];

/// Run on every tick (`set_tick_hook`); `None` until set.
static TICK_HOOK: AtomicCell<Option<fn()>> = AtomicCell::new(None);

/// Installs the handlers of every APIC vector and the NMI, and adds two lines to each
/// CPU's watchdog report: the lock it spins for (`order::write_waiting`) and its calls
/// (`write_state`). Called once on the BSP.
pub fn init() {
    crate::watchdog::register_reporter(crate::order::write_waiting);
    crate::watchdog::register_reporter(write_state);
    trap::set_handler(TIMER_VECTOR, on_timer);
    trap::set_handler(WAKE_VECTOR, on_wake);
    trap::set_handler(CALL_VECTOR, on_call);
    trap::set_handler(SPURIOUS_VECTOR, |_| {});
    trap::set_handler(ERROR_VECTOR, on_error);
    trap::set_handler(2, on_nmi);
}

/// Runs `hook` on every timer tick, on the ticking CPU, with interrupts off.
pub fn set_tick_hook(hook: fn()) {
    TICK_HOOK.store(Some(hook));
}

fn on_timer(frame: &mut TrapFrame) {
    if let Some(cpu) = percpu::current() {
        cpu.ticks.fetch_add(1, Ordering::Relaxed);
    }
    crate::watchdog::tick(frame);
    if let Some(hook) = TICK_HOOK.load() {
        hook();
    }
    apic::eoi();
}

fn on_wake(_: &mut TrapFrame) {
    if let Some(cpu) = percpu::current() {
        cpu.wake_ipis.fetch_add(1, Ordering::Relaxed);
    }
    apic::eoi();
}

/// Runs the calls posted to this CPU, if any. Called from the CALL_VECTOR handler and
/// from the waiting loop (`spin_until`: lock waits and call waits), so a waiting CPU
/// still answers calls. The two can nest — the IPI for a call can arrive while the
/// waiting loop is already running that call — so the posted bits are taken with one
/// swap: each posted call is run by exactly one of them, once. (A call that ran twice
/// once marked a freed mailbox done again, and every later call to that CPU spun for
/// ever.)
pub fn serve_calls() {
    let Some(inbox) = INBOX.get(percpu::current_index()) else {
        return;
    };
    for (w, word) in inbox.iter().enumerate() {
        if word.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let mut callers = word.swap(0, Ordering::Acquire);
        while callers != 0 {
            let caller = w * 64 + callers.trailing_zeros() as usize;
            callers &= callers - 1;
            run_request(caller);
        }
    }
}

/// Runs caller `caller`'s request on this CPU and counts it down.
fn run_request(caller: usize) {
    let request = &REQUESTS[caller];
    // `post_all` wrote the function and argument before it set the caller's bit in
    // this CPU's inbox (Release); `serve_calls` took the bit with an Acquire swap, so
    // these loads see this call's values, not an earlier call's. The caller writes
    // them again only for its next call, which it makes only after this CPU (and every
    // other target) has counted this one down below.
    let function = request.function.load();
    let argument = request.argument.load(Ordering::Relaxed);
    // A served call runs between two steps of whatever this CPU was doing (possibly
    // waiting for a lock): it starts a fresh lock order.
    let result = crate::order::nested(|| function(argument));
    request.result.store(result, Ordering::Relaxed);
    request.pending.remove(percpu::current_index());
    // After this the caller may return and make its next call: nothing of the request
    // is read past it but `halted` (a stale read only sends a spare wake-up).
    if request.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
        // Pairs with the fence in `halt_until_done`: either the caller sees the count
        // at 0 before it halts, or this sees its flag and wakes it.
        core::sync::atomic::fence(Ordering::SeqCst);
        if request.halted.load(Ordering::Relaxed) {
            wake(caller);
        }
    }
}

fn on_call(_: &mut TrapFrame) {
    if let Some(cpu) = percpu::current() {
        cpu.call_ipis.fetch_add(1, Ordering::Relaxed);
    }
    serve_calls();
    apic::eoi();
}

fn on_error(_: &mut TrapFrame) {
    panda_arch::serial::emergency(|w| {
        let _ = writeln!(w, "apic: error interrupt on cpu{}", percpu::current_index());
    });
    apic::eoi();
}

fn on_nmi(frame: &mut TrapFrame) {
    if panda_arch::smp::stopping() {
        if panda_arch::smp::stopping_with_reports() {
            crate::watchdog::report_from_nmi(frame);
        }
        panda_arch::power::halt_forever();
    }
    panda_arch::serial::emergency(|w| {
        let _ = panda_arch::trap::write_report(w, frame, 0);
    });
    panda_arch::power::exit(false)
}

/// Whether CPU `cpu` has no call in flight and none posted to it waits to run.
pub fn calls_idle(cpu: usize) -> bool {
    let (Some(request), Some(inbox)) = (REQUESTS.get(cpu), INBOX.get(cpu)) else {
        return true;
    };
    !request.busy.load(Ordering::Acquire)
        && request.remaining.load(Ordering::Acquire) == 0
        && inbox.iter().all(|w| w.load(Ordering::Acquire) == 0)
}

/// Why a cross-CPU call could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The target CPU is not online.
    Offline,
}

/// Runs `function(argument)` on CPU `target` and returns its result. On the calling
/// CPU itself the function runs directly. Must be called with interrupts enabled or
/// from a context that may spin (the caller serves its own inbox while waiting), and
/// not from inside a served call.
pub fn call_on(target: usize, function: CallFn, argument: u64) -> Result<u64, CallError> {
    if target == percpu::current_index() {
        return Ok(function(argument));
    }
    if !percpu::cpu(target).online() {
        return Err(CallError::Offline);
    }
    let (request, _) = post_all(|c| c == target, function, argument);
    wait(request);
    let result = request.result.load(Ordering::Relaxed);
    finish(request);
    Ok(result)
}

/// Runs `function(argument)` on every online CPU in `targets` at once (the calling CPU
/// included, directly, if listed) and returns when all have finished; returns how many
/// ran it. All IPIs go out before any answer is awaited, so the targets work in parallel
/// (with the caller, if it is one of them).
pub fn call_on_set(targets: impl Fn(usize) -> bool, function: CallFn, argument: u64) -> usize {
    let me = percpu::current_index();
    let (request, mut ran) = post_all(|c| c != me && targets(c), function, argument);
    if targets(me) {
        function(argument);
        ran += 1;
    }
    wait(request);
    finish(request);
    ran
}

/// Posts `function(argument)` to every online CPU other than the caller for which
/// `targets` holds; returns the caller's request and how many CPUs it was posted to.
fn post_all(
    targets: impl Fn(usize) -> bool,
    function: CallFn,
    argument: u64,
) -> (&'static Request, usize) {
    let me = percpu::current_index();
    let request = &REQUESTS[me];
    assert!(
        !request.busy.swap(true, Ordering::Acquire),
        "cpu{me} made a cross-CPU call from inside a cross-CPU call"
    );
    // Exactly the CPUs posted to are waited for, whatever comes online meanwhile.
    let mut posted = CpuMask::default();
    let mut count = 0;
    for cpu in (0..MAX_CPUS).filter(|&c| c != me && targets(c) && percpu::cpu(c).online()) {
        posted.insert(cpu);
        count += 1;
    }
    // Ordered before the inbox bits below by their Release (see `run_request`).
    request.function.store(function);
    request.argument.store(argument, Ordering::Relaxed);
    request.remaining.store(count, Ordering::Relaxed);
    // Empty here: every target of the previous call left it before the count reached 0.
    for cpu in posted.iter() {
        request.pending.insert(cpu);
    }
    let bit = 1u64 << (me % 64);
    for cpu in posted.iter() {
        // Release: the request's fields above are visible to the target that takes
        // this bit.
        INBOX[cpu][me / 64].fetch_or(bit, Ordering::Release);
        apic::send_ipi(percpu::cpu(cpu).apic_id(), CALL_VECTOR);
    }
    (request, count)
}

/// Ends the caller's call: its record is free for the next one.
fn finish(request: &Request) {
    request.busy.store(false, Ordering::Release);
}

/// How long a caller waits for a posted call to be taken before it sends the IPI again.
const RESEND_AFTER_NS: u64 = 50_000_000;

/// Calls whose IPI was sent again (not taken within `RESEND_AFTER_NS`: under an
/// overcommitted emulator that is usually a target not scheduled on the host, not a
/// lost IPI; the kernel's closing summary prints the count).
static RESENDS: AtomicU64 = AtomicU64::new(0);

/// How many calls needed their IPI sent again since boot.
pub fn resends() -> u64 {
    RESENDS.load(Ordering::Relaxed)
}

/// How long `wait` spins before it waits halted. A call on a running CPU is answered
/// within a few microseconds; one that takes longer usually waits for a target that is
/// not running at all (a virtual CPU its host has descheduled), and a caller that spins
/// meanwhile takes host time from the very CPUs it waits for.
const HALT_AFTER_NS: u64 = 20_000;

/// Waits of callers that went on halted (the closing summary prints the count).
static HALTED_WAITS: AtomicU64 = AtomicU64::new(0);

/// How many waits for a call's answers went on halted since boot.
pub fn halted_waits() -> u64 {
    HALTED_WAITS.load(Ordering::Relaxed)
}

/// Waits until every target has run the caller's request, in the waiting loop (which
/// serves this CPU's own inbox meanwhile, so two CPUs calling each other cannot
/// deadlock). A call still not taken after `RESEND_AFTER_NS` gets its IPI again: a lost
/// IPI must not hang the caller — and with it every CPU waiting for a lock the caller
/// holds. Sending it again is harmless: an IPI that finds no posted call does nothing.
fn wait(request: &Request) {
    let me = percpu::current_index();
    let start = panda_arch::time::now_ns();
    let mut resend_at = start + RESEND_AFTER_NS;
    spin_until("waiting for other CPUs to answer a call", || {
        if request.remaining.load(Ordering::Acquire) == 0 {
            return Some(());
        }
        let now = panda_arch::time::now_ns();
        if now >= resend_at {
            for cpu in request.pending.snapshot().iter() {
                if INBOX[cpu][me / 64].load(Ordering::Acquire) & (1 << (me % 64)) != 0 {
                    RESENDS.fetch_add(1, Ordering::Relaxed);
                    apic::send_ipi(percpu::cpu(cpu).apic_id(), CALL_VECTOR);
                }
            }
            resend_at = now + RESEND_AFTER_NS;
        }
        if now >= start + HALT_AFTER_NS {
            // Halts only if nothing is posted to this CPU: the loop serves it first.
            halt_until_done(request);
        }
        None
    });
}

/// How many turns of the waiting loop pass between two looks at the clock.
const CLOCK_EVERY: u32 = 64;

/// The crate's one waiting loop: every spin that waits on another CPU — for a lock
/// (`sync`), for a call's answers (`call_on`, `call_on_set`), or any other wait — spins
/// here, interrupts on or off. Between attempts it runs the calls posted to this CPU
/// (`serve_calls`), so a CPU that this one waits for can itself wait for this one; and
/// once it has spun for twice the watchdog's limit it reports `what` as stuck
/// (`watchdog::stuck_after`: every CPU's report, then failure; never with the watchdog
/// off). Returns what the first successful `attempt` returns.
///
/// What it waits for shows in the report through the registered reporters: a lock
/// waiter records its lock (`order::waiting_for`), a caller its request (`write_state`).
/// Must not be called from inside a served call that waits for a call (a CPU makes one
/// call at a time).
pub fn spin_until<G>(what: &str, mut attempt: impl FnMut() -> Option<G>) -> G {
    let start = panda_arch::time::now_ns();
    let mut spins = 0u32;
    loop {
        if let Some(g) = attempt() {
            return g;
        }
        serve_calls();
        core::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(CLOCK_EVERY) {
            let limit = crate::watchdog::limit_ns().saturating_mul(2);
            let spun = panda_arch::time::now_ns().saturating_sub(start);
            if limit != 0 && spun >= limit {
                crate::watchdog::stuck_after(what, spun);
            }
        }
    }
}

/// Halts until the next interrupt unless the request is done: the target that finishes
/// it last sends a wake-up IPI (`run_request`), and the timer tick, a call posted to
/// this CPU or any other interrupt also ends the halt. Only with interrupts enabled (a
/// caller holding interrupts off keeps spinning).
fn halt_until_done(request: &Request) {
    use x86_64::instructions::interrupts;
    if !interrupts::are_enabled() {
        return;
    }
    interrupts::disable();
    request.halted.store(true, Ordering::Relaxed);
    // Pairs with the fence in `run_request` (see there).
    core::sync::atomic::fence(Ordering::SeqCst);
    let inbox = &INBOX[percpu::current_index()];
    if request.remaining.load(Ordering::Acquire) != 0
        && inbox.iter().all(|w| w.load(Ordering::Acquire) == 0)
    {
        HALTED_WAITS.fetch_add(1, Ordering::Relaxed);
        // `sti; hlt`: an interrupt arriving after the check still ends the halt.
        interrupts::enable_and_hlt();
    } else {
        interrupts::enable();
    }
    request.halted.store(false, Ordering::Relaxed);
}

/// CPU `cpu`'s part of the watchdog's report: the calls posted to it and not yet taken,
/// and the targets of its own call that have not finished (one not taken shows on that
/// target's line too).
pub fn write_state(w: &mut dyn core::fmt::Write, cpu: usize) -> core::fmt::Result {
    let (Some(request), Some(inbox)) = (REQUESTS.get(cpu), INBOX.get(cpu)) else {
        return Ok(());
    };
    let list = |w: &mut dyn core::fmt::Write, cpus: &mut dyn Iterator<Item = usize>| {
        let mut first = true;
        for cpu in cpus {
            write!(w, "{}cpu{cpu}", if first { "" } else { ", " })?;
            first = false;
        }
        if first {
            write!(w, "none")?;
        }
        Ok::<(), core::fmt::Error>(())
    };
    write!(w, "  calls posted here, not taken: from ")?;
    let taken = |c: usize| inbox[c / 64].load(Ordering::Relaxed) & (1 << (c % 64)) == 0;
    list(w, &mut (0..MAX_CPUS).filter(|&c| !taken(c)))?;
    if request.busy.load(Ordering::Relaxed) {
        write!(w, "; waiting for the answers of ")?;
        list(w, &mut request.pending.snapshot().iter())?;
    }
    writeln!(w)
}

/// Sends a wake-up IPI to every online CPU for which `targets` holds, except the caller.
pub fn wake_set(targets: impl Fn(usize) -> bool) {
    let me = percpu::current_index();
    for cpu in percpu::online().filter(|c| c.index() != me && targets(c.index())) {
        apic::send_ipi(cpu.apic_id(), WAKE_VECTOR);
    }
}

/// Sends a wake-up IPI to every other CPU with the all-but-self shorthand (one ICR
/// write, however many CPUs).
pub fn wake_all_but_self() {
    apic::send_ipi_all_but_self(WAKE_VECTOR);
}

/// Sends a wake-up IPI to CPU `target` (no-op if it is not online).
pub fn wake(target: usize) {
    let cpu = percpu::cpu(target);
    if cpu.online() {
        apic::send_ipi(cpu.apic_id(), WAKE_VECTOR);
    }
}
