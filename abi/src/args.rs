//! Program arguments (argv): the block a spawner passes and the image the kernel builds
//! at the top of the new process's stack.
//!
//! **The block** (`OP_ENVIRONMENT_SPAWN_ARGS`, `rdx, r10`): the arguments one after
//! another, each ended by a NUL byte (`b"-v\0file.txt\0"`); an empty block is no
//! arguments. At most [`MAX_ARGS_BYTES`] bytes and [`MAX_ARGS`] arguments; each must be
//! UTF-8 without NUL (the NUL ends it). [`check_block`] is the kernel's check.
//!
//! **The image** the new process finds (written by [`write_image`]): argument 0 is the
//! program's path as spawned, then the block's arguments. At `rsp` on entry (16-byte
//! aligned) sit `argc + 1` little-endian 64-bit pointers (`argv[0..argc]`, then 0),
//! followed by the strings, each NUL-terminated, ending at or below
//! `INITIAL_STACK_POINTER`. The first thread starts with `rdi` = the spawn's number
//! argument, `rsi` = argc, `rdx` = argv (= `rsp`).

use crate::syscall::Error;

/// Largest argument block a spawn accepts, in bytes (`InvalidArgument` above it).
pub const MAX_ARGS_BYTES: usize = 64 * 1024;
/// Most arguments a block may hold (argument 0, the path, not counted).
pub const MAX_ARGS: usize = 4096;

/// Checks an argument block: empty, or NUL-terminated strings of UTF-8. Returns how
/// many arguments it holds. `InvalidArgument` if it is longer than
/// [`MAX_ARGS_BYTES`], does not end with NUL, holds more than [`MAX_ARGS`] arguments
/// or an argument that is not UTF-8.
pub fn check_block(block: &[u8]) -> Result<usize, Error> {
    if block.len() > MAX_ARGS_BYTES {
        return Err(Error::InvalidArgument);
    }
    if block.is_empty() {
        return Ok(0);
    }
    if block.last() != Some(&0) {
        return Err(Error::InvalidArgument);
    }
    let mut count = 0;
    for arg in block[..block.len() - 1].split(|&b| b == 0) {
        core::str::from_utf8(arg).map_err(|_| Error::InvalidArgument)?;
        count += 1;
    }
    if count > MAX_ARGS {
        return Err(Error::InvalidArgument);
    }
    Ok(count)
}

/// Bytes of the image for a path of `path_len` bytes and a checked block of
/// `block_len` bytes holding `count` arguments: the pointer array and the strings,
/// rounded up to 16 so `rsp` stays aligned.
pub const fn image_len(path_len: usize, block_len: usize, count: usize) -> usize {
    let pointers = 8 * (count + 2); // argv[0], the block's, and the closing 0
    (pointers + path_len + 1 + block_len).next_multiple_of(16)
}

/// Writes the image into `out` (exactly [`image_len`] bytes), which will be mapped
/// to end at `top` (16-byte aligned): the pointers, then `path` and a NUL, then the
/// block (already checked: `count` NUL-terminated arguments). Returns `(argc, argv)`:
/// the address `out` starts at is `argv`, which is also the initial `rsp`.
pub fn write_image(
    top: u64,
    path: &[u8],
    block: &[u8],
    count: usize,
    out: &mut [u8],
) -> (u64, u64) {
    let start = top - out.len() as u64;
    let argc = count + 1;
    out.fill(0);
    let mut ptr_at = 0;
    let mut str_at = 8 * (argc + 1);
    let mut put = |s: &[u8], out: &mut [u8]| {
        let addr = start + str_at as u64;
        out[ptr_at..ptr_at + 8].copy_from_slice(&addr.to_le_bytes());
        ptr_at += 8;
        out[str_at..str_at + s.len()].copy_from_slice(s);
        str_at += s.len() + 1; // the NUL: `out` was zeroed
    };
    put(path, out);
    if !block.is_empty() {
        for arg in block[..block.len() - 1].split(|&b| b == 0) {
            put(arg, out);
        }
    }
    (argc as u64, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an image back as the runtime does: follow each pointer to its NUL.
    fn read_back(top: u64, image: &[u8], argc: u64, argv: u64) -> Vec<String> {
        let start = top - image.len() as u64;
        assert_eq!(argv, start);
        assert_eq!(argv % 16, 0, "rsp must stay 16-byte aligned");
        let word = |i: usize| u64::from_le_bytes(image[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(word(argc as usize), 0, "argv[argc] must be 0");
        (0..argc as usize)
            .map(|i| {
                let at = (word(i) - start) as usize;
                let len = image[at..].iter().position(|&b| b == 0).unwrap();
                String::from_utf8(image[at..at + len].to_vec()).unwrap()
            })
            .collect()
    }

    fn roundtrip(path: &str, block: &[u8]) -> Vec<String> {
        let count = check_block(block).unwrap();
        let mut image = vec![0xaa; image_len(path.len(), block.len(), count)];
        let top = 0x7fff_fff0_0000;
        let (argc, argv) = write_image(top, path.as_bytes(), block, count, &mut image);
        assert_eq!(argc as usize, count + 1);
        read_back(top, &image, argc, argv)
    }

    #[test]
    fn arguments_arrive_intact() {
        assert_eq!(roundtrip("hello", b""), ["hello"]);
        assert_eq!(roundtrip("hello", b"a\0"), ["hello", "a"]);
        assert_eq!(
            roundtrip("p", "-v\0\0été ✓\0x y\0".as_bytes()),
            ["p", "-v", "", "été ✓", "x y"]
        );
    }

    #[test]
    fn the_largest_block_fits() {
        let block = vec![0u8; MAX_ARGS]; // MAX_ARGS empty arguments
        assert_eq!(roundtrip("p", &block).len(), MAX_ARGS + 1);
        let mut block = vec![b'x'; MAX_ARGS_BYTES];
        block[MAX_ARGS_BYTES - 1] = 0;
        assert_eq!(roundtrip("p", &block)[1].len(), MAX_ARGS_BYTES - 1);
    }

    #[test]
    fn malformed_blocks_are_invalid() {
        let bad = Err(Error::InvalidArgument);
        assert_eq!(check_block(b"no terminator"), bad);
        assert_eq!(check_block(b"a\0b"), bad);
        assert_eq!(check_block(b"\xff\0"), bad);
        assert_eq!(check_block(b"ok\0\xc3\0"), bad);
        assert_eq!(check_block(&vec![0u8; MAX_ARGS + 1]), bad);
        let mut long = vec![b'x'; MAX_ARGS_BYTES + 1];
        long[MAX_ARGS_BYTES] = 0;
        assert_eq!(check_block(&long), bad);
        assert_eq!(check_block(b"\0"), Ok(1));
    }
}
