//! The initrd: a ustar archive of user programs and files, passed as a boot module
//! (QEMU `-initrd` on the PVH path, a Limine module otherwise), read in place with
//! `tar-no-std`. Module memory is `KernelAndModules` in the memory map, so the frame
//! allocator never hands it out: `panda_arch` hands the module over as a
//! `&'static [u8]` (`Module::bytes`), valid for the kernel's lifetime.

use tar_no_std::TarArchiveRef;

use crate::boot::BootInfo;

static ARCHIVE: spin::Once<TarArchiveRef<'static>> = spin::Once::new();

/// Longest path accepted (ustar names are at most 100 bytes, 255 with a prefix).
pub const MAX_PATH: usize = 255;

/// Finds the initrd among the boot modules (the one named `initrd`, else the first)
/// and checks the archive. Returns the number of files, or why there is none.
pub fn init(boot: &BootInfo) -> Result<usize, &'static str> {
    let module = boot
        .modules()
        .find(|m| m.name.as_str().ends_with("initrd") || m.name.as_str().ends_with(".tar"))
        .or_else(|| boot.modules().next())
        .ok_or("no boot module")?;
    let bytes = module
        .bytes()
        .ok_or("the module is not mapped yet (before the kernel's page tables)")?;
    let archive = TarArchiveRef::new(bytes).map_err(|_| "the module is not a ustar archive")?;
    let files = archive.entries().count();
    ARCHIVE.call_once(|| archive);
    Ok(files)
}

/// `path` without a leading `/` or `./`.
fn normalise(path: &str) -> &str {
    path.trim_start_matches("./").trim_start_matches('/')
}

/// The contents of the file at `path`.
pub fn find(path: &str) -> Option<&'static [u8]> {
    let want = normalise(path);
    if want.is_empty() {
        return None;
    }
    ARCHIVE.get()?.entries().find_map(|entry| {
        let name = entry.filename();
        let name = name.as_str().ok()?;
        (normalise(name) == want).then(|| entry.data())
    })
}

/// Every file: name and size.
pub fn for_each_file(mut f: impl FnMut(&str, usize)) {
    if let Some(archive) = ARCHIVE.get() {
        for entry in archive.entries() {
            if let Ok(name) = entry.filename().as_str() {
                f(normalise(name), entry.size());
            }
        }
    }
}
