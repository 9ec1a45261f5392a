//! TLB shootdown bookkeeping: who may hold an address space's translations, and when a
//! freed frame may be reused.
//!
//! Each address space has a `TlbState`: the set of CPUs running it right now, a
//! generation counter raised by every unmap or protect, and per CPU the generation that
//! CPU last flushed for it. An unmap collects its pages and the frames they mapped in a
//! `FlushBatch`; `commit` raises the generation and names the CPUs to interrupt — only
//! those running the space now (the caller flushes itself). The frames stay inside the
//! resulting `PendingFlush` and come out only from `complete`, given acknowledgements
//! from every target: a freed frame cannot be reused while a CPU that ran the space
//! during the unmap could still translate to it.
//!
//! A CPU that is not running the space may still hold entries for it (with PCID, entries
//! survive a CR3 switch). It cannot use them until it switches back, and `on_switch` then
//! sees that its flushed generation is stale and demands a flush first. Without PCID
//! every CR3 switch flushes anyway.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{CpuId, PerCpu, PhysFrame};

/// CPUs tracked (`crate::MAX_CPUS`).
pub use crate::MAX_CPUS;
/// Above this many pages, flush the whole TLB instead of page by page.
pub const FULL_FLUSH_THRESHOLD: usize = 32;

/// A set of CPUs, updated atomically.
pub struct CpuSet([AtomicU64; MAX_CPUS / 64]);

impl Default for CpuSet {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuSet {
    pub const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; MAX_CPUS / 64])
    }

    pub fn insert(&self, cpu: CpuId) {
        self.0[cpu.index() / 64].fetch_or(1 << (cpu.index() % 64), Ordering::SeqCst);
    }

    pub fn remove(&self, cpu: CpuId) {
        self.0[cpu.index() / 64].fetch_and(!(1 << (cpu.index() % 64)), Ordering::SeqCst);
    }

    pub fn contains(&self, cpu: CpuId) -> bool {
        self.0[cpu.index() / 64].load(Ordering::SeqCst) & (1 << (cpu.index() % 64)) != 0
    }

    /// The members now, as a plain bitmap.
    pub fn snapshot(&self) -> CpuMask {
        CpuMask(core::array::from_fn(|i| self.0[i].load(Ordering::SeqCst)))
    }
}

/// A plain (non-atomic) set of CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuMask([u64; MAX_CPUS / 64]);

impl CpuMask {
    pub fn insert(&mut self, cpu: CpuId) {
        self.0[cpu.index() / 64] |= 1 << (cpu.index() % 64);
    }

    pub fn remove(&mut self, cpu: CpuId) {
        self.0[cpu.index() / 64] &= !(1 << (cpu.index() % 64));
    }

    pub fn contains(&self, cpu: CpuId) -> bool {
        self.0[cpu.index() / 64] & (1 << (cpu.index() % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Whether every member of `other` is in `self`.
    pub fn covers(&self, other: &CpuMask) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & b == *b)
    }

    pub fn iter(&self) -> impl Iterator<Item = CpuId> + '_ {
        CpuId::all(MAX_CPUS).filter(|&c| self.contains(c))
    }
}

/// One address space's TLB state.
pub struct TlbState {
    active: CpuSet,
    generation: AtomicU64,
    flushed: PerCpu<AtomicU64>,
}

impl Default for TlbState {
    fn default() -> Self {
        Self::new()
    }
}

/// What a CR3 switch must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchFlush {
    /// This CPU's entries for the space may be stale: flush them.
    Flush,
    /// Entries kept from earlier (with PCID) are current: no flush needed.
    Keep,
}

impl TlbState {
    pub const fn new() -> Self {
        Self {
            active: CpuSet::new(),
            generation: AtomicU64::new(1),
            flushed: PerCpu::new([const { AtomicU64::new(0) }; MAX_CPUS]),
        }
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// CPU `cpu` switches to this space. Returns whether it must flush, and records
    /// that after this switch it is current.
    pub fn on_switch_in(&self, cpu: CpuId) -> SwitchFlush {
        self.active.insert(cpu);
        let now = self.generation.load(Ordering::SeqCst);
        let seen = self.flushed[cpu].swap(now, Ordering::SeqCst);
        if seen < now {
            SwitchFlush::Flush
        } else {
            SwitchFlush::Keep
        }
    }

    /// CPU `cpu` switches away from this space.
    pub fn on_switch_out(&self, cpu: CpuId) {
        self.active.remove(cpu);
    }

    /// CPUs running the space now.
    pub fn active(&self) -> CpuMask {
        self.active.snapshot()
    }

    /// A target acknowledges a flush of generation `generation`.
    pub fn acknowledge(&self, cpu: CpuId, generation: u64) {
        self.flushed[cpu].fetch_max(generation, Ordering::SeqCst);
    }
}

/// Which entries to flush.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushScope {
    Pages(Vec<u64>),
    Everything,
}

/// Pages being unmapped and the frames they mapped. `F` is the frame type: a number
/// here (host tests), an owning frame in the kernel, so a frame leaves the batch only
/// through `PendingFlush::complete`.
pub struct FlushBatch<F = PhysFrame> {
    pages: Vec<u64>,
    full: bool,
    frames: Vec<F>,
}

impl<F> Default for FlushBatch<F> {
    fn default() -> Self {
        Self {
            pages: Vec::new(),
            full: false,
            frames: Vec::new(),
        }
    }
}

impl FlushBatch {
    /// An empty batch of frame numbers (`default()` makes one of any frame type).
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F> FlushBatch<F> {
    /// An empty batch with room for `frames` frames (allocated now, so that filling it
    /// under a lock allocates nothing; more still fit, by growing).
    pub fn with_capacity(frames: usize) -> Self {
        Self {
            pages: Vec::with_capacity(FULL_FLUSH_THRESHOLD + 1),
            full: false,
            frames: Vec::with_capacity(frames),
        }
    }

    /// Records an unmapped page and the frame it mapped (to free after the flush).
    pub fn add(&mut self, page: u64, frame: Option<F>) {
        if !self.full {
            self.pages.push(page);
            if self.pages.len() > FULL_FLUSH_THRESHOLD {
                self.full = true;
                self.pages = Vec::new();
            }
        }
        if let Some(f) = frame {
            self.frames.push(f);
        }
    }

    /// Raises the space's generation and decides who flushes what. `me` is the calling
    /// CPU (it flushes locally if it runs the space; it is never a target).
    pub fn commit(self, state: &TlbState, me: CpuId) -> PendingFlush<F> {
        let generation = state.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let mut targets = state.active();
        let local = targets.contains(me);
        targets.remove(me);
        if local {
            state.acknowledge(me, generation);
        }
        PendingFlush {
            generation,
            targets,
            local,
            scope: if self.full {
                FlushScope::Everything
            } else {
                FlushScope::Pages(self.pages)
            },
            frames: self.frames,
        }
    }
}

/// A committed unmap whose frames wait for every target's flush.
pub struct PendingFlush<F = PhysFrame> {
    generation: u64,
    targets: CpuMask,
    local: bool,
    scope: FlushScope,
    frames: Vec<F>,
}

impl<F> PendingFlush<F> {
    /// CPUs to interrupt (IPI / cross-CPU call).
    pub fn targets(&self) -> CpuMask {
        self.targets
    }

    /// Whether the calling CPU must flush itself too.
    pub fn flush_locally(&self) -> bool {
        self.local
    }

    /// What each target flushes.
    pub fn scope(&self) -> &FlushScope {
        &self.scope
    }

    /// The generation targets acknowledge.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The frames, once `acked` covers every target; otherwise the pending flush back
    /// (boxed: it is large, and this path is the rare one).
    pub fn complete(self, acked: &CpuMask) -> Result<Vec<F>, Box<Self>> {
        if acked.covers(&self.targets) {
            Ok(self.frames)
        } else {
            Err(Box::new(self))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_id(i: usize) -> CpuId {
        CpuId::new(i).unwrap()
    }

    fn frame(n: u64) -> PhysFrame {
        PhysFrame(n * 4096)
    }

    #[test]
    fn only_cpus_running_the_space_are_interrupted() {
        let s = TlbState::new();
        s.on_switch_in(cpu_id(1));
        s.on_switch_in(cpu_id(2));
        s.on_switch_in(cpu_id(5));
        s.on_switch_out(cpu_id(2));
        let mut b = FlushBatch::new();
        b.add(0x40_0000, Some(frame(7)));
        let p = b.commit(&s, cpu_id(1));
        assert_eq!(
            p.targets().iter().map(CpuId::index).collect::<Vec<_>>(),
            vec![5],
            "cpu1 flushes itself, cpu2 left"
        );
        assert!(p.flush_locally());
        assert_eq!(p.scope(), &FlushScope::Pages(vec![0x40_0000]));
    }

    #[test]
    fn frames_are_held_until_every_target_acknowledges() {
        let s = TlbState::new();
        for cpu in [0, 3, 4] {
            s.on_switch_in(cpu_id(cpu));
        }
        let mut b = FlushBatch::new();
        b.add(0x1000, Some(frame(1)));
        b.add(0x2000, Some(frame(2)));
        let p = b.commit(&s, cpu_id(0));
        let mut acked = CpuMask::default();
        acked.insert(cpu_id(3));
        let p = match p.complete(&acked) {
            Ok(_) => panic!("frames released before cpu4 flushed"),
            Err(p) => p,
        };
        acked.insert(cpu_id(4));
        let frames = p.complete(&acked).ok().expect("all targets acknowledged");
        assert_eq!(frames, vec![frame(1), frame(2)]);
    }

    #[test]
    fn big_batches_flush_everything() {
        let s = TlbState::new();
        let mut b = FlushBatch::new();
        for i in 0..=FULL_FLUSH_THRESHOLD as u64 {
            b.add(i * 4096, Some(frame(i)));
        }
        let p = b.commit(&s, cpu_id(0));
        assert_eq!(p.scope(), &FlushScope::Everything);
        assert!(p.targets().is_empty());
        assert_eq!(
            p.complete(&CpuMask::default()).ok().map(|f| f.len()),
            Some(FULL_FLUSH_THRESHOLD + 1)
        );
    }

    #[test]
    fn a_cpu_that_ran_the_space_earlier_flushes_when_it_returns() {
        let s = TlbState::new();
        assert_eq!(s.on_switch_in(cpu_id(2)), SwitchFlush::Flush, "first entry");
        s.on_switch_out(cpu_id(2));
        assert_eq!(
            s.on_switch_in(cpu_id(2)),
            SwitchFlush::Keep,
            "nothing changed meanwhile"
        );
        s.on_switch_out(cpu_id(2));
        // An unmap while cpu2 is away: cpu2 is not interrupted ...
        let p = FlushBatch::new().commit(&s, cpu_id(0));
        assert!(!p.targets().contains(cpu_id(2)));
        // ... but must flush when it comes back.
        assert_eq!(s.on_switch_in(cpu_id(2)), SwitchFlush::Flush);
        assert_eq!(s.on_switch_in(cpu_id(2)), SwitchFlush::Keep);
    }

    #[test]
    fn acknowledged_targets_do_not_flush_again_on_switch() {
        let s = TlbState::new();
        s.on_switch_in(cpu_id(1));
        let p = FlushBatch::new().commit(&s, cpu_id(0));
        s.acknowledge(cpu_id(1), p.generation());
        s.on_switch_out(cpu_id(1));
        assert_eq!(s.on_switch_in(cpu_id(1)), SwitchFlush::Keep);
    }

    /// `CpuSet` and `CpuMask` against a plain set, over all 256 CPUs (every word and
    /// every bit position), under random inserts and removes.
    #[test]
    fn cpu_sets_match_a_plain_set() {
        let set = CpuSet::new();
        let mut mask = CpuMask::default();
        let mut model = std::collections::BTreeSet::new();
        assert!(mask.is_empty() && set.snapshot().is_empty());
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cpu = cpu_id((x % MAX_CPUS as u64) as usize);
            if x >> 40 & 1 == 0 {
                set.insert(cpu);
                mask.insert(cpu);
                model.insert(cpu);
            } else {
                set.remove(cpu);
                mask.remove(cpu);
                model.remove(&cpu);
            }
            assert_eq!(set.contains(cpu), model.contains(&cpu), "step {step}");
            assert_eq!(mask.contains(cpu), model.contains(&cpu), "step {step}");
            if step % 100 == 0 {
                let members: Vec<usize> = model.iter().map(|c: &CpuId| c.index()).collect();
                assert_eq!(
                    mask.iter().map(CpuId::index).collect::<Vec<_>>(),
                    members,
                    "step {step}"
                );
                assert_eq!(set.snapshot(), mask, "step {step}");
                assert_eq!(mask.is_empty(), model.is_empty());
                for c in CpuId::all(MAX_CPUS) {
                    assert_eq!(set.contains(c), model.contains(&c), "step {step} cpu {c}");
                }
            }
        }
        for cpu in [0, 63, 64, 127, 128, 255] {
            let mut one = CpuMask::default();
            one.insert(cpu_id(cpu));
            assert_eq!(one.iter().map(CpuId::index).collect::<Vec<_>>(), vec![cpu]);
            assert!(!one.is_empty());
            one.remove(cpu_id(cpu));
            assert!(one.is_empty());
        }
    }

    #[test]
    fn covers_means_every_member_of_the_other() {
        let mask = |cpus: &[usize]| {
            let mut m = CpuMask::default();
            for &c in cpus {
                m.insert(cpu_id(c));
            }
            m
        };
        assert!(mask(&[]).covers(&mask(&[])));
        assert!(mask(&[1, 70, 200]).covers(&mask(&[70, 200])));
        assert!(mask(&[1, 70, 200]).covers(&mask(&[])));
        assert!(!mask(&[1, 70]).covers(&mask(&[70, 200])));
        assert!(!mask(&[]).covers(&mask(&[255])));
        assert!(!mask(&[64]).covers(&mask(&[65])));
    }

    /// Up to `FULL_FLUSH_THRESHOLD` pages are flushed one by one, one more flushes
    /// everything; frames are kept either way, in order.
    #[test]
    fn the_full_flush_threshold_is_exact() {
        let s = TlbState::new();
        for n in [0, 1, FULL_FLUSH_THRESHOLD, FULL_FLUSH_THRESHOLD + 1, 100] {
            let mut b = FlushBatch::new();
            let pages: Vec<u64> = (0..n as u64).map(|i| 0x40_0000 + i * 4096).collect();
            for (i, &p) in pages.iter().enumerate() {
                b.add(p, (i % 2 == 0).then(|| frame(i as u64)));
            }
            let p = b.commit(&s, cpu_id(0));
            if n > FULL_FLUSH_THRESHOLD {
                assert_eq!(p.scope(), &FlushScope::Everything, "{n} pages");
            } else {
                assert_eq!(p.scope(), &FlushScope::Pages(pages), "{n} pages");
            }
            let frames = p.complete(&CpuMask::default()).ok().unwrap();
            let want: Vec<PhysFrame> = (0..n as u64).step_by(2).map(frame).collect();
            assert_eq!(frames, want);
        }
    }

    /// Each commit raises the generation by one; a CPU running the space flushes
    /// locally and counts as having flushed, one that does not, not.
    #[test]
    fn generations_rise_by_one_and_local_flushes_are_acknowledged() {
        let s = TlbState::new();
        let g0 = s.generation();
        assert_eq!(g0, 1);
        s.on_switch_in(cpu_id(3));
        let p = FlushBatch::new().commit(&s, cpu_id(3));
        assert_eq!((p.generation(), s.generation()), (g0 + 1, g0 + 1));
        assert!(p.flush_locally() && p.targets().is_empty());
        let q = FlushBatch::new().commit(&s, cpu_id(4));
        assert_eq!(q.generation(), g0 + 2);
        assert!(!q.flush_locally());
        assert_eq!(
            q.targets().iter().map(CpuId::index).collect::<Vec<_>>(),
            vec![3]
        );
        // CPU 3 acknowledges the first commit only: it is still stale.
        s.acknowledge(cpu_id(3), p.generation());
        s.on_switch_out(cpu_id(3));
        assert_eq!(s.on_switch_in(cpu_id(3)), SwitchFlush::Flush);
        s.on_switch_out(cpu_id(3));
        // An older acknowledgement never lowers what a CPU flushed.
        s.acknowledge(cpu_id(3), g0);
        assert_eq!(s.on_switch_in(cpu_id(3)), SwitchFlush::Keep);
        assert_eq!(
            s.active().iter().map(CpuId::index).collect::<Vec<_>>(),
            vec![3]
        );
        s.on_switch_out(cpu_id(3));
        assert!(s.active().is_empty());
    }
}
