//! The CPUs the memory and scheduling tables are sized for, the CPU number those
//! tables are indexed by, and the kernel's one notion of which CPU is near another.
//! Kernel internals, not part of the ABI: a user program learns the CPU count from
//! `OP_CPU_COUNT` (or `SystemInfo::cpus`).

use core::ops::{Index, IndexMut};

/// The most CPUs Panda runs on: the per-CPU tables of the executor (`panda-sched`),
/// the frame caches, zeroed pools and slab lists, and the shootdown sets are all
/// sized by this one constant, and every CPU index is below it. A multiple of 64
/// (`tlb::CpuSet` holds it in 64-bit words).
pub const MAX_CPUS: usize = 512;

const _: () = assert!(MAX_CPUS.is_multiple_of(64));
// `CpuId` keeps its index in a `u16`.
const _: () = assert!(MAX_CPUS <= u16::MAX as usize + 1);

/// A CPU number that is always below `MAX_CPUS`, so it indexes every per-CPU table
/// (`PerCpu`, and the tables sized by the CPUs the kernel runs). The only ways to make
/// one are `new` (checked), `BOOT`, `all` and `cpus_nearest_first`, which stay in
/// range; the platform turns the running CPU's number into one once
/// (`panda_platform::cpu::current`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CpuId(u16);

impl CpuId {
    /// The boot CPU, number 0.
    pub const BOOT: CpuId = CpuId(0);

    /// CPU `index`, if it is below `MAX_CPUS`.
    pub const fn new(index: usize) -> Option<CpuId> {
        if index < MAX_CPUS {
            Some(CpuId(index as u16))
        } else {
            None
        }
    }

    /// The CPU's number, below `MAX_CPUS`.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// CPUs `0..n` in order (`n` capped at `MAX_CPUS`).
    pub fn all(n: usize) -> impl DoubleEndedIterator<Item = CpuId> + ExactSizeIterator + Clone {
        (0..n.min(MAX_CPUS) as u16).map(CpuId)
    }
}

impl core::fmt::Display for CpuId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// A table with one `T` per possible CPU, indexed only by `CpuId`: a bare number
/// cannot index it, and a `CpuId` always finds its entry.
pub struct PerCpu<T>([T; MAX_CPUS]);

impl<T> PerCpu<T> {
    /// The table holding `entries` (entry `i` belongs to CPU `i`); usable in a
    /// `static`: `PerCpu::new([const { .. }; MAX_CPUS])`.
    pub const fn new(entries: [T; MAX_CPUS]) -> Self {
        Self(entries)
    }

    /// Every entry, in CPU order.
    pub fn iter(&self) -> core::slice::Iter<'_, T> {
        self.0.iter()
    }

    /// Every CPU with its entry, in CPU order.
    pub fn enumerate(&self) -> impl Iterator<Item = (CpuId, &T)> {
        CpuId::all(MAX_CPUS).zip(self.0.iter())
    }
}

impl<T: Default> Default for PerCpu<T> {
    fn default() -> Self {
        Self(core::array::from_fn(|_| T::default()))
    }
}

impl<T> Index<CpuId> for PerCpu<T> {
    type Output = T;
    fn index(&self, cpu: CpuId) -> &T {
        &self.0[cpu.index()]
    }
}

impl<T> IndexMut<CpuId> for PerCpu<T> {
    fn index_mut(&mut self, cpu: CpuId) -> &mut T {
        &mut self.0[cpu.index()]
    }
}

/// The CPUs of `0..n` other than `cpu`, nearest first by number: `cpu + 1`, `cpu - 1`,
/// `cpu + 2`, `cpu - 2`, ..., wrapping round, each exactly once. Until the kernel
/// knows the machine's topology this is its one notion of "near": an idle CPU zeroes
/// frames for the nearest CPU whose pool has room, and a CPU whose pool runs low wakes
/// the nearest idle CPU to do it. `cpu` must be below `n` (`n` is capped at
/// `MAX_CPUS`, so every CPU yielded is a valid `CpuId`).
pub fn cpus_nearest_first(cpu: CpuId, n: usize) -> impl Iterator<Item = CpuId> {
    let n = n.min(MAX_CPUS);
    let cpu = cpu.index();
    (1..=n / 2).flat_map(move |d| {
        let up = (cpu + d) % n;
        let down = (cpu + n - d) % n;
        // Both are below n <= MAX_CPUS.
        [
            Some(CpuId(up as u16)),
            (down != up).then_some(CpuId(down as u16)),
        ]
        .into_iter()
        .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ids_stay_below_max_cpus() {
        assert_eq!(CpuId::new(0), Some(CpuId::BOOT));
        assert_eq!(
            CpuId::new(MAX_CPUS - 1).map(CpuId::index),
            Some(MAX_CPUS - 1)
        );
        assert_eq!(CpuId::new(MAX_CPUS), None);
        assert_eq!(CpuId::new(usize::MAX), None);
        assert_eq!(
            CpuId::all(3).map(CpuId::index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(CpuId::all(MAX_CPUS + 10).len(), MAX_CPUS);
        assert_eq!(
            CpuId::all(MAX_CPUS).last().map(CpuId::index),
            Some(MAX_CPUS - 1)
        );
        assert_eq!(format!("{}", CpuId::new(7).unwrap()), "7");
    }

    #[test]
    fn per_cpu_tables_index_by_cpu_id() {
        let mut t: PerCpu<usize> = PerCpu::default();
        for cpu in CpuId::all(MAX_CPUS) {
            t[cpu] = cpu.index() * 2;
        }
        let last = CpuId::new(MAX_CPUS - 1).unwrap();
        assert_eq!(t[last], (MAX_CPUS - 1) * 2);
        assert!(t.enumerate().all(|(c, &v)| v == c.index() * 2));
        assert_eq!(t.iter().count(), MAX_CPUS);
        static S: PerCpu<u8> = PerCpu::new([const { 3 }; MAX_CPUS]);
        assert_eq!(S[CpuId::BOOT], 3);
    }

    #[test]
    fn other_cpus_come_nearest_first_each_once() {
        let order = |cpu, n| {
            cpus_nearest_first(CpuId::new(cpu).unwrap(), n)
                .map(CpuId::index)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(0, 1), Vec::<usize>::new());
        assert_eq!(order(0, 2), vec![1]);
        assert_eq!(order(1, 2), vec![0]);
        assert_eq!(order(0, 4), vec![1, 3, 2]);
        assert_eq!(order(2, 5), vec![3, 1, 4, 0]);
        // More CPUs than the tables hold: only valid ids come out.
        assert_eq!(order(0, MAX_CPUS + 5).len(), MAX_CPUS - 1);
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
