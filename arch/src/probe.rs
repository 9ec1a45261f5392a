//! Memory accesses that may fault, and the exception table that makes them safe.
//!
//! Each probe is a tiny assembly routine whose one faulting instruction has an entry in
//! `.panda_extable` (instruction address, fixup address). When a trap hits a listed
//! instruction, `fixup` resumes at the fixup label with the vector, error code and CR2
//! in RAX, R8 and R9, and the routine stores them for the caller. The same mechanism
//! will serve copies to and from user memory.
//!
//! `exec` calls an address and recovers if fetching its first instruction faults. The
//! faulting RIP is then the target, not a listed instruction, so the target is armed in
//! `EXEC_TARGET` for the duration of the call (one probe at a time, under a lock).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// What a faulting probe observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Fault {
    pub vector: u64,
    pub error_code: u64,
    pub address: u64,
}

impl Fault {
    /// Page-fault error code: the page was present (a protection violation).
    pub fn protection(&self) -> bool {
        self.vector == 14 && self.error_code & 1 != 0
    }
    /// Page-fault error code: the access was a write.
    pub fn write(&self) -> bool {
        self.vector == 14 && self.error_code & 2 != 0
    }
    /// Page-fault error code: the access was an instruction fetch.
    pub fn fetch(&self) -> bool {
        self.vector == 14 && self.error_code & 0x10 != 0
    }
}

global_asm!(
    r#"
    .section .text.probe, "ax"

    /* A fixup's epilogue: store the fault (vector, error code, CR2, which the trap
       dispatcher left in rax, r8, r9) through the pointer in `out`, return 1. */
    .macro report_fault out
    mov qword ptr [\out], rax
    mov qword ptr [\out + 8], r8
    mov qword ptr [\out + 16], r9
    mov eax, 1
    ret
    .endm

    /* u64 panda_probe_read_u64(addr, *Fault, *u64 out): 0 ok, 1 faulted */
    .global panda_probe_read_u64
    panda_probe_read_u64:
    10: mov rax, qword ptr [rdi]
    mov qword ptr [rdx], rax
    xor eax, eax
    ret
    11: report_fault rsi

    /* u64 panda_probe_rewrite_u8(addr, *Fault): writes the byte's own value back;
       0 ok, 1 faulted */
    .global panda_probe_rewrite_u8
    panda_probe_rewrite_u8:
    22: mov al, byte ptr [rdi]
    20: mov byte ptr [rdi], al
    xor eax, eax
    ret
    21: report_fault rsi

    /* u64 panda_probe_ud2(*Fault): 0 if ud2 did not fault (impossible), 1 faulted */
    .global panda_probe_ud2
    panda_probe_ud2:
    30: ud2
    xor eax, eax
    ret
    31: report_fault rdi

    /* u64 panda_probe_exec(target, *Fault): calls target (which must just `ret`).
       0 if it ran, 1 if fetching it faulted. */
    .global panda_probe_exec
    panda_probe_exec:
    push rbx
    mov rbx, rsi
    call rdi
    xor eax, eax
    pop rbx
    ret
    .global panda_probe_exec_fixup
    panda_probe_exec_fixup:
    mov rsi, rbx
    pop rbx
    report_fault rsi

    /* u64 panda_probe_user_read_u64(addr, *Fault, *u64 out): as read, with SMAP
       lifted (stac/clac) for the one access: the only way the kernel reads user memory. */
    .global panda_probe_user_read_u64
    panda_probe_user_read_u64:
    stac
    40: mov rax, qword ptr [rdi]
    clac
    mov qword ptr [rdx], rax
    xor eax, eax
    ret
    41: clac
    report_fault rsi

    /* u64 panda_probe_user_write_u64(addr, value, *Fault) */
    .global panda_probe_user_write_u64
    panda_probe_user_write_u64:
    stac
    50: mov qword ptr [rdi], rsi
    clac
    xor eax, eax
    ret
    51: clac
    report_fault rdx

    /* u64 panda_probe_write_u64(addr, value, *Fault) */
    .global panda_probe_write_u64
    panda_probe_write_u64:
    60: mov qword ptr [rdi], rsi
    xor eax, eax
    ret
    61: report_fault rdx

    .global panda_probe_ret_in_text
    panda_probe_ret_in_text:
    ret

    .section .panda_extable, "a"
    .balign 8
    .quad 10b, 11b
    .quad 20b, 21b
    .quad 22b, 21b
    .quad 30b, 31b
    .quad 40b, 41b
    .quad 50b, 51b
    .quad 60b, 61b
    "#
);

unsafe extern "C" {
    fn panda_probe_read_u64(addr: u64, fault: *mut Fault, out: *mut u64) -> u64;
    fn panda_probe_rewrite_u8(addr: u64, fault: *mut Fault) -> u64;
    fn panda_probe_ud2(fault: *mut Fault) -> u64;
    fn panda_probe_user_read_u64(addr: u64, fault: *mut Fault, out: *mut u64) -> u64;
    fn panda_probe_user_write_u64(addr: u64, value: u64, fault: *mut Fault) -> u64;
    fn panda_probe_write_u64(addr: u64, value: u64, fault: *mut Fault) -> u64;
    fn panda_probe_exec(target: u64, fault: *mut Fault) -> u64;
    static panda_probe_exec_fixup: u8;
    static panda_probe_ret_in_text: u8;
    static __extable_start: [u64; 2];
    static __extable_end: [u64; 2];
}

static EXEC_TARGET: AtomicU64 = AtomicU64::new(0);
static EXEC_LOCK: spin::Mutex<()> = spin::Mutex::new(());

fn extable() -> &'static [[u64; 2]] {
    // SAFETY: the linker script brackets `.panda_extable` with these symbols, and the
    // section holds only pairs of u64 written by the assembly above.
    unsafe {
        let start = &raw const __extable_start;
        let end = &raw const __extable_end;
        let len = (end as usize - start as usize) / core::mem::size_of::<[u64; 2]>();
        core::slice::from_raw_parts(start, len)
    }
}

/// Where a trapped probe resumes: the trap dispatcher sets the frame's RIP to `rip`,
/// pops `pop` bytes off the trapped stack, and puts `rax`, `r8` and `r9` (the vector,
/// error code and CR2 that the fixup stores) in those registers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resume {
    pub rip: u64,
    pub pop: u64,
    pub rax: u64,
    pub r8: u64,
    pub r9: u64,
}

/// Called by the trap dispatcher for exceptions: if the trap (`vector`, `error_code`,
/// at `rip`) hit a probe, where the probe resumes.
pub(crate) fn fixup(vector: u64, error_code: u64, rip: u64) -> Option<Resume> {
    let cr2 = if vector == 14 {
        x86_64::registers::control::Cr2::read_raw()
    } else {
        0
    };
    let target = EXEC_TARGET.load(Ordering::Acquire);
    let (resume, pop) = if target != 0 && vector == 14 && rip == target {
        // The `call rdi` pushed a return address; drop it and land in the fixup.
        (&raw const panda_probe_exec_fixup as u64, 8)
    } else {
        let entry = extable().iter().find(|entry| entry[0] == rip)?;
        (entry[1], 0)
    };
    Some(Resume {
        rip: resume,
        pop,
        rax: vector,
        r8: error_code,
        r9: cr2,
    })
}

/// A probe's return value (0: done, 1: faulted) as a result.
fn outcome(faulted: u64, fault: Fault) -> Result<(), Fault> {
    if faulted == 0 {
        Ok(())
    } else {
        Err(fault)
    }
}

/// Reads a u64, reporting a fault instead of taking it.
///
/// Crate-private: it reads any address, device registers included (where a read can
/// clear a status bit or pop a FIFO), so outside this crate only reads whose addresses
/// arch chooses are offered (`read_image_bytes`, `stack_guards`,
/// `acpi::rsdp_signature`, the user-half `read_user_u64`).
pub(crate) fn read_u64(addr: u64) -> Result<u64, Fault> {
    let mut fault = Fault::default();
    let mut value = 0u64;
    // SAFETY: the read is covered by the exception table: a fault resumes in the probe's
    // fixup, which only writes `fault`. No Rust reference to the target is formed.
    let faulted = unsafe { panda_probe_read_u64(addr, &mut fault, &mut value) };
    outcome(faulted, fault).map(|()| value)
}

/// Whether the byte at `addr` can be written: reads it and writes the same value back
/// in two instructions, reporting a fault (of the read or the write) instead of taking
/// it. Only for bytes nothing else writes, so that memory keeps its contents either way
/// (a byte another CPU changed between the two instructions would be set back): the
/// kernel image's text and read-only data, and the `ret` kept in data
/// (`ret_address(RetIn::Data)`). `None`, touching nothing, for any other address.
pub fn rewrite_image_byte(addr: u64) -> Option<Result<(), Fault>> {
    let image = crate::image::kernel_image();
    let read_only = (image.text.0..image.rodata.1).contains(&addr);
    if !read_only && addr != ret_address(RetIn::Data) {
        return None;
    }
    let mut fault = Fault::default();
    // SAFETY: both accesses are covered by the exception table, and the write stores
    // the value just read to a byte no other code writes (checked above: the image's
    // text and rodata, which Rust never writes, or `RET_IN_DATA`, which only this
    // module names and never stores to), so no memory changes.
    let faulted = unsafe { panda_probe_rewrite_u8(addr, &mut fault) };
    Some(outcome(faulted, fault))
}

/// Executes `ud2` under the exception table: returns the #UD it raised.
pub fn invalid_opcode() -> Result<(), Fault> {
    let mut fault = Fault::default();
    // SAFETY: the ud2 is covered by the exception table.
    let faulted = unsafe { panda_probe_ud2(&mut fault) };
    outcome(faulted, fault)
}

/// A `ret` in each kind of kernel memory, for checking that only .text executes.
#[unsafe(no_mangle)]
static PANDA_RET_IN_RODATA: u8 = 0xc3;
static RET_IN_DATA: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0xc3);

/// Where a `ret` instruction is placed for `exec_ret_in`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetIn {
    Text,
    Rodata,
    Data,
}

/// Address of the `ret` kept in the given kind of memory.
pub fn ret_address(kind: RetIn) -> u64 {
    match kind {
        RetIn::Text => &raw const panda_probe_ret_in_text as u64,
        RetIn::Rodata => &raw const PANDA_RET_IN_RODATA as u64,
        RetIn::Data => RET_IN_DATA.as_ptr() as u64,
    }
}

/// Calls the `ret` kept in `kind` of memory: Ok if it executed, the fault if fetching
/// it faulted (as it must outside .text when NX is on).
pub fn exec_ret_in(kind: RetIn) -> Result<(), Fault> {
    exec(ret_address(kind))
}

/// Calls `target`, which holds a `ret` (0xc3) if it is executable at all; reports the
/// fault if fetching it faults.
fn exec(target: u64) -> Result<(), Fault> {
    let _only_one = EXEC_LOCK.lock();
    let mut fault = Fault::default();
    EXEC_TARGET.store(target, Ordering::Release);
    // SAFETY: `target` is one of the `ret` bytes above, so if it executes it returns at
    // once; if not, the
    // armed target makes a fetch fault there resume in the fixup with the stack as
    // the call left it.
    let faulted = unsafe { panda_probe_exec(target, &mut fault) };
    EXEC_TARGET.store(0, Ordering::Release);
    outcome(faulted, fault)
}

/// Copies `buf.len()` bytes from `addr`, reporting a fault instead of taking it.
/// Crate-private for the reason `read_u64` is.
pub(crate) fn read_bytes(addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
    let mut i = 0usize;
    while i < buf.len() {
        let at = addr + i as u64;
        let word = read_u64(at & !7)?.to_le_bytes();
        let from = (at & 7) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[from..from + n]);
        i += n;
    }
    Ok(())
}

/// Copies `buf.len()` bytes of the kernel image (`image::kernel_image()`, from its
/// start to its end: text, rodata, data and bss) starting at `addr`, reporting a fault
/// instead of taking it (the guard pages under the boot stacks, in .bss, fault).
/// `None`, touching nothing, unless all of `[addr, addr + buf.len())` lies in the image.
///
/// Sound for any arguments: the image is ordinary memory that the linker laid out, so
/// a read has no side effect (no device register lies there); the accesses are the
/// exception-table probes, which form no Rust reference to the bytes, and the range is
/// checked before anything is touched.
pub fn read_image_bytes(addr: u64, buf: &mut [u8]) -> Option<Result<(), Fault>> {
    let image = crate::image::kernel_image();
    let end = addr.checked_add(buf.len() as u64)?;
    if addr < image.start || end > image.end {
        return None;
    }
    Some(read_bytes(addr, buf))
}

/// What probing one stack's guard page found (see `stack_guards`).
#[derive(Clone, Copy, Debug)]
pub struct GuardProbe {
    /// The guard page's address.
    pub guard: u64,
    /// Reading the u64 8 bytes into the guard page: a guard page must fault there
    /// (not-present, CR2 that address).
    pub inside: Result<u64, Fault>,
    /// Reading the first u64 of the stack right above the guard page: must succeed.
    pub above: Result<u64, Fault>,
}

/// Probes the guard pages under CPU `cpu`'s four stacks (kernel, #DF, NMI, #MC, in the
/// order of `stacks::CpuStacks::guards`) and the first word of each stack above them.
/// `None` for an index past `percpu::MAX_CPUS` or a CPU whose per-CPU block was never
/// installed (its guards are not recorded).
///
/// Sound for any `cpu`: the caller picks a CPU, not an address. The addresses are the
/// guards that `percpu::install` (crate-private) recorded from the stacks arch laid out
/// (the boot stacks in .bss, the AP stacks in the stack window), so each read is either
/// of an unmapped guard page, whose fault the exception table recovers, or of the
/// bottom of a stack in RAM, which has no side effect; no Rust reference is formed.
pub fn stack_guards(cpu: usize) -> Option<[GuardProbe; 4]> {
    if cpu >= crate::percpu::MAX_CPUS {
        return None;
    }
    let guards = crate::percpu::cpu(cpu).stack_guards();
    if guards.contains(&0) {
        return None;
    }
    Some(guards.map(|guard| GuardProbe {
        guard,
        inside: read_u64(guard + 8),
        above: read_u64(guard + crate::PAGE_SIZE),
    }))
}

/// Whether `addr` is a user (lower-half) address.
fn is_user(addr: u64) -> bool {
    addr < crate::USER_END
}

/// Reads a u64 of user memory in the current address space (SMAP lifted for that one
/// access). A kernel address is refused without touching it; a fault is reported.
pub fn read_user_u64(addr: u64) -> Result<u64, Fault> {
    if !is_user(addr) || !is_user(addr + 7) {
        return Err(Fault {
            vector: 14,
            error_code: 0,
            address: addr,
        });
    }
    let mut fault = Fault::default();
    let mut value = 0;
    // SAFETY: the address is in the user half, so no kernel data is read; the access is
    // covered by the exception table and SMAP is restored on both paths. Without SMAP
    // (stac/clac would be #UD) the plain probe does the same access.
    let faulted = unsafe {
        if crate::cpu::smap_enabled() {
            panda_probe_user_read_u64(addr, &mut fault, &mut value)
        } else {
            panda_probe_read_u64(addr, &mut fault, &mut value)
        }
    };
    outcome(faulted, fault).map(|()| value)
}

/// Writes a u64 of user memory in the current address space (SMAP lifted for that one
/// access). A kernel address is refused without touching it; a fault is reported.
pub fn write_user_u64(addr: u64, value: u64) -> Result<(), Fault> {
    if !is_user(addr) || !is_user(addr + 7) {
        return Err(Fault {
            vector: 14,
            error_code: 2,
            address: addr,
        });
    }
    let mut fault = Fault::default();
    // SAFETY: as in `read_user_u64`; user memory is not kernel data.
    let faulted = unsafe {
        if crate::cpu::smap_enabled() {
            panda_probe_user_write_u64(addr, value, &mut fault)
        } else {
            panda_probe_write_u64(addr, value, &mut fault)
        }
    };
    outcome(faulted, fault)
}
