//! Trap entry: one stub per vector, one common path, one `TrapFrame`.
//!
//! The 256 stubs are laid out 16 bytes apart from `trap_stubs`; each pushes a zero
//! error code when the CPU does not push one, then its vector, and jumps to
//! `trap_common`. That path swaps GS and clears RFLAGS.AC (which user code can set,
//! and which would turn SMAP off in the kernel) when the trap came from ring 3, saves all general
//! registers so the stack holds a complete `TrapFrame`, calls `panda_trap_dispatch`
//! with it, restores it (including any change the handler made) and returns with
//! `iretq`. A trap from ring 3 ends in the exit that `user` registers (`set_user_exit`).
//!
//! Dispatch order for a vector: an exception-table fixup (a probe in `probe` that was
//! allowed to fault), then a handler registered with `set_handler`, and otherwise the
//! fatal path: a report with vector, error code, CR2, RIP, RSP and a frame-pointer
//! backtrace, then the fatal hook (the kernel stops the machine with failure status).

use core::arch::global_asm;
use core::fmt::{self, Write};

use crossbeam_utils::atomic::AtomicCell;

use x86_64::registers::control::Cr2;

/// The saved state of a trapped context, lowest address first.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Whether the trap interrupted ring 3.
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

const STUB_STRIDE: u64 = 16;

global_asm!(
    r#"
    .section .text.trap, "ax"
    .balign 16
    .global trap_stubs
    trap_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .set has_error, (vec == 8) + (vec == 10) + (vec == 11) + (vec == 12) + (vec == 13) + (vec == 14) + (vec == 17) + (vec == 21) + (vec == 29) + (vec == 30)
    .if has_error == 0
    push 0
    .endif
    push vec
    jmp trap_common
    .set vec, vec + 1
    .endr

    trap_common:
    test qword ptr [rsp + 24], 3
    jz 1f
    swapgs
    // From ring 3: clear RFLAGS.AC. User code may set it (popfq) and the CPU keeps it
    // on an interrupt or exception; with AC set, SMAP lets the kernel's accesses reach
    // user pages. `clac` where the CPU has SMAP (elsewhere it is #UD), else popfq.
    cmp byte ptr [rip + {clac_ok}], 0
    je 3f
    clac
    jmp 1f
    3:
    pushfq
    and dword ptr [rsp], -0x40001
    popfq
    1:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call panda_trap_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    test qword ptr [rsp + 24], 3
    jz 2f
    swapgs
    2:
    add rsp, 16
    iretq
    "#,
    clac_ok = sym crate::cpu::CLAC_OK,
);

unsafe extern "C" {
    static trap_stubs: u8;
}

/// Address of the entry stub for `vector`.
pub fn stub_address(vector: u8) -> u64 {
    let base = &raw const trap_stubs as u64;
    base + vector as u64 * STUB_STRIDE
}

/// A handler for one vector. It may change the frame (e.g. RIP) before it is restored.
pub type Handler = fn(&mut TrapFrame);

/// What the fatal path calls after its report; it must not return.
pub type FatalHook = fn() -> !;

// The handlers are read in trap and NMI context, where a lock could be held by the
// interrupted code: `AtomicCell` must be a plain atomic for these types (an
// `Option<fn>` is one pointer, null for `None`), never its lock-striped fallback.
const _: () = assert!(AtomicCell::<Option<Handler>>::is_lock_free());
const _: () = assert!(AtomicCell::<Option<FatalHook>>::is_lock_free());

static HANDLERS: [AtomicCell<Option<Handler>>; 256] = [const { AtomicCell::new(None) }; 256];
static FATAL_HOOK: AtomicCell<Option<FatalHook>> = AtomicCell::new(None);

/// Ends a trap from ring 3 once the vector's handler (if any) ran: saves the user
/// registers and returns from `user::run`. Never returns.
pub(crate) type UserExit = fn(&TrapFrame) -> !;

/// The one `UserExit`, registered by `user` (the layer above this one) before any user
/// code runs. `Once::get` is one atomic load: fine in trap and NMI context.
static USER_EXIT: spin::Once<UserExit> = spin::Once::new();

/// Registers what ends traps from ring 3 (`user::init_cpu` does, on every CPU; the
/// first registration stays).
pub(crate) fn set_user_exit(exit: UserExit) {
    USER_EXIT.call_once(|| exit);
}

/// Routes `vector` to `handler` on every CPU.
pub fn set_handler(vector: u8, handler: Handler) {
    HANDLERS[vector as usize].store(Some(handler));
}

/// Removes the handler of `vector`; the vector becomes fatal again.
pub fn clear_handler(vector: u8) {
    HANDLERS[vector as usize].store(None);
}

/// Called after an unexpected trap has been reported; it must not return. The kernel
/// installs one that stops every CPU and exits with failure.
pub fn set_fatal_hook(hook: FatalHook) {
    FATAL_HOOK.store(Some(hook));
}

/// Short mnemonic and name of an exception vector.
pub fn exception_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point"),
        20 => ("#VE", "virtualization"),
        21 => ("#CP", "control protection"),
        28 => ("#HV", "hypervisor injection"),
        29 => ("#VC", "VMM communication"),
        30 => ("#SX", "security"),
        9 | 15 | 22..=27 | 31 => ("#??", "reserved exception"),
        _ => ("IRQ", "interrupt"),
    }
}

#[unsafe(no_mangle)]
extern "C" fn panda_trap_dispatch(frame: &mut TrapFrame) {
    if frame.from_user() {
        // Interrupts (and NMIs) still get their handler, which acknowledges them;
        // exceptions belong to the thread. Either way the thread's `run` returns.
        if frame.vector >= 32 || frame.vector == 2 {
            if let Some(handler) = HANDLERS[frame.vector as usize].load() {
                handler(frame);
            }
        }
        match USER_EXIT.get() {
            Some(exit) => exit(frame),
            // No user code can run before `user` registered its exit.
            None => fatal(frame),
        }
    }
    if frame.vector < 32 {
        if let Some(resume) = crate::probe::fixup(frame.vector, frame.error_code, frame.rip) {
            frame.rip = resume.rip;
            frame.rsp += resume.pop;
            frame.rax = resume.rax;
            frame.r8 = resume.r8;
            frame.r9 = resume.r9;
            return;
        }
    }
    if let Some(handler) = HANDLERS[frame.vector as usize].load() {
        handler(frame);
        return;
    }
    fatal(frame)
}

/// Writes the report of an unexpected trap.
pub fn write_report(w: &mut dyn Write, frame: &TrapFrame, cr2: u64) -> fmt::Result {
    let (mnemonic, name) = exception_name(frame.vector);
    writeln!(
        w,
        "EXCEPTION {mnemonic} ({name}, vector {}) on cpu{} in {} mode: error=0x{:x} cr2=0x{:x} rip=0x{:x} rsp=0x{:x} rflags=0x{:x}",
        frame.vector,
        crate::percpu::checked_index().unwrap_or(usize::MAX),
        if frame.from_user() { "user" } else { "kernel" },
        frame.error_code,
        cr2,
        frame.rip,
        frame.rsp,
        frame.rflags
    )?;
    write_registers(w, frame)?;
    if frame.vector == 14 {
        let e = frame.error_code;
        writeln!(
            w,
            "  page fault: {} {} in {} mode{}",
            if e & 1 != 0 {
                "protection violation on"
            } else {
                "not-present page at"
            },
            if e & 0x10 != 0 {
                "instruction fetch"
            } else if e & 2 != 0 {
                "write"
            } else {
                "read"
            },
            if e & 4 != 0 { "user" } else { "supervisor" },
            if e & 8 != 0 {
                " (reserved bit set)"
            } else {
                ""
            }
        )?;
    }
    let names = ["kernel", "double-fault", "NMI", "machine-check"];
    let guards =
        crate::percpu::checked_index().map_or([0; 4], |i| crate::percpu::cpu(i).stack_guards());
    for (guard, name) in guards.into_iter().zip(names) {
        let hit = |a: u64| (guard..guard + crate::PAGE_SIZE).contains(&a);
        if guard != 0 && (hit(cr2) || hit(frame.rsp)) {
            writeln!(
                w,
                "  stack overflow: the {name} stack ran into its guard page at 0x{guard:x}"
            )?;
        }
    }
    crate::backtrace::write(w, frame.rip, frame.rbp)
}

/// Writes every general register of `frame`, four to a line (RIP, RSP and RFLAGS are
/// the caller's header's).
pub fn write_registers(w: &mut dyn Write, frame: &TrapFrame) -> fmt::Result {
    writeln!(
        w,
        "  rax={:016x} rbx={:016x} rcx={:016x} rdx={:016x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx
    )?;
    writeln!(
        w,
        "  rsi={:016x} rdi={:016x} rbp={:016x} r8 ={:016x}",
        frame.rsi, frame.rdi, frame.rbp, frame.r8
    )?;
    writeln!(
        w,
        "  r9 ={:016x} r10={:016x} r11={:016x} r12={:016x}",
        frame.r9, frame.r10, frame.r11, frame.r12
    )?;
    writeln!(
        w,
        "  r13={:016x} r14={:016x} r15={:016x}",
        frame.r13, frame.r14, frame.r15
    )
}

fn fatal(frame: &TrapFrame) -> ! {
    let cr2 = Cr2::read_raw();
    crate::serial::emergency(|w| {
        let _ = write_report(w, frame, cr2);
    });
    if let Some(hook) = FATAL_HOOK.load() {
        hook()
    }
    crate::power::exit(false)
}
