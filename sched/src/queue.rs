//! An intrusive FIFO of tasks: push and pop move `Arc`s, never allocate.
//!
//! Each task has one `next` link, so it can be in one queue at a time; the task state
//! machine (`task.rs`) guarantees that.

use alloc::sync::Arc;

use crate::task::Task;

/// A FIFO of tasks linked through `Task::next`.
pub(crate) struct TaskQueue {
    head: Option<Arc<Task>>,
    tail: Option<Arc<Task>>,
    len: usize,
}

impl TaskQueue {
    pub(crate) const fn new() -> Self {
        Self {
            head: None,
            tail: None,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push_back(&mut self, task: Arc<Task>) {
        *task.next.lock() = None;
        match self.tail.take() {
            Some(tail) => *tail.next.lock() = Some(task.clone()),
            None => self.head = Some(task.clone()),
        }
        self.tail = Some(task);
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<Arc<Task>> {
        let head = self.head.take()?;
        self.head = head.next.lock().take();
        if self.head.is_none() {
            self.tail = None;
        }
        self.len -= 1;
        Some(head)
    }
}
