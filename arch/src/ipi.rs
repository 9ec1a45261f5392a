//! Interrupt handlers for the local APIC's vectors, IPIs and cross-CPU calls.
//!
//! - `TIMER_VECTOR`: counts the tick, runs the watchdog's check, runs the tick hook (the executor's timer check),
//!   acknowledges.
//! - `WAKE_VECTOR`: only wakes the CPU from `hlt` (the executor then looks at its queue).
//! - `CALL_VECTOR`: runs the function posted in this CPU's call mailbox.
//! - spurious: ignored, as the SDM says (no EOI). APIC error: logged, acknowledged.
//! - NMI: halts the CPU when the machine is being stopped (`smp::stop_others`), after
//!   writing its report if the watchdog stops it (`smp::stop_others_reporting`), and is
//!   fatal otherwise.
//!
//! A cross-CPU call (`call_on`, or `call_on_set` for several CPUs at once) claims the
//! target's mailbox (callers to one target take turns), posts `(function, argument)`,
//! sends `CALL_VECTOR` and spins until the target wrote the result. While it spins, the
//! caller serves its own mailbox, so two CPUs calling each other cannot deadlock; set
//! calls claim mailboxes in ascending CPU order, so two set calls cannot either.

use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::apic::{self, CALL_VECTOR, ERROR_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR, WAKE_VECTOR};
use crate::percpu::{self, MAX_CPUS};
use crate::trap::{self, TrapFrame};

/// A function run on another CPU: takes an argument, returns a value.
pub type CallFn = fn(u64) -> u64;

const IDLE: u8 = 0;
/// A caller owns the mailbox and is filling it in.
const CLAIMED: u8 = 3;
const POSTED: u8 = 1;
const DONE: u8 = 2;
/// The target is running the call (taken by exactly one of its handler or its waiting
/// loop).
const RUNNING: u8 = 4;

struct Mailbox {
    state: AtomicU8,
    function: AtomicUsize,
    argument: AtomicU64,
    result: AtomicU64,
}

static MAILBOXES: [Mailbox; MAX_CPUS] = [const {
    Mailbox {
        state: AtomicU8::new(IDLE),
        function: AtomicUsize::new(0),
        argument: AtomicU64::new(0),
        result: AtomicU64::new(0),
    }
}; MAX_CPUS];

static TICK_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs the handlers of every APIC vector and the NMI. Called once on the BSP.
pub fn init() {
    trap::set_handler(TIMER_VECTOR, on_timer);
    trap::set_handler(WAKE_VECTOR, on_wake);
    trap::set_handler(CALL_VECTOR, on_call);
    trap::set_handler(SPURIOUS_VECTOR, |_| {});
    trap::set_handler(ERROR_VECTOR, on_error);
    trap::set_handler(2, on_nmi);
}

/// Runs `hook` on every timer tick, on the ticking CPU, with interrupts off.
pub fn set_tick_hook(hook: fn()) {
    TICK_HOOK.store(hook as usize, Ordering::Release);
}

fn on_timer(frame: &mut TrapFrame) {
    if let Some(cpu) = percpu::current() {
        cpu.ticks.fetch_add(1, Ordering::Relaxed);
    }
    crate::watchdog::tick(frame);
    let hook = TICK_HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: only `set_tick_hook` stores non-zero values, and it stores `fn()`s.
        let hook: fn() = unsafe { core::mem::transmute::<usize, fn()>(hook) };
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

/// Runs the call posted in this CPU's mailbox, if any. Called from the CALL_VECTOR
/// handler and from every loop that waits on another CPU (`post`, `collect`, kernel
/// locks), so a waiting CPU still answers calls. The two can nest — the IPI for a call
/// can arrive while the waiting loop is already running that call — so the call is
/// taken with a compare-exchange (POSTED -> RUNNING): exactly one of them runs it and
/// marks it done. (Without that, the nested run marked it DONE, the poster collected
/// and freed the mailbox, and the outer run then marked the free mailbox DONE again: no
/// caller could ever claim it, and every later call to that CPU spun for ever.)
pub fn serve_mailbox() {
    let Some(mailbox) = MAILBOXES.get(percpu::current_index()) else {
        return;
    };
    if mailbox
        .state
        .compare_exchange(POSTED, RUNNING, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    // SAFETY: the poster stored a `CallFn` before setting POSTED (Release/Acquire,
    // through the compare-exchange above).
    let function: CallFn =
        unsafe { core::mem::transmute::<usize, CallFn>(mailbox.function.load(Ordering::Relaxed)) };
    // A served call runs between two steps of whatever this CPU was doing (possibly
    // waiting for a lock): it starts a fresh lock order.
    let argument = mailbox.argument.load(Ordering::Relaxed);
    let result = crate::sync::nested(|| function(argument));
    mailbox.result.store(result, Ordering::Relaxed);
    mailbox.state.store(DONE, Ordering::Release);
}

fn on_call(_: &mut TrapFrame) {
    if let Some(cpu) = percpu::current() {
        cpu.call_ipis.fetch_add(1, Ordering::Relaxed);
    }
    serve_mailbox();
    apic::eoi();
}

fn on_error(_: &mut TrapFrame) {
    crate::serial::emergency(|w| {
        let _ = writeln!(w, "apic: error interrupt on cpu{}", percpu::current_index());
    });
    apic::eoi();
}

fn on_nmi(frame: &mut TrapFrame) {
    if crate::smp::stopping() {
        if crate::smp::stopping_with_reports() {
            crate::watchdog::report_from_nmi(frame);
        }
        crate::power::halt_forever();
    }
    crate::serial::emergency(|w| {
        let _ = crate::trap::write_report(w, frame, 0);
    });
    crate::power::exit(false)
}

/// Whether CPU `cpu`'s call mailbox is free (no call claimed, posted or uncollected).
pub fn mailbox_idle(cpu: usize) -> bool {
    MAILBOXES
        .get(cpu)
        .is_some_and(|m| m.state.load(Ordering::Acquire) == IDLE)
}

/// Why a cross-CPU call could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The target CPU is not online.
    Offline,
}

/// Runs `function(argument)` on CPU `target` and returns its result. On the calling
/// CPU itself the function runs directly. Must be called with interrupts enabled or
/// from a context that may spin (the caller serves its own mailbox while waiting).
pub fn call_on(target: usize, function: CallFn, argument: u64) -> Result<u64, CallError> {
    if target == percpu::current_index() {
        return Ok(function(argument));
    }
    if !percpu::cpu(target).online() {
        return Err(CallError::Offline);
    }
    post(target, function, argument);
    Ok(collect(target))
}

/// Runs `function(argument)` on every online CPU in `targets` at once (the calling CPU
/// included, directly, if listed) and returns when all have finished; returns how many
/// ran it. All IPIs go out before any answer is awaited, so the targets work in parallel.
/// Mailboxes are claimed in ascending CPU order, so concurrent set calls cannot each
/// hold a mailbox the other waits for.
pub fn call_on_set(targets: impl Fn(usize) -> bool, function: CallFn, argument: u64) -> usize {
    let me = percpu::current_index();
    // Exactly the CPUs posted to are collected from, whatever comes online meanwhile.
    let mut posted = [0u64; MAX_CPUS / 64];
    for cpu in (0..MAX_CPUS).filter(|&c| c != me && targets(c) && percpu::cpu(c).online()) {
        post(cpu, function, argument);
        posted[cpu / 64] |= 1 << (cpu % 64);
    }
    let mut ran = 0;
    if targets(me) {
        function(argument);
        ran += 1;
    }
    for cpu in (0..MAX_CPUS).filter(|&c| posted[c / 64] & (1 << (c % 64)) != 0) {
        collect(cpu);
        ran += 1;
    }
    ran
}

/// Claims `target`'s mailbox, posts the call and sends the IPI.
fn post(target: usize, function: CallFn, argument: u64) {
    let mailbox = &MAILBOXES[target];
    crate::watchdog::spin_until("claiming another CPU's call mailbox", || {
        if mailbox
            .state
            .compare_exchange(IDLE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        serve_mailbox();
        false
    });
    mailbox.function.store(function as usize, Ordering::Relaxed);
    mailbox.argument.store(argument, Ordering::Relaxed);
    mailbox.state.store(POSTED, Ordering::Release);
    apic::send_ipi(percpu::cpu(target).apic_id(), CALL_VECTOR);
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

/// Waits for `target` to finish the posted call, frees its mailbox, returns the result.
/// A call still not taken (still `POSTED`) after `RESEND_AFTER_NS` gets its IPI again:
/// a lost IPI must not hang the caller — and with it every CPU waiting for a lock the
/// caller holds (a shootdown under an address space's layout lock). Sending it again is
/// harmless: the call is taken with a compare-exchange, so it runs once, and an IPI that
/// finds no posted call does nothing.
fn collect(target: usize) -> u64 {
    let mailbox = &MAILBOXES[target];
    let me = COLLECTING.get(percpu::current_index());
    let outer = me.map(|c| c.swap(target + 1, Ordering::Relaxed));
    let mut resend_at = crate::time::now_ns() + RESEND_AFTER_NS;
    crate::watchdog::spin_until("waiting for another CPU to answer a call", || {
        if mailbox.state.load(Ordering::Acquire) == DONE {
            return true;
        }
        serve_mailbox();
        let now = crate::time::now_ns();
        if now >= resend_at && mailbox.state.load(Ordering::Acquire) == POSTED {
            RESENDS.fetch_add(1, Ordering::Relaxed);
            apic::send_ipi(percpu::cpu(target).apic_id(), CALL_VECTOR);
            resend_at = now + RESEND_AFTER_NS;
        }
        false
    });
    if let (Some(c), Some(o)) = (me, outer) {
        c.store(o, Ordering::Relaxed);
    }
    let result = mailbox.result.load(Ordering::Relaxed);
    mailbox.state.store(IDLE, Ordering::Release);
    result
}

/// Per CPU: the CPU whose answer it is waiting for in `collect` (index + 1; 0: none).
static COLLECTING: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

fn state_name(state: u8) -> &'static str {
    match state {
        IDLE => "idle",
        CLAIMED => "claimed",
        POSTED => "posted, not taken",
        RUNNING => "running",
        DONE => "done, not collected",
        _ => "?",
    }
}

/// CPU `cpu`'s part of the watchdog's report: its call mailbox, and whose answer it
/// waits for (a call that is never taken shows as `posted, not taken` on the target).
pub fn write_state(w: &mut dyn core::fmt::Write, cpu: usize) -> core::fmt::Result {
    let Some(mailbox) = MAILBOXES.get(cpu) else {
        return Ok(());
    };
    write!(
        w,
        "  call mailbox: {}",
        state_name(mailbox.state.load(Ordering::Relaxed))
    )?;
    match COLLECTING[cpu].load(Ordering::Relaxed) {
        0 => writeln!(w),
        t => writeln!(
            w,
            "; waiting for cpu{}'s answer (its mailbox: {})",
            t - 1,
            MAILBOXES
                .get(t - 1)
                .map_or("?", |m| state_name(m.state.load(Ordering::Relaxed)))
        ),
    }
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
