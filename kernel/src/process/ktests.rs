//! In-kernel tests of ring 3 and processes: user-mode round trips, per-thread SSE state, system calls, faults awaiting the zeroing task. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use panda_arch::percpu;
use panda_platform::frame;

use crate::aspace::AddressSpace;
use crate::ktest::support::{
    async_tests, cpu_id, empty_pool, ensure, executor, fail, keep_busy, tests, AsyncTest, Failure,
    Outcome, Test,
};
use panda_mm::region::Rights;

pub(crate) const TESTS: &[Test] = tests![process_abandoned_event_waits_leave_no_waker];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![
    user_mode_round_trips,
    user_sse_state_is_per_thread,
    user_process_syscalls_faults_and_exit,
    user_fault_awaits_the_zeroing_task,
    user_alignment_check_flag_never_reaches_the_kernel
];

/// Runs user code until a syscall or an exception: interrupts that end a run early
/// (the timer tick, IPIs) just resume it, as a scheduler would.
fn run_past_interrupts(ctx: &mut panda_arch::user::UserContext) -> panda_arch::user::Exit {
    use panda_arch::user::{run, Exit};
    loop {
        match run(ctx) {
            Exit::Interrupt { .. } => continue,
            exit => return exit,
        }
    }
}

/// Enters ring 3 on a tiny program and checks each way back: `syscall`, a page fault,
/// an invalid opcode, and a timer interrupt while the program spins.
async fn user_mode_round_trips() -> Outcome {
    use panda_arch::user::{self, Exit, UserContext};
    let base = panda_abi::ELF_LOAD_BASE as u64;
    #[rustfmt::skip]
    let code: [u8; 21] = [
        0x48, 0xc7, 0xc0, 0x34, 0x12, 0x00, 0x00, // mov rax, 0x1234
        0x0f, 0x05,                               // syscall
        0x48, 0x8b, 0x1c, 0x25, 0, 0, 0, 0,       // mov rbx, [0]
        0x0f, 0x0b,                               // ud2
        0xeb, 0xfe,                               // jmp $
    ];
    let space = space_from_code(&code)?;
    space.activate();
    let mut ctx = UserContext {
        rip: base,
        rsp: panda_abi::INITIAL_STACK_POINTER as u64,
        rbx: 0x5555,
        r12: 0x1212,
        ..UserContext::default()
    };
    let result = (|| -> Outcome {
        let first = run_past_interrupts(&mut ctx);
        ensure!(
            first == Exit::Syscall,
            "first exit {first:?}, expected the syscall"
        );
        ensure!(
            ctx.rax == 0x1234 && ctx.rip == base + 9,
            "after syscall rax={:#x} rip={:#x}",
            ctx.rax,
            ctx.rip
        );
        ensure!(
            ctx.rbx == 0x5555 && ctx.r12 == 0x1212,
            "user registers not preserved: rbx={:#x} r12={:#x}",
            ctx.rbx,
            ctx.r12
        );
        ensure!(ctx.rflags & 0x200 != 0, "user code ran with interrupts off");
        let second = run_past_interrupts(&mut ctx);
        ensure!(
            matches!(second, Exit::PageFault { addr: 0, .. }),
            "second exit {second:?}, expected #PF"
        );
        ensure!(
            ctx.cr2 == 0 && ctx.rip == base + 9 && ctx.error_code & 4 != 0,
            "page fault: cr2={:#x} rip={:#x} err={:#x}",
            ctx.cr2,
            ctx.rip,
            ctx.error_code
        );
        ctx.rip += 8;
        let third = run_past_interrupts(&mut ctx);
        ensure!(
            matches!(third, Exit::Exception { vector: 6, .. }) && ctx.rip == base + 17,
            "third exit {third:?} at {:#x}, expected #UD",
            ctx.rip
        );
        ctx.rip += 2;
        let fourth = user::run(&mut ctx);
        ensure!(
            fourth
                == (Exit::Interrupt {
                    vector: panda_arch::apic::TIMER_VECTOR
                })
                && ctx.rip == base + 19,
            "spinning program left with {fourth:?} at {:#x}, expected the timer interrupt",
            ctx.rip
        );
        ensure!(
            x86_64::instructions::interrupts::are_enabled(),
            "interrupts off after returning from user mode"
        );
        Ok(())
    })();
    space.deactivate();
    result
}

/// Two threads on one CPU each leave a value in xmm0; each must find its own when it
/// runs again.
async fn user_sse_state_is_per_thread() -> Outcome {
    use panda_arch::user::{Exit, UserContext};
    let base = panda_abi::ELF_LOAD_BASE as u64;
    #[rustfmt::skip]
    let code: [u8; 14] = [
        0x66, 0x48, 0x0f, 0x6e, 0xc0, // movq xmm0, rax
        0x0f, 0x05,                   // syscall
        0x66, 0x48, 0x0f, 0x7e, 0xc0, // movq rax, xmm0
        0x0f, 0x05,                   // syscall
    ];
    let space = space_from_code(&code)?;
    space.activate();
    let thread = |rax| UserContext {
        rip: base,
        rax,
        ..UserContext::default()
    };
    let (mut a, mut b) = (thread(0xaaaa_aaaa), thread(0xbbbb_bbbb));
    let result = (|| -> Outcome {
        for ctx in [&mut a, &mut b] {
            ensure!(run_past_interrupts(ctx) == Exit::Syscall, "first syscall");
        }
        for (ctx, want) in [(&mut a, 0xaaaa_aaaa), (&mut b, 0xbbbb_bbbb)] {
            ctx.rax = 0;
            ensure!(run_past_interrupts(ctx) == Exit::Syscall, "second syscall");
            ensure!(
                ctx.rax == want,
                "xmm0 held {:#x}, expected {want:#x}: SSE state leaked between threads",
                ctx.rax
            );
        }
        Ok(())
    })();
    space.deactivate();
    result
}

/// The first user program (source in the comment of `user_process_syscalls_faults_and_exit`).
const PROGRAM: [u8; 142] = [
    0x48, 0x8d, 0x3d, 0x76, 0x00, 0x00, 0x00, 0xbe, 0x11, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x03,
    0x00, 0x0f, 0x05, 0xb8, 0x04, 0x00, 0x02, 0x00, 0x31, 0xff, 0x0f, 0x05, 0x48, 0x89, 0xc3, 0x48,
    0x8d, 0xb8, 0x00, 0x20, 0x00, 0x00, 0xb8, 0x04, 0x00, 0x02, 0x00, 0x0f, 0x05, 0x48, 0xc7, 0x83,
    0x00, 0x10, 0x00, 0x00, 0x2a, 0x00, 0x00, 0x00, 0x48, 0x8b, 0xbb, 0x00, 0x10, 0x00, 0x00, 0xb8,
    0x99, 0x99, 0x09, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xf8, 0xfb, 0x75, 0x25, 0x48, 0xc7, 0xc6, 0xad,
    0xde, 0x00, 0x00, 0x57, 0x48, 0x89, 0xf7, 0xbe, 0x04, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x03,
    0x00, 0x0f, 0x05, 0x5f, 0x48, 0x83, 0xf8, 0xfc, 0x75, 0x07, 0xb8, 0x01, 0x00, 0x02, 0x00, 0x0f,
    0x05, 0xbf, 0x63, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x02, 0x00, 0x0f, 0x05, 0x68, 0x65, 0x6c,
    0x6c, 0x6f, 0x20, 0x66, 0x72, 0x6f, 0x6d, 0x20, 0x72, 0x69, 0x6e, 0x67, 0x20, 0x33,
];

/// A user space whose one page of code, at ELF_LOAD_BASE (read and execute), holds
/// `code`; the rest of its regions are as every space's.
fn space_from_code(code: &[u8]) -> Result<alloc::sync::Arc<AddressSpace>, Failure> {
    let base = panda_abi::ELF_LOAD_BASE as u64;
    let frame = frame::alloc_user_zeroed()
        .ok_or_else(|| fail(format_args!("no frame")))?
        .fill(0, code);
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let rx = Rights {
        write: false,
        execute: true,
    };
    space
        .add_segment(base, base + 0x1000, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    space
        .map_filled(base, frame, rx)
        .map_err(|e| fail(format_args!("{e:?}")))?;
    Ok(space)
}

/// A process running `code` (as `space_from_code` places it).
fn process_from_code(code: &[u8]) -> Result<alloc::sync::Arc<crate::process::Process>, Failure> {
    Ok(crate::process::Process::new(space_from_code(code)?))
}

/// A user program (assembled from scripts-free source kept in the comment below) logs,
/// grows its heap with brk, writes and reads a fresh heap page (a demand fault), pushes
/// on its demand-paged stack, checks that an unknown operation returns
/// UnknownOperation and a bad pointer BadAddress, and exits with the value it read
/// (42). A second program writes to its own code and must be killed. Both run as
/// executor tasks that may migrate between CPUs; afterwards every frame is back.
///
/// Source of the first program (GNU as, Intel syntax): lea rdi,[rip+msg]; mov esi,17;
/// mov eax,0x30001; syscall; mov eax,0x20004; xor edi,edi; syscall; mov rbx,rax;
/// lea rdi,[rax+0x2000]; mov eax,0x20004; syscall; mov qword ptr [rbx+0x1000],42;
/// mov rdi,[rbx+0x1000]; mov eax,0x99999; syscall; cmp rax,-5; jne 1f;
/// mov rsi,0xdead; push rdi; mov rdi,rsi; mov esi,4; mov eax,0x30001; syscall; pop rdi;
/// cmp rax,-4; jne 1f; mov eax,0x20001; syscall; 1: mov edi,99; mov eax,0x20001;
/// syscall; msg: .ascii "hello from ring 3". Second: lea rax,[rip+_start];
/// mov qword ptr [rax],1; mov edi,7; mov eax,0x20001; syscall.
async fn user_process_syscalls_faults_and_exit() -> Outcome {
    const WRITES_ITS_CODE: [u8; 26] = [
        0x48, 0x8d, 0x05, 0xf9, 0xff, 0xff, 0xff, 0x48, 0xc7, 0x00, 0x01, 0x00, 0x00, 0x00, 0xbf,
        0x07, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x02, 0x00, 0x0f, 0x05,
    ];
    let exec = executor()?;
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let start = |process: alloc::sync::Arc<crate::process::Process>| {
        let ctx = panda_arch::user::UserContext {
            rip: panda_abi::ELF_LOAD_BASE as u64,
            rsp: panda_abi::INITIAL_STACK_POINTER as u64,
            ..Default::default()
        };
        exec.spawn(crate::process::run_thread(process, ctx))
    };
    let good = start(process_from_code(&PROGRAM)?).await;
    let bad = start(process_from_code(&WRITES_ITS_CODE)?).await;
    // A finished task's own allocation (its future, a frame run when it exceeds the
    // slab sizes) is released by its CPU just after the join handle is completed:
    // wait for that (up to 10 s: that CPU's vCPU may be off the host for a while)
    // before comparing.
    let mut now = crate::memory::frames_not_in_use();
    let deadline = panda_arch::time::now_ns() + 10_000_000_000;
    while now != baseline && panda_arch::time::now_ns() < deadline {
        exec.sleep(1_000_000).await;
        now = crate::memory::frames_not_in_use();
    }
    ensure!(
        good == 42,
        "the program exited with {good}, expected 42 (99: a syscall result was wrong)"
    );
    ensure!(
        bad == crate::process::KILLED,
        "writing its own code ended with {bad}, expected the kill status"
    );
    ensure!(
        now == baseline,
        "{now} frames after both processes ended, baseline {baseline}"
    );
    Ok(())
}

/// With this CPU's zeroed pool empty and other work queued on it, a user fault must
/// await the CPU's zeroing task — the other work runs meanwhile — and resume once the
/// task's refill wakes it.
async fn user_fault_awaits_the_zeroing_task() -> Outcome {
    use core::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    static SPINS: AtomicU64 = AtomicU64::new(0);
    let exec = executor()?;
    let me = panda_platform::cpu::current();
    // The executor numbers CPUs with plain indices.
    let cpu = me.index();
    let before = crate::aspace::stat(crate::aspace::Stat::PoolWaits);
    let process = process_from_code(&PROGRAM)?;
    // Other work for this CPU: a task that yields until told to stop (so the CPU never
    // idles, and idle-time zeroing cannot refill the pool behind the test's back). And
    // the same on every other CPU: an idle CPU would top this CPU's pool up.
    STOP.store(false, Ordering::SeqCst);
    SPINS.store(0, Ordering::SeqCst);
    let busy = keep_busy(me, &STOP, &SPINS)?;
    static OTHER_SPINS: [AtomicU64; percpu::MAX_CPUS] =
        [const { AtomicU64::new(0) }; percpu::MAX_CPUS];
    let others = (0..exec.cpu_count())
        .filter(|&c| c != cpu)
        .map(|c| {
            OTHER_SPINS[c].store(0, Ordering::SeqCst);
            keep_busy(cpu_id(c)?, &STOP, &OTHER_SPINS[c])
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Every other CPU is busy before the pool is emptied: at -smp 64 on a small host a
    // CPU whose task has not started yet is idle and tops the pool up again.
    let deadline = panda_arch::time::now_ns() + 20_000_000_000;
    while (0..exec.cpu_count()).any(|c| c != cpu && OTHER_SPINS[c].load(Ordering::Relaxed) == 0)
        && panda_arch::time::now_ns() < deadline
    {
        exec.sleep(1_000_000).await;
    }
    // Empty it twice: a top-up that was under way when the others got busy lands
    // within a tick.
    for _ in 0..2 {
        empty_pool(me);
        exec.sleep(20_000_000).await;
    }
    empty_pool(me);
    let ctx = panda_arch::user::UserContext {
        rip: panda_abi::ELF_LOAD_BASE as u64,
        rsp: panda_abi::INITIAL_STACK_POINTER as u64,
        ..Default::default()
    };
    let thread = exec.spawn_pinned(me, crate::process::run_thread(process, ctx));
    let deadline = panda_arch::time::now_ns() + 20_000_000_000;
    while !thread.is_finished() && panda_arch::time::now_ns() < deadline {
        exec.sleep(1_000_000).await;
    }
    STOP.store(true, Ordering::SeqCst);
    busy.await;
    for other in others {
        other.await;
    }
    ensure!(
        thread.is_finished(),
        "the thread never resumed from its fault (20 s)"
    );
    let status = thread.await;
    let awaited = crate::aspace::stat(crate::aspace::Stat::PoolWaits) - before;
    ensure!(status == 42, "the program exited with {status}");
    ensure!(awaited >= 1, "no fault awaited the zeroing task");
    ensure!(
        SPINS.load(Ordering::Relaxed) > 0,
        "the other task did not run"
    );
    Ok(())
}

/// RFLAGS.AC set by user code (`popfq`) must not survive into the kernel on a page
/// fault, an exception or an interrupt: with AC set, SMAP lets the kernel reach user
/// pages. A program sets AC before each of the three traps; after each, the kernel's
/// own RFLAGS must have AC clear (checked right where `run` returns, on the stack the
/// trap came back on), and the saved user RFLAGS must show AC was set (else the test
/// proves nothing). Without the entry stub's `clac` it fails at the first trap.
async fn user_alignment_check_flag_never_reaches_the_kernel() -> Outcome {
    use panda_arch::user::{self, Exit, UserContext};
    use x86_64::registers::rflags::{self, RFlags};
    let base = panda_abi::ELF_LOAD_BASE as u64;
    // pushfq; or dword ptr [rsp], 0x40000; popfq: sets AC.
    const SET_AC: [u8; 9] = [0x9c, 0x81, 0x0c, 0x24, 0x00, 0x00, 0x04, 0x00, 0x9d];
    let mut code = alloc::vec::Vec::new();
    code.extend_from_slice(&SET_AC); // 0x00
    code.extend_from_slice(&[0x48, 0x8b, 0x1c, 0x25, 0, 0, 0, 0]); // 0x09: mov rbx, [0]
    code.extend_from_slice(&SET_AC); // 0x11
    code.extend_from_slice(&[0x0f, 0x0b]); // 0x1a: ud2
    code.extend_from_slice(&SET_AC); // 0x1c
    code.extend_from_slice(&[0xeb, 0xfe]); // 0x25: jmp $
    let space = space_from_code(&code)?;
    space.activate();
    let mut ctx = UserContext {
        rip: base,
        rsp: panda_abi::INITIAL_STACK_POINTER as u64,
        ..UserContext::default()
    };
    let stack = panda_abi::STACK_BASE as u64..panda_abi::INITIAL_STACK_POINTER as u64;
    let (mut fault, mut ud, mut irq) = (false, false, false);
    let mut result = Ok(());
    for _ in 0..100_000 {
        let exit = user::run(&mut ctx);
        let kernel_ac = rflags::read().contains(RFlags::ALIGNMENT_CHECK);
        let user_ac = ctx.rflags & RFlags::ALIGNMENT_CHECK.bits() != 0;
        if kernel_ac {
            result = Err(fail(format_args!(
                "AC set in the kernel after {exit:?} at rip {:#x} (user RFLAGS {:#x})",
                ctx.rip, ctx.rflags
            )));
            break;
        }
        match exit {
            // The first push of the stack (AC not yet set).
            Exit::PageFault { addr, .. } if stack.contains(&addr) => {
                if let Err(e) = space
                    .handle_fault_async(
                        crate::ktest::support::user_addr(addr),
                        panda_mm::region::Access::Write,
                    )
                    .await
                {
                    result = Err(fail(format_args!("stack fault: {e:?}")));
                    break;
                }
            }
            Exit::PageFault { addr: 0, .. } if ctx.rip == base + 0x09 && user_ac => {
                fault = true;
                ctx.rip += 8;
            }
            Exit::Exception { vector: 6, .. } if ctx.rip == base + 0x1a && user_ac => {
                ud = true;
                ctx.rip += 2;
            }
            Exit::Interrupt { .. } if ctx.rip == base + 0x25 && user_ac => {
                irq = true;
                break;
            }
            // An interrupt between setting AC and the trap: the return to ring 3 clears
            // AC (user RFLAGS are sanitised, arch/src/user.rs), so the trap came without
            // it. Set it again and retry that step.
            Exit::PageFault { addr: 0, .. } if ctx.rip == base + 0x09 => ctx.rip = base,
            Exit::Exception { vector: 6, .. } if ctx.rip == base + 0x1a => ctx.rip = base + 0x11,
            Exit::Interrupt { .. } if ctx.rip == base + 0x25 => ctx.rip = base + 0x1c,
            // A tick or an IPI elsewhere in the program: go on.
            Exit::Interrupt { .. } => {}
            other => {
                result = Err(fail(format_args!(
                    "unexpected exit {other:?} at rip {:#x} (user RFLAGS {:#x})",
                    ctx.rip, ctx.rflags
                )));
                break;
            }
        }
    }
    space.deactivate();
    result?;
    ensure!(
        fault && ud && irq,
        "not every trap was seen with AC set in user mode: page fault {fault}, #UD {ud}, interrupt {irq}"
    );
    Ok(())
}

/// An `Event` wait that is dropped before the event fires (it lost a race against a
/// time-out or a kill) takes its waker out of the event: 1,000 abandoned waits, each
/// polled with two wakers, leave none and keep no waker's task alive; a fire after
/// that wakes only the waits still there.
fn process_abandoned_event_waits_leave_no_waker(_: &crate::ktest::support::Context<'_>) -> Outcome {
    use alloc::sync::Arc;
    use alloc::task::Wake;
    use core::future::Future;
    use core::task::{Context, Poll, Waker};
    struct Count(AtomicU64);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (a, b) = (
        Arc::new(Count(AtomicU64::new(0))),
        Arc::new(Count(AtomicU64::new(0))),
    );
    let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
    let event = crate::process::Event::default();
    for _ in 0..1000 {
        let mut wait = core::pin::pin!(event.wait());
        ensure!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&wa))
                .is_pending(),
            "an unfired event's wait completed"
        );
        ensure!(
            wait.as_mut()
                .poll(&mut Context::from_waker(&wb))
                .is_pending(),
            "an unfired event's wait completed"
        );
        ensure!(
            event.waiters() == 1,
            "{} wakers for one wait",
            event.waiters()
        );
    }
    ensure!(
        event.waiters() == 0,
        "{} wakers left by 1,000 dropped waits",
        event.waiters()
    );
    ensure!(
        Arc::strong_count(&a) == 2 && Arc::strong_count(&b) == 2,
        "dropped waits keep their wakers alive ({} and {} references)",
        Arc::strong_count(&a),
        Arc::strong_count(&b)
    );
    // One wait stays, one goes: the fire wakes the one that stays.
    let mut stays = alloc::boxed::Box::pin(event.wait());
    let mut goes = alloc::boxed::Box::pin(event.wait());
    ensure!(
        stays
            .as_mut()
            .poll(&mut Context::from_waker(&wa))
            .is_pending(),
        "stays"
    );
    ensure!(
        goes.as_mut()
            .poll(&mut Context::from_waker(&wb))
            .is_pending(),
        "goes"
    );
    drop(goes);
    event.fire();
    ensure!(
        a.0.load(Ordering::SeqCst) == 1 && b.0.load(Ordering::SeqCst) == 0,
        "the fire woke {} remaining and {} dropped waits",
        a.0.load(Ordering::SeqCst),
        b.0.load(Ordering::SeqCst)
    );
    ensure!(
        stays.as_mut().poll(&mut Context::from_waker(&wa)) == Poll::Ready(()),
        "a fired event's wait is still pending"
    );
    drop(stays);
    ensure!(event.waiters() == 0, "wakers after the fire");
    Ok(())
}
