//! Memory accounts: what one process (and the processes under it) may hold.
//!
//! Each process has an [`Account`]. A charge (a frame it maps, a page table, the fixed
//! cost of a thread) is added to its account *and to every ancestor's*, so a parent's
//! usage is its own plus its whole subtree's, and a limit bounds the tree below it
//! (hierarchical charging, as Linux's memory cgroups do it). A charge that would take
//! any account of the chain past its limit is refused and leaves every account as it
//! was; the refusal names the account whose limit it hit.
//!
//! Each level is raised with a compare-and-swap that checks the limit, so no account's
//! usage is ever above its limit, even for a moment. A refused charge undoes the levels
//! it had raised below the refusing one; until it has, a concurrent charge on those
//! levels sees them higher than they end, so within one charge of a limit a concurrent
//! charge may be refused that would just have fitted. Nothing here allocates or locks:
//! the fault path charges and uncharges with a few atomic operations per level.
//!
//! Amounts are bytes. `own` is what the process itself holds (its frames and threads,
//! not its children's): the out-of-memory policy compares it between processes.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

/// No limit of its own: bounded only by its ancestors and the machine.
pub const UNLIMITED: u64 = u64::MAX;

/// One process's account.
#[derive(Debug)]
pub struct Account {
    /// Most bytes the account's subtree may hold (`UNLIMITED`: no limit of its own).
    limit: u64,
    /// Bytes charged to this account and every account below it.
    usage: AtomicU64,
    /// Bytes charged to this account itself.
    own: AtomicU64,
    /// Highest `usage` seen.
    peak: AtomicU64,
    /// A number naming the account's owner in reports (the kernel: the pid).
    id: AtomicU64,
    parent: Option<Arc<Account>>,
}

/// A refused charge: the account whose limit it would have passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverLimit {
    /// That account's limit, in bytes.
    pub limit: u64,
    /// That account's id.
    pub id: u64,
    /// Whether it is the charged account itself (otherwise an ancestor's).
    pub own: bool,
}

/// Why an account could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountError {
    /// The child's limit is above its parent's.
    AboveParent,
}

/// A snapshot of an account, as `OP_PROCESS_MEMORY` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub limit: u64,
    pub usage: u64,
    pub own: u64,
    pub peak: u64,
    /// Bytes that can still be charged before this account or an ancestor refuses.
    pub available: u64,
}

impl Account {
    /// An account with no parent (init's, or a kernel-built space's).
    pub fn root(limit: u64) -> Arc<Self> {
        Arc::new(Self::new(limit, None))
    }

    fn new(limit: u64, parent: Option<Arc<Account>>) -> Self {
        Self {
            limit,
            usage: AtomicU64::new(0),
            own: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            id: AtomicU64::new(0),
            parent,
        }
    }

    /// A child of `parent` with `limit` (`None`: the parent's limit). A limit above
    /// the parent's is refused: a child never gets more than its parent has.
    pub fn child(parent: &Arc<Self>, limit: Option<u64>) -> Result<Arc<Self>, AccountError> {
        let limit = match limit {
            None => parent.limit,
            Some(l) if l > parent.limit => return Err(AccountError::AboveParent),
            Some(l) => l,
        };
        Ok(Arc::new(Self::new(limit, Some(parent.clone()))))
    }

    /// Names the account's owner (reports and refusals carry it).
    pub fn set_id(&self, id: u64) {
        self.id.store(id, Ordering::Relaxed);
    }

    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held by this account's subtree.
    pub fn usage(&self) -> u64 {
        self.usage.load(Ordering::Relaxed)
    }

    /// Bytes held by this account alone.
    pub fn own(&self) -> u64 {
        self.own.load(Ordering::Relaxed)
    }

    /// Highest usage so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn parent(&self) -> Option<&Arc<Account>> {
        self.parent.as_ref()
    }

    /// The accounts from this one up to the root.
    fn chain(&self) -> impl Iterator<Item = &Account> {
        core::iter::successors(Some(self), |a| a.parent.as_deref())
    }

    /// Bytes that can still be charged here: the least headroom on the chain.
    pub fn available(&self) -> u64 {
        self.chain()
            .map(|a| a.limit.saturating_sub(a.usage()))
            .min()
            .unwrap_or(0)
    }

    /// Everything at once.
    pub fn snapshot(&self) -> Usage {
        Usage {
            limit: self.limit,
            usage: self.usage(),
            own: self.own(),
            peak: self.peak(),
            available: self.available(),
        }
    }

    /// Charges `bytes` to this account and every ancestor, or to none of them if any
    /// would pass its limit (the first such one, counting upwards, is named).
    pub fn try_charge(&self, bytes: u64) -> Result<(), OverLimit> {
        if bytes == 0 {
            return Ok(());
        }
        for (done, a) in self.chain().enumerate() {
            let raised = a
                .usage
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                    u.checked_add(bytes).filter(|&n| n <= a.limit)
                });
            match raised {
                Ok(before) => {
                    a.peak.fetch_max(before + bytes, Ordering::Relaxed);
                }
                Err(_) => {
                    for b in self.chain().take(done) {
                        b.usage.fetch_sub(bytes, Ordering::AcqRel);
                    }
                    return Err(OverLimit {
                        limit: a.limit,
                        id: a.id(),
                        own: done == 0,
                    });
                }
            }
        }
        self.own.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Gives back `bytes` charged earlier (to this account and every ancestor).
    /// Giving back more than was charged is a bug in the caller: the counts then
    /// stop at zero instead of wrapping, and the error is returned so it can be
    /// reported.
    pub fn uncharge(&self, bytes: u64) -> Result<(), Unbalanced> {
        if bytes == 0 {
            return Ok(());
        }
        let mut result = Ok(());
        let own = self
            .own
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            })
            .unwrap_or(0);
        if own < bytes {
            result = Err(Unbalanced);
        }
        for a in self.chain() {
            let before = a
                .usage
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(bytes))
                })
                .unwrap_or(0);
            if before < bytes {
                result = Err(Unbalanced);
            }
        }
        result
    }
}

/// More was given back than was charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unbalanced;

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    #[test]
    fn a_charge_within_the_limit_counts_and_comes_back() {
        let a = Account::root(16 * K);
        a.try_charge(4 * K).unwrap();
        a.try_charge(12 * K).unwrap();
        assert_eq!(
            (a.usage(), a.own(), a.peak(), a.available()),
            (16 * K, 16 * K, 16 * K, 0)
        );
        a.uncharge(16 * K).unwrap();
        assert_eq!((a.usage(), a.own(), a.peak()), (0, 0, 16 * K));
    }

    #[test]
    fn a_charge_past_the_limit_is_refused_and_changes_nothing() {
        let a = Account::root(8 * K);
        a.set_id(7);
        a.try_charge(4 * K).unwrap();
        assert_eq!(
            a.try_charge(8 * K),
            Err(OverLimit {
                limit: 8 * K,
                id: 7,
                own: true
            })
        );
        assert_eq!((a.usage(), a.own()), (4 * K, 4 * K));
        a.try_charge(4 * K).unwrap();
    }

    #[test]
    fn a_grandchild_counts_against_every_ancestor() {
        let root = Account::root(UNLIMITED);
        let parent = Account::child(&root, Some(64 * K)).unwrap();
        parent.set_id(2);
        let child = Account::child(&parent, None).unwrap();
        assert_eq!(child.limit(), 64 * K);
        let grandchild = Account::child(&child, Some(32 * K)).unwrap();
        grandchild.try_charge(16 * K).unwrap();
        parent.try_charge(40 * K).unwrap();
        assert_eq!(parent.usage(), 56 * K);
        assert_eq!(parent.own(), 40 * K);
        assert_eq!(root.usage(), 56 * K);
        assert_eq!(child.usage(), 16 * K);
        assert_eq!(child.own(), 0);
        // The grandchild is within its own 32 KiB, but the parent has only 8 KiB left.
        assert_eq!(grandchild.available(), 8 * K);
        let refused = grandchild.try_charge(12 * K).unwrap_err();
        assert_eq!(
            refused,
            OverLimit {
                limit: 64 * K,
                id: 2,
                own: false
            }
        );
        // Nothing moved on the way up.
        assert_eq!(
            (
                grandchild.usage(),
                child.usage(),
                parent.usage(),
                root.usage()
            ),
            (16 * K, 16 * K, 56 * K, 56 * K)
        );
        grandchild.uncharge(16 * K).unwrap();
        parent.uncharge(40 * K).unwrap();
        assert_eq!((child.usage(), parent.usage(), root.usage()), (0, 0, 0));
    }

    #[test]
    fn a_child_cannot_have_more_than_its_parent() {
        let parent = Account::root(64 * K);
        assert_eq!(
            Account::child(&parent, Some(64 * K + 1)).unwrap_err(),
            AccountError::AboveParent
        );
        assert_eq!(
            Account::child(&parent, Some(64 * K)).unwrap().limit(),
            64 * K
        );
        let unlimited = Account::root(UNLIMITED);
        assert_eq!(Account::child(&unlimited, None).unwrap().limit(), UNLIMITED);
    }

    #[test]
    fn giving_back_more_than_was_charged_is_reported_not_wrapped() {
        let parent = Account::root(UNLIMITED);
        let a = Account::child(&parent, None).unwrap();
        a.try_charge(4 * K).unwrap();
        assert_eq!(a.uncharge(8 * K), Err(Unbalanced));
        assert_eq!((a.usage(), a.own(), parent.usage()), (0, 0, 0));
    }

    #[test]
    fn concurrent_charges_never_pass_the_limit_and_balance_to_zero() {
        let parent = Account::root(256 * K);
        let children: Vec<_> = (0..4)
            .map(|_| Account::child(&parent, None).unwrap())
            .collect();
        std::thread::scope(|s| {
            for c in &children {
                let parent = &parent;
                s.spawn(move || {
                    let mut held = 0;
                    for i in 0..20_000u64 {
                        if i % 3 == 2 && held > 0 {
                            c.uncharge(4 * K).unwrap();
                            held -= 1;
                        } else if c.try_charge(4 * K).is_ok() {
                            held += 1;
                        }
                        assert!(parent.usage() <= 256 * K);
                    }
                    c.uncharge(held * 4 * K).unwrap();
                });
            }
        });
        assert_eq!(parent.usage(), 0);
        assert!(parent.peak() <= 256 * K);
        assert!(parent.peak() > 0);
    }
}
