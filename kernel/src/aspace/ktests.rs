//! In-kernel tests of user address spaces: regions, demand-zero faults, unmaps seen by other CPUs, shootdowns and the frames they hold. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use panda_arch::percpu;
use panda_arch::probe::{self};
use panda_platform::frame;

use crate::aspace::{AddressSpace, FaultError};
use crate::ktest::support::{
    async_tests, ensure, executor, fail, tests, user_addr, user_read, user_write, AsyncTest,
    Outcome, Test,
};
use panda_mm::region::{Access, FaultDecision, Rights};

pub(crate) const TESTS: &[Test] = tests![mm_user_ranges_hold_only_the_user_half];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![
    mm_address_space_regions_and_faults,
    mm_unmap_is_seen_by_another_cpu,
    mm_unmapped_frames_stay_in_use_until_every_cpu_flushed,
    mm_shootdowns_of_two_spaces_run_in_parallel,
    mm_shootdowns_of_one_space_run_in_parallel,
    mm_switching_spaces_leaves_the_old_active_set,
    mm_fault_under_exhaustion_fails_cleanly,
    mm_mapping_a_mapped_page_is_refused_and_frees_the_frame,
    mm_a_large_unmap_goes_in_batches_and_can_stop_between_them,
    mm_the_charge_is_what_the_tables_hold,
    mm_user_copies_cross_pages_and_stop_at_the_region_end
];

/// `UserAddr`/`UserRange` hold only the user half: the cases the system calls'
/// `BadAddress` rule rests on (ending exactly at `USER_SPACE_END`, one byte past it,
/// an overflowing sum, an empty range at and past the end), and the splits the copies
/// walk by.
fn mm_user_ranges_hold_only_the_user_half(_: &crate::ktest::support::Context<'_>) -> Outcome {
    use panda_platform::vm::{UserAddr, UserRange};
    let end = panda_abi::USER_SPACE_END as u64;
    ensure!(
        UserAddr::new(end - 1).is_some(),
        "the last user byte refused"
    );
    ensure!(UserAddr::new(end).is_none(), "USER_SPACE_END taken as user");
    ensure!(
        UserAddr::new(u64::MAX).is_none(),
        "a kernel address taken as user"
    );
    ensure!(
        UserRange::new(end - 8, 8).is_some(),
        "a range ending at the end refused"
    );
    ensure!(
        UserRange::new(end - 8, 9).is_none(),
        "a range past the end taken"
    );
    ensure!(
        UserRange::new(u64::MAX, 2).is_none(),
        "an overflowing range taken"
    );
    ensure!(
        UserRange::new(8, u64::MAX).is_none(),
        "an overflowing length taken"
    );
    let empty = UserRange::new(end, 0);
    ensure!(
        empty.is_some_and(|r| r.is_empty() && r.first().is_none()),
        "the empty range at the end: {empty:?}"
    );
    ensure!(
        UserRange::new(end + 1, 0).is_none(),
        "an empty kernel range taken"
    );
    let r = UserRange::new(0x1ff8, 0x2010).ok_or_else(|| fail(format_args!("0x1ff8")))?;
    let piece = r.first_piece();
    ensure!(
        piece.start() == 0x1ff8 && piece.len() == 8,
        "first piece {piece:?}"
    );
    let (head, tail) = r.split_at(0x10);
    ensure!(
        head.len() == 0x10 && tail.start() == 0x2008 && tail.end() == r.end(),
        "split {head:?} {tail:?}"
    );
    let (all, none) = r.split_at(u64::MAX);
    ensure!(all == r && none.is_empty(), "split past the end");
    ensure!(
        r.within(0x1000, 0x4008) && !r.within(0x1000, 0x4007),
        "within"
    );
    Ok(())
}

/// A copy to and from user memory across page boundaries gets back what it wrote
/// (three pieces: the tail of one page, a whole page, the head of the next, each
/// faulted in); a destination that runs past the heap's end is refused whole and
/// left untouched.
async fn mm_user_copies_cross_pages_and_stop_at_the_region_end() -> Outcome {
    use panda_platform::vm::UserRange;
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let heap = panda_abi::HEAP_BASE as u64;
    space
        .set_brk(heap + 0x4000)
        .await
        .map_err(|e| fail(format_args!("brk: {e:?}")))?;
    let range = |at: u64, len: usize| {
        UserRange::new(at, len as u64).ok_or_else(|| fail(format_args!("{at:#x}")))
    };
    let bytes: Vec<u8> = (0..0x1010u32).map(|i| (i * 7) as u8).collect();
    let at = heap + 0x0ff8;
    space
        .write_user(range(at, bytes.len())?, &bytes)
        .await
        .map_err(|e| fail(format_args!("write: {e:?}")))?;
    let mut back = alloc::vec![0u8; bytes.len()];
    space
        .read_user(range(at, back.len())?, &mut back)
        .await
        .map_err(|e| fail(format_args!("read: {e:?}")))?;
    ensure!(back == bytes, "read back differs");
    // From the last heap page past the break: refused whole, the valid part untouched.
    let past = heap + 0x3ff0;
    let refused = space.write_user(range(past, 0x20)?, &[0xaa; 0x20]).await;
    ensure!(refused.is_err(), "a write past the heap's end succeeded");
    let mut tail = [0u8; 0x10];
    space
        .read_user(range(past, 0x10)?, &mut tail)
        .await
        .map_err(|e| fail(format_args!("read tail: {e:?}")))?;
    ensure!(tail == [0; 0x10], "a refused write left bytes: {tail:?}");
    // Lengths that differ are refused (a caller's bug), not half-copied.
    ensure!(
        space.read_user(range(at, 4)?, &mut [0u8; 3]).await.is_err(),
        "a read into a buffer of another length succeeded"
    );
    Ok(())
}

/// A large shrink unmaps in batches of at most `UNMAP_BATCH` pages, one shootdown (and
/// one hold of the table lock) each, with a chance to yield between them. Dropped
/// between two batches (its process ended), it leaves everything consistent: the
/// released range is refused to faults, the break stays where the call put it, the
/// pages not yet unmapped stay the tables', and every frame comes back with the space.
/// (Before batching: one shootdown for the whole range, and no point to stop at.)
async fn mm_a_large_unmap_goes_in_batches_and_can_stop_between_them() -> Outcome {
    use crate::aspace::{stat, Stat};
    use core::future::Future;
    use core::task::{Context, Poll, Waker};
    let exec = executor()?;
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    const BATCH: u64 = panda_platform::vm::UNMAP_BATCH as u64;
    const PAGES: u64 = 3 * BATCH + 100;
    let heap = panda_abi::HEAP_BASE as u64;
    let outcome: Outcome = async {
        let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
        let grow_and_fill = async || -> Outcome {
            space
                .set_brk(heap + PAGES * 0x1000)
                .await
                .map_err(|e| fail(format_args!("grow: {e:?}")))?;
            for i in 0..PAGES {
                space
                    .handle_fault(user_addr(heap + i * 0x1000), Access::Write)
                    .map_err(|e| fail(format_args!("fault: {e:?}")))?;
            }
            Ok(())
        };
        grow_and_fill().await?;
        let before = stat(Stat::Shootdowns);
        space
            .set_brk(heap)
            .await
            .map_err(|e| fail(format_args!("shrink: {e:?}")))?;
        let batches = stat(Stat::Shootdowns) - before;
        ensure!(
            batches >= PAGES.div_ceil(BATCH),
            "{PAGES} pages unmapped with {batches} shootdowns: not in batches of {BATCH}"
        );
        ensure!(
            (0..PAGES).all(|i| space.translate(heap + i * 0x1000).is_none()),
            "a page is still mapped after the shrink"
        );
        // Again, stopped after its first batch: a timer due on this CPU makes the
        // shrink yield there (`executor::Slice`), and the future is dropped.
        grow_and_fill().await?;
        let mut cx = Context::from_waker(Waker::noop());
        // A 1 ms timer armed on this CPU (again if the host held this vCPU up for that
        // long between making and polling it), then waited out without a turn of the
        // executor, so it is due and not yet fired.
        let mut tries = 0;
        let (_timer, armed) = loop {
            let mut timer = alloc::boxed::Box::pin(exec.sleep(1_000_000));
            let armed = panda_arch::time::now_ns();
            if timer.as_mut().poll(&mut cx).is_pending() {
                break (timer, armed);
            }
            tries += 1;
            ensure!(tries < 100, "a 1 ms sleep was over at once 100 times");
        };
        while panda_arch::time::now_ns() <= armed + 1_100_000 {
            core::hint::spin_loop();
        }
        {
            let mut shrink = core::pin::pin!(space.set_brk(heap));
            ensure!(
                matches!(shrink.as_mut().poll(&mut cx), Poll::Pending),
                "the shrink did not stop between batches for a due timer"
            );
        }
        let mapped = (0..PAGES)
            .filter(|&i| space.translate(heap + i * 0x1000).is_some())
            .count() as u64;
        ensure!(
            (PAGES - BATCH..PAGES).contains(&mapped),
            "{mapped} of {PAGES} pages still mapped after one batch"
        );
        ensure!(space.brk() == heap, "the break is {:#x}", space.brk());
        let last = heap + (PAGES - 1) * 0x1000;
        ensure!(
            matches!(
                space.handle_fault(user_addr(last), Access::Write),
                Err(FaultError::Denied(_))
            ),
            "a fault in the range being released was resolved"
        );
        Ok(())
    }
    .await;
    outcome?;
    let after = crate::memory::frames_not_in_use();
    ensure!(
        after == baseline,
        "frames not in use: {baseline} before, {after} after the space was dropped"
    );
    Ok(())
}

/// A space's charge is exactly the frames its tables hold (pages, tables, the PML4)
/// after faults that add tables, a shrink that frees pages and tables, and faults
/// refused at the account's limit (which leave the usage at or under it); after the
/// drop the account is back to zero. Fails if an unmap's tables are not given back, or
/// a refused fault keeps its charge.
async fn mm_the_charge_is_what_the_tables_hold() -> Outcome {
    use panda_mm::account::Account;
    const PAGE: u64 = panda_arch::PAGE_SIZE;
    let errors = crate::aspace::account_errors();
    let account = Account::root(48 * PAGE);
    let space =
        AddressSpace::with_account(account.clone()).map_err(|e| fail(format_args!("{e:?}")))?;
    let check = |what: &str| -> Outcome {
        let (charged, held) = (space.charged(), space.frames_held() * PAGE);
        ensure!(
            charged == held && account.usage() == held,
            "{what}: {charged} bytes charged, {held} held, account {}",
            account.usage()
        );
        Ok(())
    };
    let heap = panda_abi::HEAP_BASE as u64;
    space
        .set_brk(heap + 0x10_0000)
        .await
        .map_err(|e| fail(format_args!("brk: {e:?}")))?;
    for page in 0..8 {
        space
            .handle_fault(user_addr(heap + page * PAGE), Access::Write)
            .map_err(|e| fail(format_args!("fault {page}: {e:?}")))?;
    }
    // A buffer far from the heap needs tables of its own.
    let buffer = space
        .alloc_buffer(4 * PAGE)
        .map_err(|e| fail(format_args!("buffer: {e:?}")))?;
    space
        .handle_fault(user_addr(buffer), Access::Write)
        .map_err(|e| fail(format_args!("buffer fault: {e:?}")))?;
    check("after faults")?;
    space
        .free_buffer(buffer)
        .await
        .map_err(|e| fail(format_args!("free: {e:?}")))?;
    space
        .set_brk(heap + PAGE)
        .await
        .map_err(|e| fail(format_args!("shrink: {e:?}")))?;
    check("after unmaps")?;
    // Up to the limit and past it.
    space
        .set_brk(heap + 0x10_0000)
        .await
        .map_err(|e| fail(format_args!("brk: {e:?}")))?;
    let mut refused = None;
    for page in 1..256 {
        if let Err(e) = space.handle_fault(user_addr(heap + page * PAGE), Access::Write) {
            refused = Some((page, e));
            break;
        }
    }
    ensure!(
        matches!(refused, Some((_, FaultError::OutOfMemory))),
        "faults past a 48-page limit gave {refused:?}"
    );
    ensure!(
        account.usage() <= 48 * PAGE && account.usage() > 40 * PAGE,
        "usage {} at a limit of {}",
        account.usage(),
        48 * PAGE
    );
    check("after refusals")?;
    drop(space);
    ensure!(
        account.usage() == 0 && account.own() == 0,
        "{} bytes still charged after the drop",
        account.usage()
    );
    ensure!(
        crate::aspace::account_errors() == errors,
        "accounting errors counted"
    );
    Ok(())
}

/// Mapping a frame at a page that is mapped already is refused in the one walk of the
/// tables (no second walk checks first): the mapping stays the first frame's, and the
/// refused frame goes back to the allocator (two faults racing for one page rely on
/// both).
async fn mm_mapping_a_mapped_page_is_refused_and_frees_the_frame() -> Outcome {
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let outcome: Outcome = (|| {
        let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
        let page = panda_abi::ELF_LOAD_BASE as u64;
        let rights = Rights {
            write: true,
            execute: false,
        };
        space
            .add_segment(page, page + 0x1000, rights)
            .map_err(|e| fail(format_args!("segment: {e:?}")))?;
        let filled = || {
            frame::alloc_user_zeroed()
                .map(|z| z.fill(0, b"segment bytes"))
                .ok_or_else(|| fail(format_args!("no frame")))
        };
        let (first, second) = (filled()?, filled()?);
        let (first_phys, second_phys) = (first.phys(), second.phys());
        space
            .map_filled(page, first, rights)
            .map_err(|e| fail(format_args!("first map: {e:?}")))?;
        let again = space.map_filled(page + 0x10, second, rights);
        let now = space.translate(page).map(|(phys, _)| phys);
        ensure!(again.is_err(), "a second frame was mapped over the first");
        ensure!(
            now == Some(first_phys),
            "the page maps {now:#x?}, not the first frame {first_phys:#x}"
        );
        ensure!(
            !frame::is_in_use(second_phys),
            "the refused frame {second_phys:#x} was not given back"
        );
        Ok(())
    })();
    let now = crate::memory::frames_not_in_use();
    outcome?;
    ensure!(
        now == baseline,
        "{now} frames after the test, baseline {baseline}"
    );
    Ok(())
}

/// A CPU that switches from one user space to another leaves the first one's active
/// set (so the first one's shootdowns no longer interrupt it), and leaves the second
/// one's when it returns to the kernel's tables.
async fn mm_switching_spaces_leaves_the_old_active_set() -> Outcome {
    let cpu = panda_platform::cpu::current();
    let a = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    let b = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    a.activate();
    let in_a = a.active_cpus().contains(cpu);
    b.activate();
    let (a_after, b_after) = (a.active_cpus().contains(cpu), b.active_cpus().contains(cpu));
    b.deactivate();
    let b_end = b.active_cpus().contains(cpu);
    ensure!(in_a, "activating a did not put cpu{cpu} in its set");
    ensure!(
        !a_after,
        "cpu{cpu} stayed in a's active set after switching to b"
    );
    ensure!(b_after, "activating b did not put cpu{cpu} in its set");
    ensure!(
        !b_end,
        "cpu{cpu} stayed in b's active set after deactivating"
    );
    Ok(())
}

async fn mm_fault_under_exhaustion_fails_cleanly() -> Outcome {
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let cpu = panda_platform::cpu::current();
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    space.activate();
    let heap = panda_abi::HEAP_BASE as u64;
    let _ = space.set_brk(heap + 0x10_0000).await;
    // Take every free and pooled frame this CPU can reach.
    let mut held = alloc::vec::Vec::new();
    while let Some(f) = frame::alloc() {
        held.push(f);
    }
    while let Some(z) = frame::try_take_zeroed(cpu) {
        held.push(z.into_frame());
    }
    let starved = space.handle_fault(user_addr(heap + 0x8_0000), Access::Write);
    drop(held);
    let recovered = space.handle_fault(user_addr(heap + 0x8_0000), Access::Write);
    space.deactivate();
    drop(space);
    let now = crate::memory::frames_not_in_use();
    ensure!(
        starved == Err(FaultError::OutOfMemory),
        "fault under exhaustion gave {starved:?}"
    );
    ensure!(
        recovered == Ok(()),
        "fault after memory returned gave {recovered:?}"
    );
    ensure!(
        now == baseline,
        "{now} frames after the test, baseline {baseline}"
    );
    Ok(())
}

async fn mm_address_space_regions_and_faults() -> Outcome {
    use panda_abi::{ELF_LOAD_BASE, HEAP_BASE, INITIAL_STACK_POINTER, STACK_BASE};
    let _paused = crate::memory::pause_zeroing();
    let baseline = crate::memory::frames_not_in_use();
    let outcome: Outcome = async {
        let space = AddressSpace::new().map_err(|e| fail(format_args!("new space: {e:?}")))?;
        space.activate();
        let result: Outcome = async {
            let heap = HEAP_BASE as u64;
            space
                .set_brk(heap + 0x4000)
                .await
                .map_err(|e| fail(format_args!("brk: {e:?}")))?;
            // Demand-zero: a fresh page reads zero, then keeps what is written.
            ensure!(
                user_read(&space, heap + 0x1008) == Ok(0),
                "fresh heap page not zero"
            );
            user_write(&space, heap, 0x1234_5678)
                .map_err(|d| fail(format_args!("heap write: {d:?}")))?;
            ensure!(user_read(&space, heap) == Ok(0x1234_5678), "heap lost data");
            // Shrink to an unaligned break: the page holding it keeps its data, the
            // pages above are gone and read zero when the heap grows again.
            user_write(&space, heap + 0x2000, 0xdead).map_err(|d| fail(format_args!("{d:?}")))?;
            space
                .set_brk(heap + 0x10)
                .await
                .map_err(|e| fail(format_args!("{e:?}")))?;
            ensure!(
                user_read(&space, heap) == Ok(0x1234_5678),
                "shrink lost the break's page"
            );
            ensure!(
                space.translate(heap + 0x2000).is_none(),
                "page above the break still mapped"
            );
            ensure!(
                user_read(&space, heap + 0x2000) == Err(FaultDecision::OutsideRegions),
                "read above the break allowed"
            );
            space
                .set_brk(heap + 0x4000)
                .await
                .map_err(|e| fail(format_args!("{e:?}")))?;
            ensure!(
                user_read(&space, heap + 0x2000) == Ok(0),
                "regrown heap shows old contents"
            );
            // Buffers.
            let buf = space
                .alloc_buffer(8192)
                .map_err(|e| fail(format_args!("{e:?}")))?;
            user_write(&space, buf + 4096, 7).map_err(|d| fail(format_args!("buffer: {d:?}")))?;
            ensure!(user_read(&space, buf + 4096) == Ok(7), "buffer lost data");
            // Stack: top and the 16th MiB, then the guard page.
            let top = INITIAL_STACK_POINTER as u64;
            user_write(&space, top - 8, 1).map_err(|d| fail(format_args!("stack top: {d:?}")))?;
            user_write(&space, STACK_BASE as u64, 2)
                .map_err(|d| fail(format_args!("stack bottom: {d:?}")))?;
            ensure!(
                user_write(&space, STACK_BASE as u64 - 8, 3) == Err(FaultDecision::StackOverflow),
                "stack guard page writable"
            );
            // An ELF-style read-only segment: readable (zero), not writable.
            let base = ELF_LOAD_BASE as u64;
            space
                .add_segment(
                    base,
                    base + 0x1000,
                    Rights {
                        write: false,
                        execute: true,
                    },
                )
                .map_err(|e| fail(format_args!("{e:?}")))?;
            ensure!(user_read(&space, base) == Ok(0), "segment read");
            ensure!(
                user_write(&space, base, 1) == Err(FaultDecision::ProtectionViolation),
                "read-only segment writable"
            );
            // Protect: a writable segment page, written, then made read-only.
            let data = base + 0x1000;
            space
                .add_segment(
                    data,
                    data + 0x1000,
                    Rights {
                        write: true,
                        execute: false,
                    },
                )
                .map_err(|e| fail(format_args!("{e:?}")))?;
            user_write(&space, data, 9).map_err(|d| fail(format_args!("data segment: {d:?}")))?;
            space
                .protect_segment(
                    data,
                    Rights {
                        write: false,
                        execute: false,
                    },
                )
                .map_err(|e| fail(format_args!("protect: {e:?}")))?;
            ensure!(
                probe::write_user_u64(data, 10).is_err(),
                "write allowed after protect (stale TLB or PTE)"
            );
            ensure!(
                user_read(&space, data) == Ok(9),
                "protect lost the page's data"
            );
            // Nothing else is mapped.
            ensure!(
                user_read(&space, 0) == Err(FaultDecision::OutsideRegions),
                "null readable"
            );
            ensure!(
                user_read(&space, 0x1_0000_0000_0000) == Err(FaultDecision::OutsideRegions),
                "hole"
            );
            Ok(())
        }
        .await;
        space.deactivate();
        result
    }
    .await;
    // The space is dropped: every frame and table page must be back.
    let now = crate::memory::frames_not_in_use();
    outcome?;
    ensure!(
        now == baseline,
        "after tear-down {now} frames, baseline {baseline}: leak"
    );
    Ok(())
}

static SHARED_SPACE: spin::Mutex<Option<alloc::sync::Arc<AddressSpace>>> = spin::Mutex::new(None);

/// Runs on another CPU (cross-CPU call): enters the shared space, reads `addr`.
/// Returns the value, or u64::MAX if the read faulted.
fn read_on_this_cpu(addr: u64) -> u64 {
    // Enter only once: a CR3 reload would flush the TLB and hide a missing shootdown.
    if let Some(space) = SHARED_SPACE.lock().as_ref() {
        if !space.is_current() {
            space.activate();
        }
    }
    probe::read_user_u64(addr).unwrap_or(u64::MAX)
}

fn leave_shared_space(_: u64) -> u64 {
    if let Some(space) = SHARED_SPACE.lock().as_ref() {
        space.deactivate();
    }
    0
}

async fn mm_unmap_is_seen_by_another_cpu() -> Outcome {
    let exec = executor()?;
    if exec.cpu_count() < 2 {
        crate::console!("   (needs 2 CPUs: skipped)");
        return Ok(());
    }
    let heap = panda_abi::HEAP_BASE as u64;
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    *SHARED_SPACE.lock() = Some(space.clone());
    space.activate();
    let result: Outcome = async {
        space
            .set_brk(heap + 0x1000)
            .await
            .map_err(|e| fail(format_args!("{e:?}")))?;
        user_write(&space, heap, 0x5eed).map_err(|d| fail(format_args!("{d:?}")))?;
        // CPU 1 enters the space and reads the page: its TLB now holds the translation.
        let seen = panda_platform::ipi::call_on(1, read_on_this_cpu, heap)
            .map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(seen == 0x5eed, "cpu1 read {seen:#x}");
        // Unmap here while CPU 1 still runs the space.
        space
            .set_brk(heap)
            .await
            .map_err(|e| fail(format_args!("{e:?}")))?;
        let after = panda_platform::ipi::call_on(1, read_on_this_cpu, heap)
            .map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(
            after == u64::MAX,
            "cpu1 still read {after:#x} through a stale TLB entry after the unmap"
        );
        Ok(())
    }
    .await;
    let _ = panda_platform::ipi::call_on(1, leave_shared_space, 0);
    space.deactivate();
    *SHARED_SPACE.lock() = None;
    result
}

/// Two spaces on two CPUs, each shrinking its heap over and over: their shootdowns
/// must be in flight at the same time (no global shootdown lock).
async fn mm_shootdowns_of_two_spaces_run_in_parallel() -> Outcome {
    shootdowns_run_in_parallel(false).await
}

/// Two threads of one space on two CPUs, each freeing buffers over and over: no lock of
/// the space is held across a shootdown's wait, so both are in flight at once.
async fn mm_shootdowns_of_one_space_run_in_parallel() -> Outcome {
    shootdowns_run_in_parallel(true).await
}

/// Tasks pinned on CPUs 0 and 1 unmap pages in a loop (`shared`: buffers of one space
/// both run; otherwise heap shrinks of a space each) until two shootdowns were seen in
/// flight at once, or 20 s pass.
async fn shootdowns_run_in_parallel(shared: bool) -> Outcome {
    use core::sync::atomic::AtomicBool;
    static DONE: AtomicBool = AtomicBool::new(false);
    let exec = executor()?;
    if exec.cpu_count() < 2 {
        crate::console!("   (needs 2 CPUs: skipped)");
        return Ok(());
    }
    let one = if shared {
        Some(AddressSpace::new().map_err(|e| fail(format_args!("no space: {e:?}")))?)
    } else {
        None
    };
    crate::aspace::take_most_shootdowns_in_flight();
    DONE.store(false, Ordering::SeqCst);
    let mut handles = Vec::new();
    for cpu in panda_mm::CpuId::all(2) {
        let one = one.clone();
        handles.push(exec.spawn_pinned(cpu, async move {
            let space = match one {
                Some(space) => space,
                None => AddressSpace::new().map_err(|_| "no space")?,
            };
            space.activate();
            let deadline = panda_arch::time::now_ns() + 20_000_000_000;
            let mut result = Ok(());
            while !DONE.load(Ordering::SeqCst) && panda_arch::time::now_ns() < deadline {
                if let Err(why) = unmap_eight_pages(&space, shared).await {
                    result = Err(why);
                    break;
                }
                if crate::aspace::most_shootdowns_in_flight() >= 2 {
                    DONE.store(true, Ordering::SeqCst);
                }
                // Let the executor come round (a failing run loops for 20 s).
                exec.yield_now().await;
            }
            space.deactivate();
            result
        }));
    }
    for h in handles {
        h.await
            .map_err(|why| fail(format_args!("an unmapping task failed: {why}")))?;
    }
    let most = crate::aspace::take_most_shootdowns_in_flight();
    let what = if shared { "one space's" } else { "two spaces'" };
    ensure!(
        most >= 2,
        "{what} shootdowns never ran at once in 20 s (most in flight: {most})"
    );
    Ok(())
}

/// Maps eight pages (a buffer, or the heap) by writing them, then unmaps them (buffer
/// free or heap shrink), which shoots them down.
async fn unmap_eight_pages(space: &AddressSpace, buffer: bool) -> Result<(), &'static str> {
    let base = if buffer {
        space.alloc_buffer(8 * 0x1000).map_err(|_| "buffer")?
    } else {
        let heap = panda_abi::HEAP_BASE as u64;
        space.set_brk(heap + 8 * 0x1000).await.map_err(|_| "brk")?;
        heap
    };
    for page in 0..8 {
        user_write(space, base + page * 0x1000, page).map_err(|_| "fault")?;
    }
    if buffer {
        space.free_buffer(base).await.map_err(|_| "free")
    } else {
        space.set_brk(base).await.map(|_| ()).map_err(|_| "shrink")
    }
}

/// The frames a shrink is about to unmap, for the flush probe.
static PROBED: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];

/// Bit per CPU whose flush ran the probe, and how many probed frames were already free.
static PROBE_CPUS: AtomicU64 = AtomicU64::new(0);

static PROBE_FREED_EARLY: AtomicU64 = AtomicU64::new(0);

/// Runs inside each CPU's shootdown flush, before it flushes: until this returns, the
/// CPU may still use the old translations, so none of the frames may be free yet.
fn probe_frames_still_in_use() {
    for f in PROBED.iter().map(|f| f.load(Ordering::SeqCst)) {
        if f != 0 && !frame::is_in_use(f) {
            PROBE_FREED_EARLY.fetch_add(1, Ordering::SeqCst);
        }
    }
    PROBE_CPUS.fetch_or(1 << (percpu::current_index() % 64), Ordering::SeqCst);
}

/// A frame is reused only after every CPU that may cache its translation flushed: a
/// probe run inside each CPU's flush (so that CPU's acknowledgement waits for it) finds
/// every unmapped frame still in use, and they are free once the shrink returns.
async fn mm_unmapped_frames_stay_in_use_until_every_cpu_flushed() -> Outcome {
    let exec = executor()?;
    if exec.cpu_count() < 2 {
        crate::console!("   (needs 2 CPUs: skipped)");
        return Ok(());
    }
    // No idle zeroing: a CPU's flush then never interrupts its own refill holding
    // its frame cache's lock, which the probe takes.
    let _paused = crate::memory::pause_zeroing();
    let heap = panda_abi::HEAP_BASE as u64;
    let pages = PROBED.len() as u64;
    let space = AddressSpace::new().map_err(|e| fail(format_args!("{e:?}")))?;
    *SHARED_SPACE.lock() = Some(space.clone());
    space.activate();
    let result: Outcome = async {
        space
            .set_brk(heap + pages * 0x1000)
            .await
            .map_err(|e| fail(format_args!("{e:?}")))?;
        for (i, slot) in PROBED.iter().enumerate() {
            let page = heap + i as u64 * 0x1000;
            user_write(&space, page, 0x5eed).map_err(|d| fail(format_args!("{d:?}")))?;
            let (phys, _) = space
                .translate(page)
                .ok_or_else(|| fail(format_args!("page {page:#x} not mapped")))?;
            slot.store(phys & !0xfff, Ordering::SeqCst);
        }
        // CPU 1 runs the space and caches a translation: it is a shootdown target.
        let seen = panda_platform::ipi::call_on(1, read_on_this_cpu, heap)
            .map_err(|e| fail(format_args!("{e:?}")))?;
        ensure!(seen == 0x5eed, "cpu1 read {seen:#x}");
        PROBE_CPUS.store(0, Ordering::SeqCst);
        PROBE_FREED_EARLY.store(0, Ordering::SeqCst);
        crate::aspace::set_flush_probe(probe_frames_still_in_use, true);
        let shrunk = space.set_brk(heap).await;
        crate::aspace::set_flush_probe(probe_frames_still_in_use, false);
        shrunk.map_err(|e| fail(format_args!("{e:?}")))?;
        let early = PROBE_FREED_EARLY.load(Ordering::SeqCst);
        let cpus = PROBE_CPUS.load(Ordering::SeqCst);
        ensure!(
            cpus & 0b10 != 0,
            "cpu1's flush did not run the probe (cpus {cpus:#b})"
        );
        ensure!(
            early == 0,
            "{early} frame checks found an unmapped frame free before every CPU had flushed"
        );
        let still = PROBED
            .iter()
            .map(|f| f.load(Ordering::SeqCst))
            .filter(|&f| f != 0 && frame::is_in_use(f))
            .count();
        ensure!(
            still == 0,
            "{still} unmapped frames still in use after the shrink"
        );
        Ok(())
    }
    .await;
    let _ = panda_platform::ipi::call_on(1, leave_shared_space, 0);
    space.deactivate();
    *SHARED_SPACE.lock() = None;
    PROBED.iter().for_each(|f| f.store(0, Ordering::SeqCst));
    result
}
