//! User addresses as checked values: `UserAddr` (one address in the user half) and
//! `UserRange` (a span of bytes that lies wholly in it).
//!
//! A system call's pointer arguments arrive as raw `u64`s. The system-call boundary
//! (`kernel/src/process/syscalls.rs`) turns each into one of these types once, and
//! everything below it (`AddressSpace::read_user`/`write_user`/`fault_in`,
//! `UserTables::read`/`write`, `UserCopy`) takes the typed value: the bounds are a
//! property of the type, not a check each layer repeats or forgets.
//!
//! The user half is `[0, USER_SPACE_END)` (`panda_abi`; arch's `USER_END`, 2^47): the
//! lower canonical half, so a `UserAddr` is always canonical and never a kernel
//! address. The typed values say only *where*; whether the user may reach the bytes
//! (mapped, the rights) is still the page tables' and the region bookkeeping's answer.
//!
//! The invariants, which the constructors check and nothing else can break (the fields
//! are private and every method keeps them):
//! - `UserAddr(a)`: `a < USER_SPACE_END`;
//! - `UserRange { start, len }`: `start + len` does not overflow and
//!   `start + len <= USER_SPACE_END`. So every byte `start..start + len` is a
//!   `UserAddr`, `end()` never overflows, and a non-empty range starts at a `UserAddr`.
//!   An empty range is allowed (a call that copies zero bytes succeeds today) and may
//!   start at `USER_SPACE_END` itself, as before: no byte is reached.
//!
//! Worked cases (the system calls' `BadAddress` rules in these terms):
//! `UserRange::new(0x1000, 8)` is `Some`; `UserRange::new(END - 8, 8)` is `Some` (ends
//! exactly at the end); `UserRange::new(END - 8, 9)` is `None` (one byte into the
//! non-canonical hole); `UserRange::new(u64::MAX, 2)` is `None` (the sum overflows);
//! `UserRange::new(END, 0)` is `Some` and empty; `UserRange::new(END + 1, 0)` is `None`
//! (a kernel or non-canonical pointer is refused even for zero bytes).

use crate::{page_floor, page_offset, PAGE_SIZE, USER_END as END};

/// An address in the user half: below `USER_SPACE_END`, so canonical and never a
/// kernel address. (Not necessarily mapped.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserAddr(u64);

impl UserAddr {
    /// `addr` if it lies in the user half (`addr < USER_SPACE_END`).
    pub const fn new(addr: u64) -> Option<Self> {
        if addr < END {
            Some(Self(addr))
        } else {
            None
        }
    }

    /// The address as a number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The start of the page holding this address (a user address too).
    pub const fn page(self) -> Self {
        Self(page_floor(self.0))
    }

    /// Bytes from this address to the end of its page (1 to `PAGE_SIZE`).
    pub const fn to_page_end(self) -> u64 {
        PAGE_SIZE - page_offset(self.0)
    }
}

impl core::fmt::LowerHex for UserAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// `len` bytes from `start`, all in the user half: `start + len <= USER_SPACE_END`,
/// without overflow. May be empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserRange {
    start: u64,
    len: u64,
}

impl UserRange {
    /// `[addr, addr + len)` if it lies wholly in the user half (and the sum does not
    /// overflow). An empty range at `USER_SPACE_END` is allowed; past it, refused.
    pub const fn new(addr: u64, len: u64) -> Option<Self> {
        match addr.checked_add(len) {
            Some(end) if end <= END => Some(Self { start: addr, len }),
            _ => None,
        }
    }

    /// The first byte's address as a number (may equal `USER_SPACE_END` when empty).
    pub const fn start(self) -> u64 {
        self.start
    }

    /// The first byte, unless the range is empty.
    pub const fn first(self) -> Option<UserAddr> {
        if self.len == 0 {
            None
        } else {
            // Non-empty: start < start + len <= END.
            Some(UserAddr(self.start))
        }
    }

    /// Its length in bytes.
    pub const fn len(self) -> u64 {
        self.len
    }

    /// Whether it holds no byte.
    pub const fn is_empty(self) -> bool {
        self.len == 0
    }

    /// One past its last byte (`<= USER_SPACE_END`; never overflows).
    pub const fn end(self) -> u64 {
        self.start + self.len
    }

    /// The first `n` bytes (all of it if `n` is longer) and the rest: two user
    /// ranges, since both lie inside this one.
    pub const fn split_at(self, n: u64) -> (Self, Self) {
        let n = if n < self.len { n } else { self.len };
        (
            Self {
                start: self.start,
                len: n,
            },
            Self {
                start: self.start + n,
                len: self.len - n,
            },
        )
    }

    /// The first piece of the range that lies in one page (empty if the range is).
    pub const fn first_piece(self) -> Self {
        let in_page = PAGE_SIZE - page_offset(self.start);
        self.split_at(in_page).0
    }

    /// Whether the whole range lies in `[from, to)` (an empty range: whether its start
    /// does, or is `to`).
    pub const fn within(self, from: u64, to: u64) -> bool {
        from <= self.start && self.end() <= to
    }
}
