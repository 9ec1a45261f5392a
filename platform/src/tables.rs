//! A user page-table hierarchy that owns what it maps: the one place where an owned
//! frame becomes the number in a page-table entry, and where a number an entry held
//! becomes an owned `Frame` again (`take`, the crate's only `Frame::from_raw` for
//! frames of user spaces).
//!
//! `arch::paging::TableBuilder` is the mechanism (entries, walks) and works on physical
//! addresses; `OwnedTables` wraps it so that `vm` sees only owned values: frames go in
//! by value and come out by value (unmapped pages, emptied tables, tear-down), and
//! every page-table frame comes from one typed source (`frame::alloc_user_zeroed`).

use panda_arch::paging::{FrameSource, MapError, PageSize, TableBuilder};

use crate::frame::{self, Frame};

/// Page-table frames: user frames (refused below the kernel's reserve), zeroed by type,
/// owned by the hierarchy from then on.
struct TableFrames;

// SAFETY: each frame is a user frame from the allocator (RAM, reached through the
// HHDM), zeroed by type, and given up by `into_raw`: the hierarchy alone owns it.
unsafe impl FrameSource for TableFrames {
    fn zeroed_frame(&mut self) -> Option<u64> {
        Some(frame::alloc_user_zeroed()?.into_inner().into_raw())
    }
}

/// The frame at `phys`, which an entry of this hierarchy held, owned again.
///
/// # Safety
/// The hierarchy must have owned `phys` (a leaf mapped by `OwnedTables::map`, or a table
/// from `TableFrames`) and have just given it up (unlinked, or torn down), once: nobody
/// else owns it.
unsafe fn take(phys: u64) -> Frame {
    // SAFETY: the caller's guarantee; `phys` came from `Frame::into_raw`.
    unsafe { Frame::from_raw(phys) }
}

/// A user page-table hierarchy and the frames it maps and is made of.
pub(crate) struct OwnedTables(TableBuilder);

impl OwnedTables {
    /// An empty hierarchy for a user space (its PML4 a zeroed user frame, sharing the
    /// kernel half); `None` without a frame or before the kernel tables exist.
    pub(crate) fn new() -> Option<Self> {
        panda_arch::kernel_tables::user_tables(&mut TableFrames).map(Self)
    }

    pub(crate) fn root(&self) -> u64 {
        self.0.root()
    }

    pub(crate) fn translate(&self, virt: u64) -> Option<(u64, u64)> {
        self.0.translate(virt)
    }

    /// The tables on the way to `virt` (`TableBuilder::path`).
    pub(crate) fn path(&self, virt: u64) -> [Option<u64>; 4] {
        self.0.path(virt)
    }

    pub(crate) fn count_user_frames(&self) -> u64 {
        self.0.count_user_frames()
    }

    pub(crate) fn protect(&mut self, page: u64, bits: u64) -> bool {
        self.0.protect(page, bits)
    }

    /// Maps `frame` at the 4 KiB page `page` with leaf `bits`; the hierarchy owns it
    /// from now on. On failure the frame is freed (it is in no table).
    pub(crate) fn map(&mut self, page: u64, frame: Frame, bits: u64) -> Result<(), MapError> {
        let phys = frame.into_raw();
        // SAFETY: `phys` is the frame just given up by `into_raw` (RAM this hierarchy
        // owns from now on, freed on unmap or tear-down), and one 4 KiB page long.
        let result = unsafe {
            self.0
                .map(page, phys, PageSize::Size4K, bits, &mut TableFrames)
        };
        if result.is_err() {
            // SAFETY: the map failed, so no entry holds `phys`: still ours alone.
            drop(unsafe { take(phys) });
        }
        result
    }

    /// Unlinks the mapped pages of `[from, to)` (at most `budget` slots) and hands each
    /// page's frame to `on_page` and each emptied table to `on_table`, owned: the caller
    /// keeps them until the TLBs are flushed. Returns where to continue (`None`: done).
    pub(crate) fn unmap_range(
        &mut self,
        from: u64,
        to: u64,
        budget: usize,
        on_page: &mut dyn FnMut(u64, Frame),
        on_table: &mut dyn FnMut(Frame),
    ) -> Option<u64> {
        self.0.unmap_range(
            from,
            to,
            budget,
            // SAFETY: the walk has just unlinked the frame from this hierarchy, which
            // owned it: it is ours alone again.
            &mut |page, phys| on_page(page, unsafe { take(phys) }),
            // SAFETY: the walk has just unlinked this emptied table, which the
            // hierarchy owned.
            &mut |table| on_table(unsafe { take(table) }),
        )
    }

    /// Frees every frame the hierarchy holds, pages and tables. The caller makes sure
    /// no CPU has it loaded any more.
    pub(crate) fn tear_down(self) {
        self.0.tear_down(
            // SAFETY: tear-down hands over each frame the hierarchy owned, once.
            &mut |leaf| drop(unsafe { take(leaf) }),
            // SAFETY: as for the leaves: each table frame, once.
            &mut |table| drop(unsafe { take(table) }),
        );
    }
}
