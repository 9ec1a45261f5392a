//! An async lock: a task that finds it held waits as a future (`Pending`, woken when
//! its turn comes) instead of spinning a CPU, so it may be held across `.await` — for a
//! whole system call that yields between bounded pieces of work (the console, for one
//! user log call).
//!
//! - **First come, first served**: releasing hands the lock straight to the oldest
//!   waiter (it stays held meanwhile, so a newcomer cannot barge in between).
//! - **Nothing left behind by a dropped waiter**: a waiting `Acquire` that is dropped
//!   (its task ended, or it lost a race against a kill) leaves the queue; one dropped
//!   after the lock was handed to it passes the lock on. The queue's memory goes back
//!   when it empties.
//!
//! The state sits behind a plain spin lock held only for a few instructions, never
//! across a wake-up (wakers are called after it is released). It is not taken from
//! interrupt handlers.

use alloc::collections::VecDeque;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

use spin::Mutex;

/// A lock whose waiters wait as futures.
pub struct AsyncLock {
    state: Mutex<State>,
}

struct State {
    held: bool,
    /// The ticket of the next waiter.
    next: u64,
    /// Waiters in arrival order: ticket and waker.
    waiters: VecDeque<(u64, Waker)>,
    /// The waiter the lock was handed to, until it polls (the lock stays held).
    handed: Option<u64>,
}

impl Default for AsyncLock {
    fn default() -> Self {
        Self::new()
    }
}

impl AsyncLock {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                held: false,
                next: 0,
                waiters: VecDeque::new(),
                handed: None,
            }),
        }
    }

    /// A future that completes with the lock held (release: drop the guard).
    pub fn lock(&self) -> Acquire<'_> {
        Acquire {
            lock: self,
            ticket: None,
            done: false,
        }
    }

    /// The lock if it is free and nobody waits for it.
    pub fn try_lock(&self) -> Option<AsyncLockGuard<'_>> {
        let mut state = self.state.lock();
        if state.held {
            return None;
        }
        state.held = true;
        Some(AsyncLockGuard { lock: self })
    }

    /// Whether a task holds the lock (or it is being handed to a waiter).
    pub fn is_locked(&self) -> bool {
        self.state.lock().held
    }

    /// Tasks waiting for the lock.
    pub fn waiters(&self) -> usize {
        self.state.lock().waiters.len()
    }

    /// Hands the lock to the oldest waiter, or frees it.
    fn release(&self) {
        let (wake, emptied) = {
            let mut state = self.state.lock();
            match state.waiters.pop_front() {
                Some((ticket, waker)) => {
                    state.handed = Some(ticket);
                    (Some(waker), None)
                }
                None => {
                    state.held = false;
                    state.handed = None;
                    // Give the queue's memory back (kernel-heap checks compare with a
                    // baseline).
                    (None, Some(core::mem::take(&mut state.waiters)))
                }
            }
        };
        drop(emptied);
        if let Some(waker) = wake {
            waker.wake();
        }
    }
}

/// `AsyncLock::lock`'s future.
pub struct Acquire<'a> {
    lock: &'a AsyncLock,
    /// Our place in the queue, once we had to wait.
    ticket: Option<u64>,
    /// The lock was returned to us (the guard owns it now).
    done: bool,
}

impl<'a> Future for Acquire<'a> {
    type Output = AsyncLockGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AsyncLockGuard<'a>> {
        let lock = self.lock;
        let mut state = lock.state.lock();
        let old_waker = match self.ticket {
            None if !state.held => {
                state.held = true;
                drop(state);
                self.done = true;
                return Poll::Ready(AsyncLockGuard { lock });
            }
            None => {
                let ticket = state.next;
                state.next += 1;
                state.waiters.push_back((ticket, cx.waker().clone()));
                self.ticket = Some(ticket);
                None
            }
            Some(ticket) if state.handed == Some(ticket) => {
                state.handed = None;
                drop(state);
                self.done = true;
                return Poll::Ready(AsyncLockGuard { lock });
            }
            Some(ticket) => state
                .waiters
                .iter_mut()
                .find(|(t, _)| *t == ticket)
                .filter(|(_, w)| !w.will_wake(cx.waker()))
                .map(|(_, w)| core::mem::replace(w, cx.waker().clone())),
        };
        drop(state);
        drop(old_waker);
        Poll::Pending
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.filter(|_| !self.done) else {
            return;
        };
        let mut state = self.lock.state.lock();
        if state.handed == Some(ticket) {
            // Handed to us, but we are gone: pass it on.
            state.handed = None;
            drop(state);
            self.lock.release();
            return;
        }
        let removed = state
            .waiters
            .iter()
            .position(|(t, _)| *t == ticket)
            .and_then(|i| state.waiters.remove(i));
        let emptied = if state.waiters.is_empty() {
            Some(core::mem::take(&mut state.waiters))
        } else {
            None
        };
        drop(state);
        drop((removed, emptied));
    }
}

/// The lock, held until this is dropped.
pub struct AsyncLockGuard<'a> {
    lock: &'a AsyncLock,
}

impl Drop for AsyncLockGuard<'_> {
    fn drop(&mut self) {
        self.lock.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn poll<'a>(f: &mut Pin<Box<Acquire<'a>>>, w: &Waker) -> Option<AsyncLockGuard<'a>> {
        match f.as_mut().poll(&mut Context::from_waker(w)) {
            Poll::Ready(g) => Some(g),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_free_lock_is_taken_at_once_and_freed_by_the_guard() {
        let lock = AsyncLock::new();
        let (_, w) = waker();
        let mut a = Box::pin(lock.lock());
        let g = poll(&mut a, &w).expect("free lock");
        assert!(lock.is_locked());
        assert!(lock.try_lock().is_none());
        drop(g);
        assert!(!lock.is_locked());
        assert!(lock.try_lock().is_some());
    }

    #[test]
    fn waiters_wait_without_spinning_and_are_served_in_order() {
        let lock = AsyncLock::new();
        let first = lock.try_lock().unwrap();
        let (cb, wb) = waker();
        let (cc, wc) = waker();
        let mut b = Box::pin(lock.lock());
        let mut c = Box::pin(lock.lock());
        assert!(poll(&mut b, &wb).is_none());
        assert!(poll(&mut c, &wc).is_none());
        assert_eq!(lock.waiters(), 2);
        // Polled again before its turn: still waiting, no extra queue entry.
        assert!(poll(&mut c, &wc).is_none());
        assert_eq!(lock.waiters(), 2);
        drop(first);
        assert_eq!(cb.0.load(Ordering::SeqCst), 1, "the oldest waiter is woken");
        assert_eq!(cc.0.load(Ordering::SeqCst), 0);
        // Handed over: a newcomer cannot barge in before b polls.
        assert!(lock.try_lock().is_none());
        let (_, wd) = waker();
        let mut d = Box::pin(lock.lock());
        assert!(poll(&mut d, &wd).is_none());
        assert!(poll(&mut c, &wc).is_none(), "c is not next");
        let gb = poll(&mut b, &wb).expect("b was handed the lock");
        drop(gb);
        assert_eq!(cc.0.load(Ordering::SeqCst), 1);
        let gc = poll(&mut c, &wc).expect("then c");
        drop(gc);
        let gd = poll(&mut d, &wd).expect("then d");
        drop(gd);
        assert!(!lock.is_locked());
        assert_eq!(lock.waiters(), 0);
    }

    #[test]
    fn a_dropped_waiter_leaves_the_queue() {
        let lock = AsyncLock::new();
        let held = lock.try_lock().unwrap();
        let (_, w) = waker();
        let mut a = Box::pin(lock.lock());
        assert!(poll(&mut a, &w).is_none());
        assert_eq!(lock.waiters(), 1);
        drop(a);
        assert_eq!(lock.waiters(), 0);
        assert_eq!(lock.state.lock().waiters.capacity(), 0, "memory back");
        drop(held);
        assert!(!lock.is_locked(), "nobody left to hand it to");
    }

    #[test]
    fn a_waiter_dropped_after_the_hand_over_passes_the_lock_on() {
        let lock = AsyncLock::new();
        let held = lock.try_lock().unwrap();
        let (_, wa) = waker();
        let (cb, wb) = waker();
        let mut a = Box::pin(lock.lock());
        let mut b = Box::pin(lock.lock());
        assert!(poll(&mut a, &wa).is_none());
        assert!(poll(&mut b, &wb).is_none());
        drop(held); // handed to a
        drop(a); // which is gone: b's turn
        assert_eq!(cb.0.load(Ordering::SeqCst), 1);
        let g = poll(&mut b, &wb).expect("b");
        drop(g);
        assert!(!lock.is_locked());
        // Alone: handed over, dropped, free again.
        let held = lock.try_lock().unwrap();
        let mut c = Box::pin(lock.lock());
        assert!(poll(&mut c, &wa).is_none());
        drop(held);
        drop(c);
        assert!(!lock.is_locked());
        assert_eq!(lock.state.lock().waiters.capacity(), 0);
    }

    /// Threads as tasks: every lock is held by one at a time and everyone gets it.
    #[test]
    fn threads_never_hold_it_together() {
        let lock = Arc::new(AsyncLock::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (lock, inside, total) = (lock.clone(), inside.clone(), total.clone());
                std::thread::spawn(move || {
                    let (_, w) = waker();
                    for _ in 0..2000 {
                        let mut f = Box::pin(lock.lock());
                        let g = loop {
                            if let Some(g) = poll(&mut f, &w) {
                                break g;
                            }
                            std::thread::yield_now();
                        };
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        total.fetch_add(1, Ordering::SeqCst);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(g);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(total.load(Ordering::SeqCst), 8000);
        assert!(!lock.is_locked());
        assert_eq!(lock.waiters(), 0);
    }
}
