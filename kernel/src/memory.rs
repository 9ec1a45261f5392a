//! Physical memory at run time, the kernel's side: handing the boot memory map to the
//! frame allocator, and wiring the zeroing policy to the scheduler.
//!
//! The allocator itself, its per-CPU caches and zeroed pools, and the owned frame types
//! live in `panda_platform::frame` (frames are memory: only the platform layer may turn
//! a number into one); the zeroing policy — where a fault's zeroed frame comes from,
//! each CPU's zeroing task, the idle-time top-up, `mm.prezero`, pausing for tests that
//! count frames — is `panda_platform::zero`. `init` runs once on the boot CPU after
//! bring-up, when every boot-time claim is recorded in the memory map: every usable and
//! bootloader-reclaimable range above 1 MiB becomes free frames, and from then on the
//! memory map is a record only. `start_zeroing` connects the policy to the executor
//! (platform does not depend on the scheduler). The kernel's reserve (`above_reserve`)
//! keeps user-caused allocations from taking the memory the kernel needs.

use panda_arch::percpu;
use panda_platform::frame;

pub use panda_platform::frame::{above_reserve, reserve_frames};
pub use panda_platform::zero::{pause_zeroing, prezero, set_prezero, zero_when_idle};

use crate::boot::BootInfo;

/// Hands every free range of the boot memory map above 1 MiB to the frame allocator
/// (bootloader data is reclaimed too: by now the kernel runs on its own page tables,
/// GDT, IDT and stacks, and `BootInfo` holds copies of everything it needed from the
/// bootloader). Returns the frames it manages: 0 if the map was handed over already or
/// the kernel's tables are not active yet.
pub fn init(boot: &mut BootInfo, cpus: usize) -> u64 {
    match boot.memory_map.hand_over_free() {
        Some(free) => frame::init(cpus, free),
        None => 0,
    }
}

/// Connects the zeroing policy to the executor: the idle work, the two scheduler calls
/// the fault path asks of it, and CPU `cpu`'s zeroing task for each of `cpus` (spawned
/// pinned there).
pub fn start_zeroing(exec: &'static panda_sched::Executor<crate::executor::Machine>, cpus: usize) {
    exec.set_idle_work(zero_when_idle);
    panda_platform::zero::connect(panda_platform::zero::Scheduler {
        wake_idle_near: |cpu| {
            if let Some(exec) = crate::executor::get() {
                exec.wake_idle_near(cpu);
            }
        },
        has_queued_work: |cpu| crate::executor::get().is_some_and(|e| e.has_queued_work(cpu)),
    });
    for cpu in panda_mm::CpuId::all(cpus) {
        // Detached: the zeroing tasks run as long as the kernel.
        drop(exec.spawn_pinned(
            cpu,
            panda_platform::zero::zeroing_task(cpu, || exec.yield_now()),
        ));
    }
}

/// Frames nobody uses: free, pooled (zeroed), or kept by the heap's slabs for reuse.
/// Constant while nothing holds frames and zeroing is paused, so leak tests compare it
/// with a baseline.
pub fn frames_not_in_use() -> u64 {
    frame::total_free() + frame::pooled(percpu::online_count()) + crate::heap::slab_pages() as u64
}

/// In-kernel tests of this module (run by `crate::ktest` when the command line says
/// `test`).
pub(crate) mod ktests;
