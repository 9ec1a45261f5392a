//! The ELF loader: a checked load plan (`panda_mm::elf`) turned into a new address
//! space whose segment pages hold the file's bytes.

use super::*;
use panda_arch::PAGE_SIZE;

/// Loads `file` into a new address space: each segment's file bytes are copied into
/// zeroed frames mapped with the segment's rights; the rest (BSS) is demand-zero. The
/// space's frames are charged to `account`.
pub fn load(
    file: &[u8],
    account: Arc<panda_mm::account::Account>,
) -> Result<(Arc<AddressSpace>, u64), SpawnError> {
    let plan = elf::plan(file).map_err(SpawnError::BadElf)?;
    let space = AddressSpace::with_account(account).map_err(|_| SpawnError::OutOfMemory)?;
    for seg in &plan.segments {
        let (start, end) = seg.pages();
        space
            .add_segment(start, end, seg.rights)
            .map_err(|_| SpawnError::BadElf(ElfError::BadSegment("segment refused")))?;
        let (file_start, file_end) = (seg.vaddr, seg.vaddr + seg.file_size);
        let mut page = start;
        while page < file_end {
            let zeroed =
                panda_platform::frame::alloc_user_zeroed().ok_or(SpawnError::OutOfMemory)?;
            // The part of [file_start, file_end) on this page.
            let from = file_start.max(page);
            let to = file_end.min(page + PAGE_SIZE);
            let bytes = if from < to {
                let at = (seg.file_offset + (from - seg.vaddr)) as usize;
                &file[at..at + (to - from) as usize]
            } else {
                &[]
            };
            let frame = zeroed.fill((from.min(to) - page) as usize, bytes);
            if let Err(e) = space.map_filled(page, frame, seg.rights) {
                return Err(match e {
                    MmError::OutOfMemory => SpawnError::OutOfMemory,
                    _ => SpawnError::BadElf(ElfError::BadSegment("segment refused")),
                });
            }
            page += PAGE_SIZE;
        }
    }
    Ok((space, plan.entry))
}
