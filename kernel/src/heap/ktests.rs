//! In-kernel tests of the kernel heap. They run when the command line says `test`;
//! the harness, its helpers and the list of test modules are in `crate::ktest`.

// Failures carry their message inline (see `crate::ktest::support::Failure`).
#![allow(clippy::result_large_err)]

use crate::ktest::support::{async_tests, ensure, tests, AsyncTest, Context, Outcome, Test};

pub(crate) const TESTS: &[Test] = tests![heap_alloc_free_returns_memory];

pub(crate) const ASYNC_TESTS: &[AsyncTest] = async_tests![];

fn heap_alloc_free_returns_memory(_: &Context<'_>) -> Outcome {
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    let cycle = || -> Outcome {
        // Large: a vector of 80 KB (frame runs) and a 4 KiB box; small: boxes of every
        // size class.
        let mut v: Vec<u64> = Vec::new();
        for i in 0..10_000u64 {
            v.push(i * 3);
        }
        let page = Box::new([7u8; 4096]);
        let small: Vec<Box<[u8]>> = (0..400)
            .map(|i| alloc::vec![i as u8; 1 + (i * 7) % 2048].into_boxed_slice())
            .collect();
        ensure!(
            v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3),
            "vector lost data"
        );
        ensure!(page.iter().all(|&x| x == 7), "box lost data");
        for (i, b) in small.iter().enumerate() {
            ensure!(
                b.len() == 1 + (i * 7) % 2048 && b.iter().all(|&x| x == i as u8),
                "small box {i} lost data"
            );
        }
        Ok(())
    };
    // Other CPUs' idle zeroing allocates (the buddy's bookkeeping) from their own
    // slabs; pause it so the page count reflects this test.
    let _paused = crate::memory::pause_zeroing();
    cycle()?;
    let pages = crate::heap::slab_pages();
    let (early_before, _) = crate::heap::usage();
    for _ in 0..20 {
        cycle()?;
    }
    let pages_after = crate::heap::slab_pages();
    // A page or two of slack: the buddy allocator's own bookkeeping may settle into a
    // slightly different shape. Without reuse the count grows by thousands.
    ensure!(
        pages_after <= pages + 2,
        "slab pages grew from {pages} to {pages_after}: freed objects are not reused"
    );
    // The early heap serves only what the frame allocator's own bookkeeping allocates
    // while it holds its locks; that comes and goes but must not accumulate.
    let (early_after, _) = crate::heap::usage();
    ensure!(
        early_after <= early_before + 4096,
        "early heap grew from {early_before} to {early_after} bytes over 20 cycles"
    );
    Ok(())
}
