//! Running user code: `run` enters ring 3 with a thread's registers and returns at its
//! next trap — a `syscall`, an exception, or an interrupt — with the registers saved.
//!
//! This is what lets a thread be a future: the executor's task calls `run`, and when it
//! returns, the task handles the trap on the CPU's own kernel stack, awaiting whatever
//! it must, holding no stack of its own in between.
//!
//! Mechanism: `panda_run_user` pushes the kernel's callee-saved registers, saves RSP
//! and the context pointer in the per-CPU block, points TSS.RSP0 just below them, builds
//! an `iretq` frame from the context, loads its registers, `swapgs`, `iretq`. The
//! `syscall` entry (`LSTAR`) swaps GS back, switches to the saved kernel RSP, stores the
//! user registers into the context and returns from `panda_run_user` with 0. A trap
//! from ring 3 arrives through the normal trap stubs on the TSS.RSP0 stack (so below the
//! saved frame); the dispatcher runs the vector's handler if it has one (interrupts are
//! acknowledged), copies the frame into the context and calls `exit_from_trap` (registered with
//! `trap::set_user_exit`, as `trap` lies below this module), which
//! returns from `panda_run_user` with 1 + vector. Both exits re-enable interrupts.
//!
//! Nothing of the kernel leaks to user mode: every general register is loaded from the
//! context before `iretq`, and RFLAGS is sanitised (IF on, IOPL 0, no TF/NT/AC).
//! x87/SSE state travels with the context (FXSAVE/FXRSTOR around each run; the kernel
//! is built without SSE, so it never touches those registers in between).

use core::arch::global_asm;
use core::sync::atomic::Ordering;

pub use panda_abi::Access;

use crate::addr::UserAddr;
use x86_64::registers::model_specific::{Efer, EferFlags, LStar, SFMask, Star};
use x86_64::registers::rflags::RFlags;
use x86_64::VirtAddr;

use crate::gdt::{KERNEL_CS, KERNEL_DS, USER_CS, USER_DS};
use crate::percpu::{
    OFFSET_TSS_RSP0, OFFSET_USER_CONTEXT, OFFSET_USER_KERNEL_RSP, OFFSET_USER_SCRATCH,
};
use crate::trap::TrapFrame;

/// The x87/SSE state of a thread, in FXSAVE format, and which saved snapshot it is.
///
/// Every save (`run`, after the thread's trap) gives the state a snapshot number that
/// no other save on any CPU uses, and the CPU remembers the number whose contents its
/// registers hold. The next `run` of a state with that number on that CPU skips the
/// restore (FXRSTOR: a few hundred nanoseconds under QEMU's TCG, tens of cycles on
/// hardware, on every fault and system call), as Linux does on a return to the task
/// whose registers are still loaded. The fields are private, so the area is never
/// changed without its number: a copy carries both (same contents, same number), the
/// initial state has number 0, which no save gives and `run` always restores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct FpuState {
    area: [u8; 512],
    snapshot: u64,
}

impl Default for FpuState {
    /// The state after FNINIT with SSE exceptions masked: FCW 0x037f, MXCSR 0x1f80.
    fn default() -> Self {
        let mut area = [0u8; 512];
        area[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        Self { area, snapshot: 0 }
    }
}

/// A user thread's registers, and after a trap, what the trap was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UserContext {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    /// After a trap exit: the vector, error code and CR2 (page faults).
    pub vector: u64,
    pub error_code: u64,
    pub cr2: u64,
    /// The thread's FS base (thread-local storage), loaded into `IA32_FS_BASE` before
    /// each run. Must be a canonical lower-half address (the system call that sets it
    /// checks).
    pub fs_base: u64,
    /// x87/SSE registers: restored before entering user mode and saved at every exit,
    /// so threads sharing a CPU keep their own (the kernel itself uses no SSE).
    pub fpu: FpuState,
}

/// Why `run` returned, decoded: the kernel above never looks at vector numbers or
/// error-code bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The thread executed `syscall`; `rax` and the argument registers hold the call.
    Syscall,
    /// A page fault at `addr` (CR2, as the CPU reported it) by an access of kind
    /// `access`; `at` is that address as a `UserAddr` when it lies in the user half
    /// (`None`: the thread touched the kernel half or the non-canonical hole).
    PageFault {
        addr: u64,
        at: Option<UserAddr>,
        access: Access,
    },
    /// Any other exception (vector < 32): the thread did something it may not.
    Exception { vector: u8, error_code: u64 },
    /// An interrupt (vector >= 32: the timer tick, an IPI) ended the run early.
    Interrupt { vector: u8 },
}

impl Exit {
    /// Decodes a trap exit from its vector and the saved error code and CR2.
    fn from_trap(vector: u8, error_code: u64, cr2: u64) -> Self {
        match vector {
            14 => Exit::PageFault {
                addr: cr2,
                at: UserAddr::new(cr2),
                access: if error_code & 0x10 != 0 {
                    Access::Execute
                } else if error_code & 0x2 != 0 {
                    Access::Write
                } else {
                    Access::Read
                },
            },
            v if v >= 32 => Exit::Interrupt { vector: v },
            v => Exit::Exception {
                vector: v,
                error_code,
            },
        }
    }
}

global_asm!(
    r#"
    .section .text.user, "ax"
    .global panda_run_user
    panda_run_user:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    cli
    mov gs:[{ksave}], rsp
    mov gs:[{ctx}], rdi
    mov rax, gs:[{rsp0}]
    mov [rax], rsp
    push {uds}
    push qword ptr [rdi + 128]
    mov rax, qword ptr [rdi + 136]
    and rax, 0xcd5
    or rax, 0x202
    push rax
    push {ucs}
    push qword ptr [rdi + 120]
    mov rax, [rdi]
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 56]
    mov r9, [rdi + 64]
    mov r10, [rdi + 72]
    mov r11, [rdi + 80]
    mov r12, [rdi + 88]
    mov r13, [rdi + 96]
    mov r14, [rdi + 104]
    mov r15, [rdi + 112]
    mov rdi, [rdi + 40]
    swapgs
    iretq

    .global panda_syscall_entry
    panda_syscall_entry:
    swapgs
    mov gs:[{scratch}], rsp
    mov rsp, gs:[{ksave}]
    push rax
    mov rax, gs:[{ctx}]
    pop qword ptr [rax]
    mov [rax + 8], rbx
    mov [rax + 16], rcx
    mov [rax + 24], rdx
    mov [rax + 32], rsi
    mov [rax + 40], rdi
    mov [rax + 48], rbp
    mov [rax + 56], r8
    mov [rax + 64], r9
    mov [rax + 72], r10
    mov [rax + 80], r11
    mov [rax + 88], r12
    mov [rax + 96], r13
    mov [rax + 104], r14
    mov [rax + 112], r15
    mov [rax + 120], rcx
    mov [rax + 136], r11
    mov rcx, gs:[{scratch}]
    mov [rax + 128], rcx
    xor eax, eax
    jmp 2f

    .global panda_user_exit
    panda_user_exit:
    mov rax, rdi
    mov rsp, gs:[{ksave}]
    2:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    sti
    ret
    "#,
    ksave = const OFFSET_USER_KERNEL_RSP,
    ctx = const OFFSET_USER_CONTEXT,
    scratch = const OFFSET_USER_SCRATCH,
    rsp0 = const OFFSET_TSS_RSP0,
    uds = const USER_DS as u64,
    ucs = const USER_CS as u64,
);

unsafe extern "C" {
    fn panda_run_user(ctx: *mut UserContext) -> u64;
    fn panda_syscall_entry();
    fn panda_user_exit(code: u64) -> !;
}

/// Enables `syscall` on the calling CPU: EFER.SCE, STAR, LSTAR and SFMASK (interrupts,
/// traps, direction and alignment check are cleared on entry), and registers
/// `exit_from_trap` with the trap dispatcher (the first CPU's registration stays).
pub fn init_cpu() {
    crate::trap::set_user_exit(exit_from_trap);
    // SAFETY: the selectors are this GDT's (kernel code/data, user data/code in the
    // order sysret expects) and the entry is `panda_syscall_entry`, which switches to
    // the kernel stack before touching memory.
    unsafe {
        Efer::update(|e| e.insert(EferFlags::SYSTEM_CALL_EXTENSIONS));
        let _ = Star::write(
            x86_64::structures::gdt::SegmentSelector(USER_CS),
            x86_64::structures::gdt::SegmentSelector(USER_DS),
            x86_64::structures::gdt::SegmentSelector(KERNEL_CS),
            x86_64::structures::gdt::SegmentSelector(KERNEL_DS),
        );
        LStar::write(VirtAddr::new(panda_syscall_entry as *const () as u64));
    }
    SFMask::write(
        RFlags::INTERRUPT_FLAG
            | RFlags::TRAP_FLAG
            | RFlags::DIRECTION_FLAG
            | RFlags::ALIGNMENT_CHECK
            | RFlags::NESTED_TASK
            | RFlags::IOPL_HIGH
            | RFlags::IOPL_LOW,
    );
}

/// Runs user code with `ctx` until its next trap, on the current address space.
/// Call with interrupts enabled, from kernel code that may be suspended for as long as
/// the user code runs (a task on this CPU's executor).
pub fn run(ctx: &mut UserContext) -> Exit {
    load_fs_base(ctx.fs_base);
    // The task cannot move to another CPU inside this function (it does not await), so
    // `cpu` stays the running CPU from the restore to the save.
    let cpu = crate::percpu::current();
    let loaded = cpu.map_or(0, |c| c.fpu_loaded.load(Ordering::Relaxed));
    if ctx.fpu.snapshot == 0 || ctx.fpu.snapshot != loaded {
        // SAFETY: `ctx.fpu.area` is a 16-byte-aligned 512-byte FXSAVE area; loading it
        // only changes x87/SSE registers, which no kernel code holds values in (the
        // kernel is built without SSE; the zeroing loops preserve the xmm0 they use).
        unsafe {
            core::arch::asm!("fxrstor64 [{}]", in(reg) &ctx.fpu.area, options(nostack, readonly))
        };
    }
    // SAFETY: `ctx` stays borrowed for the whole call, so the exit paths may write it;
    // the assembly saves and restores every callee-saved register and returns on this
    // stack; user mode cannot reach kernel memory (no USER bit on kernel mappings).
    let code = unsafe { panda_run_user(ctx) };
    // SAFETY: `ctx.fpu.area` is a 16-byte-aligned 512-byte FXSAVE area this function
    // borrows mutably; storing into it touches nothing else. The exit paths never touch
    // x87/SSE state (nor does any kernel code but the zeroing loop, which gives xmm0
    // back), so what is saved is the thread's.
    unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) &mut ctx.fpu.area, options(nostack)) };
    // The registers and the area now hold the same state: number it, and remember the
    // number as this CPU's.
    if let Some(c) = cpu {
        let snapshot = c.next_fpu_snapshot();
        ctx.fpu.snapshot = snapshot;
        c.fpu_loaded.store(snapshot, Ordering::Relaxed);
    }
    if code == 0 {
        Exit::Syscall
    } else {
        Exit::from_trap((code - 1) as u8, ctx.error_code, ctx.cr2)
    }
}

/// Whether `base` may be a thread's FS base: canonical and in the lower half.
pub fn valid_fs_base(base: u64) -> bool {
    base < crate::USER_END
}

/// Loads the thread's FS base, on every entry to user mode. It is not skipped when the
/// CPU seems to hold the value already: user code can change the FS base without the
/// kernel seeing it (`mov fs, <selector>` loads the descriptor's base), so a skipped
/// load once let one thread — of any process — run another with FS base 0 (the user
/// test `a_segment_load_cannot_change_another_threads_fs_base`). The GS base needs no
/// such care: user mode can only ever set it to 0, which every thread has.
fn load_fs_base(base: u64) {
    let base = if valid_fs_base(base) { base } else { 0 };
    // SAFETY: IA32_FS_BASE only sets the FS segment base, which the kernel does not
    // use; `base` is canonical (checked above), so the write cannot fault.
    unsafe { x86_64::registers::model_specific::Msr::new(0xc000_0100).write(base) };
}

/// Called by the trap dispatcher (registered by `init_cpu`) for a trap from ring 3, after the vector's handler
/// (if any) ran: saves the user registers into the running context and returns from
/// `run` with the vector. Never returns here.
fn exit_from_trap(frame: &TrapFrame) -> ! {
    let cpu = crate::percpu::checked_index().map(crate::percpu::cpu);
    let ctx = cpu.map_or(0, |c| c.user_context_ptr());
    if ctx != 0 {
        let cr2 = if frame.vector == 14 {
            x86_64::registers::control::Cr2::read_raw()
        } else {
            0
        };
        let ctx = ctx as *mut UserContext;
        // SAFETY: `ctx` is the `&mut UserContext` that `run` holds for the call now
        // being ended; nothing else accesses it meanwhile. Only the fields the trap
        // saved are stored, each on its own: the FS base and the 512-byte x87/SSE area
        // stay as they are (the whole context used to be read and written back, about
        // 1.2 KiB of copying on every fault and interrupt).
        unsafe {
            (*ctx).rax = frame.rax;
            (*ctx).rbx = frame.rbx;
            (*ctx).rcx = frame.rcx;
            (*ctx).rdx = frame.rdx;
            (*ctx).rsi = frame.rsi;
            (*ctx).rdi = frame.rdi;
            (*ctx).rbp = frame.rbp;
            (*ctx).r8 = frame.r8;
            (*ctx).r9 = frame.r9;
            (*ctx).r10 = frame.r10;
            (*ctx).r11 = frame.r11;
            (*ctx).r12 = frame.r12;
            (*ctx).r13 = frame.r13;
            (*ctx).r14 = frame.r14;
            (*ctx).r15 = frame.r15;
            (*ctx).rip = frame.rip;
            (*ctx).rsp = frame.rsp;
            (*ctx).rflags = frame.rflags;
            (*ctx).vector = frame.vector;
            (*ctx).error_code = frame.error_code;
            (*ctx).cr2 = cr2;
        }
    }
    // SAFETY: the saved kernel RSP points at `panda_run_user`'s frame on this CPU's
    // stack, which is intact: the trap frame lies below it and is no longer needed.
    unsafe { panda_user_exit(1 + frame.vector) }
}
