//! The CPUs the memory and scheduling tables are sized for, and the kernel's one
//! notion of which CPU is near another. Kernel internals, not part of the ABI: a user
//! program learns the CPU count from `OP_CPU_COUNT` (or `SystemInfo::cpus`).

/// The most CPUs Panda runs on: the per-CPU tables of the executor (`panda-sched`),
/// the frame caches, zeroed pools and slab lists, and the shootdown sets are all
/// sized by this one constant, and every CPU index is below it. A multiple of 64
/// (`tlb::CpuSet` holds it in 64-bit words).
pub const MAX_CPUS: usize = 512;

const _: () = assert!(MAX_CPUS.is_multiple_of(64));

/// The CPUs of `0..n` other than `cpu`, nearest first by number: `cpu + 1`, `cpu - 1`,
/// `cpu + 2`, `cpu - 2`, ..., wrapping round, each exactly once. Until the kernel
/// knows the machine's topology this is its one notion of "near": an idle CPU zeroes
/// frames for the nearest CPU whose pool has room, and a CPU whose pool runs low wakes
/// the nearest idle CPU to do it. `cpu` must be below `n`.
pub fn cpus_nearest_first(cpu: usize, n: usize) -> impl Iterator<Item = usize> {
    (1..=n / 2).flat_map(move |d| {
        let up = (cpu + d) % n;
        let down = (cpu + n - d) % n;
        [Some(up), (down != up).then_some(down)]
            .into_iter()
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_cpus_come_nearest_first_each_once() {
        let order = |cpu, n| cpus_nearest_first(cpu, n).collect::<Vec<_>>();
        assert_eq!(order(0, 1), Vec::<usize>::new());
        assert_eq!(order(0, 2), vec![1]);
        assert_eq!(order(1, 2), vec![0]);
        assert_eq!(order(0, 4), vec![1, 3, 2]);
        assert_eq!(order(2, 5), vec![3, 1, 4, 0]);
        for n in 1..40 {
            for cpu in 0..n {
                let mut seen = order(cpu, n);
                // Nearest first: the wrapped distance never shrinks along the order.
                let dist = |c: usize| ((c + n - cpu) % n).min((cpu + n - c) % n);
                assert!(
                    seen.windows(2).all(|w| dist(w[0]) <= dist(w[1])),
                    "cpu {cpu} of {n}: {seen:?}"
                );
                seen.sort_unstable();
                assert_eq!(
                    seen,
                    (0..n).filter(|&c| c != cpu).collect::<Vec<_>>(),
                    "cpu {cpu} of {n}"
                );
            }
        }
    }
}
