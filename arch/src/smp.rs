//! Starting application processors: the real-mode trampoline and INIT-SIPI-SIPI.
//!
//! The trampoline below is position-independent 16/32/64-bit code, copied to a page
//! below 1 MiB (a start-up IPI names a page number < 256). An AP starts there in real
//! mode with CS = page << 8. It loads the trampoline's GDT, enters protected mode, loads
//! the trampoline CR3 (a PML4 below 4 GiB that identity-maps the low 2 MiB and shares
//! the kernel half), enables long mode and paging, and jumps to the kernel entry with
//! its own stack and argument. The far-jump targets and the parameters are patched into
//! the copy once (`Trampoline::prepare`); nothing in it changes per AP.
//!
//! An AP finds its own start slot: in long mode it reads its APIC id (CPUID leaf 0Bh,
//! or leaf 1 for an xAPIC-only CPU), looks for the slot `SLOTS` offers to that id, and
//! claims it with a compare-exchange (`OFFERED -> CLAIMED`) before it touches any
//! memory of its own: only then does it load the slot's stack and index. A CPU that
//! times out has its slot withdrawn (`OFFERED -> WITHDRAWN`) by the same kind of
//! compare-exchange, so exactly one of the two wins: an AP that arrives after its
//! time-out finds no slot, counts itself as parked and halts inside the trampoline,
//! with interrupts off and no stack, and never runs on stacks or an index given to
//! another CPU. (Before, the one set of parameters was re-patched for the next AP
//! while a late one might still read it: two CPUs on one index, and a triple fault.)
//!
//! `ApStarter` is the safe face of all this: it takes the trampoline page and the AP
//! stacks from the boot memory map itself, so no caller can point an AP at memory that
//! is in use. An AP lands in `ap_landing`, which switches to the kernel's page tables,
//! loads its GDT/TSS and the IDT, installs its per-CPU block and calls the kernel's
//! `ap_main(index)`.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use alloc::vec::Vec;

use crate::memory_map::{BootMemoryMap, MemoryKind};
use crate::percpu::MAX_CPUS;
use crate::stacks::CpuStacks;
use crate::PAGE_SIZE;

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start
    ap_trampoline_start:
    .code16
    jmp tr_code16

    /* Data at fixed offsets (TR_* constants in Rust). */
    .balign 8
    tr_gdt:                                 /* offset 8 */
    .quad 0
    .quad 0x00cf9a000000ffff                /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff                /* 0x10: data */
    .quad 0x00af9a000000ffff                /* 0x18: 64-bit code */
    tr_gdtr:                                /* offset 40: limit, base (patched) */
    .word 31
    .long 0
    .balign 8
    .long 0                                 /* offset 48: cr3 */
    .long 0                                 /* offset 52: efer */
    .quad 0                                 /* offset 56: slots (kernel address) */
    .quad 0                                 /* offset 64: slot count */
    .quad 0                                 /* offset 72: entry */
    .quad 0                                 /* offset 80: APs parked (no slot) */

    tr_code16:
    cli
    cld
    mov ax, cs
    mov ds, ax
    xor ebx, ebx
    mov bx, ax
    shl ebx, 4                              /* ebx = trampoline base (linear) */
    lgdt [40]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea                        /* ljmpl 0x08:pm32 (patched) */
    .global tr_pm32_target
    tr_pm32_target: .long 0
    .word 0x08

    .code32
    .global tr_pm32
    tr_pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 1 << 5                          /* PAE */
    mov cr4, eax
    mov eax, dword ptr [ebx + 48]
    mov cr3, eax
    mov ecx, 0xc0000080
    mov eax, dword ptr [ebx + 52]
    xor edx, edx
    wrmsr
    mov eax, cr0
    or eax, 0x80010000                      /* PG | WP */
    mov cr0, eax
    .byte 0xea                              /* ljmp 0x18:lm64 (patched) */
    .global tr_lm64_target
    tr_lm64_target: .long 0
    .word 0x18

    .code64
    .global tr_lm64
    tr_lm64:
    mov r9d, ebx                            /* r9 = trampoline base (cpuid clobbers ebx) */
    xor eax, eax
    cpuid                                   /* eax = highest basic leaf */
    cmp eax, 0xb
    jb tr_leaf1
    mov eax, 0xb
    xor ecx, ecx
    cpuid
    test ebx, ebx                           /* leaf 0Bh is valid only with ebx != 0 */
    jz tr_leaf1
    mov r8d, edx                            /* x2APIC id */
    jmp tr_have_id
    tr_leaf1:
    mov eax, 1
    cpuid
    shr ebx, 24
    mov r8d, ebx                            /* initial xAPIC id */
    tr_have_id:
    mov rax, {offered}
    or rax, r8                              /* the word of a slot offered to this id */
    mov r10, {claimed}
    or r10, r8
    mov rsi, qword ptr [r9 + 56]
    mov rcx, qword ptr [r9 + 64]
    tr_scan:
    test rcx, rcx
    jz tr_park
    cmp qword ptr [rsi], rax
    je tr_claim
    add rsi, 24
    dec rcx
    jmp tr_scan
    tr_claim:
    lock cmpxchg qword ptr [rsi], r10       /* lost to a withdrawal: park */
    jne tr_park
    mov rsp, qword ptr [rsi + 8]
    mov rdi, qword ptr [rsi + 16]
    mov rax, qword ptr [r9 + 72]
    xor ebp, ebp
    call rax                                /* ends a backtrace; keeps the ABI's alignment */
    ud2
    tr_park:
    lock inc qword ptr [r9 + 80]
    tr_halt:
    cli
    hlt
    jmp tr_halt
    .global ap_trampoline_end
    ap_trampoline_end:
    "#,
    offered = const OFFERED,
    claimed = const CLAIMED,
);

const TR_GDT: u64 = 8;
const TR_GDTR_BASE: u64 = 42;
const TR_CR3: u64 = 48;
const TR_EFER: u64 = 52;
const TR_SLOTS: u64 = 56;
const TR_SLOT_COUNT: u64 = 64;
const TR_ENTRY: u64 = 72;
const TR_PARKED: u64 = 80;

/// One AP's start slot (the trampoline reads it: `repr(C)`, 24 bytes). `word` is the
/// APIC id in its low 32 bits and the state above; `stack_top` and `arg` are set
/// before the slot is offered.
#[repr(C)]
struct Slot {
    word: AtomicU64,
    stack_top: AtomicU64,
    arg: AtomicU64,
}

const OFFERED: u64 = 1 << 32;
const CLAIMED: u64 = 2 << 32;
const WITHDRAWN: u64 = 3 << 32;

/// Start slots, one per start attempt (an AP is offered a slot once).
static SLOTS: [Slot; MAX_CPUS] = [const {
    Slot {
        word: AtomicU64::new(0),
        stack_top: AtomicU64::new(0),
        arg: AtomicU64::new(0),
    }
}; MAX_CPUS];

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static tr_pm32_target: u8;
    static tr_pm32: u8;
    static tr_lm64_target: u8;
    static tr_lm64: u8;
}

fn offset(sym: *const u8) -> u64 {
    sym as u64 - &raw const ap_trampoline_start as u64
}

/// The entry an AP jumps to: `entry(arg)` on the given stack, in long mode on the
/// trampoline's page tables. It must load the kernel's CR3 first.
type ApEntry = extern "C" fn(arg: u64) -> !;

/// A trampoline copied into a low page, reached through the HHDM for patching.
struct Trampoline {
    phys: u64,
    virt: u64,
}

impl Trampoline {
    /// Size of the trampoline code and data.
    fn size() -> u64 {
        &raw const ap_trampoline_end as u64 - &raw const ap_trampoline_start as u64
    }

    /// Copies the trampoline to physical page `phys` (< 1 MiB, page-aligned) and patches
    /// its addresses. `cr3` must be a PML4 below 4 GiB that identity-maps `phys` and
    /// maps the kernel half; `efer` is the EFER value to load (LME, and NXE if used).
    ///
    /// # Safety
    /// The page must be RAM reserved for the trampoline alone and mapped writable at
    /// `hhdm + phys`.
    unsafe fn prepare(phys: u64, hhdm: u64, cr3: u32, efer: u32) -> Trampoline {
        assert!(
            phys < 0x10_0000 && phys.is_multiple_of(PAGE_SIZE),
            "trampoline page must be below 1 MiB"
        );
        assert!(Self::size() <= PAGE_SIZE, "trampoline larger than a page");
        let virt = hhdm + phys;
        let src = &raw const ap_trampoline_start;
        // SAFETY: the destination page is reserved for the trampoline and mapped (the
        // caller's contract); the source is the trampoline's bytes in .rodata.
        unsafe { core::ptr::copy_nonoverlapping(src, virt as *mut u8, Self::size() as usize) };
        let t = Trampoline { phys, virt };
        t.write_u32(
            offset(&raw const tr_pm32_target),
            (phys + offset(&raw const tr_pm32)) as u32,
        );
        t.write_u32(
            offset(&raw const tr_lm64_target),
            (phys + offset(&raw const tr_lm64)) as u32,
        );
        t.write_u32(TR_GDTR_BASE, (phys + TR_GDT) as u32);
        t.write_u32(TR_CR3, cr3);
        t.write_u32(TR_EFER, efer);
        t.write_u64(TR_SLOTS, SLOTS.as_ptr() as u64);
        t.write_u64(TR_SLOT_COUNT, SLOTS.len() as u64);
        t.write_u64(TR_ENTRY, ap_landing as ApEntry as usize as u64);
        t.write_u64(TR_PARKED, 0);
        core::sync::atomic::fence(Ordering::SeqCst);
        t
    }

    /// How many APs found no slot and halted in the trampoline.
    fn parked(&self) -> u64 {
        // SAFETY: the counter lies inside the trampoline copy, which this object owns;
        // APs increment it with a locked instruction, so an atomic view of it is sound.
        unsafe { (*((self.virt + TR_PARKED) as *const AtomicU64)).load(Ordering::Acquire) }
    }

    fn write_u32(&self, off: u64, value: u32) {
        // SAFETY: `off` lies inside the trampoline copy, which this object owns.
        unsafe { ((self.virt + off) as *mut u32).write_unaligned(value) }
    }

    fn write_u64(&self, off: u64, value: u64) {
        // SAFETY: as in `write_u32`.
        unsafe { ((self.virt + off) as *mut u64).write_unaligned(value) }
    }

    /// The page number a start-up IPI names.
    fn sipi_page(&self) -> u8 {
        (self.phys >> 12) as u8
    }
}

/// Waits `us` microseconds on the reference counter (`time::wait_us`), not the TSC.
fn delay_us(us: u64) {
    crate::time::wait_us(us, || false);
}

/// Each slot's stacks (mapped when the slot is offered).
static AP_STACKS: [spin::Once<CpuStacks>; MAX_CPUS] = [const { spin::Once::new() }; MAX_CPUS];
/// Where APs go once `ap_landing` has set them up.
static AP_MAIN: spin::Once<fn(usize) -> !> = spin::Once::new();
/// Set when the `ApStarter` is made: there is one.
static STARTER_MADE: AtomicBool = AtomicBool::new(false);

/// Starts the application processors, all at once, each through a start slot of its
/// own. There is at most one, made after the kernel's page tables are active.
pub struct ApStarter {
    trampoline: Trampoline,
    tables: u64,
    /// The next unused slot in `SLOTS`.
    next_slot: usize,
}

/// Why an AP was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartError {
    /// A CPU with that local APIC id is online already (the boot CPU, or an AP listed
    /// twice): it is not sent INIT.
    Running,
    /// No memory (or page-table frames) for its stacks.
    NoStacks,
    /// It did not claim its slot within the time-out. The slot was withdrawn (if it
    /// arrives later it halts in the trampoline) and it was sent INIT.
    TimedOut,
    /// It claimed its slot but did not check in within ten time-outs (it may hold a CPU
    /// index no CPU checks in on).
    Late,
    /// Every start slot has been used.
    NoSlot,
}

impl ApStarter {
    /// Takes a page below 1 MiB for the trampoline from `map`, builds the trampoline's
    /// page tables (from the kernel tables' reserve) and copies the trampoline there.
    /// Every AP started will run `ap_main(index)` once set up. `Err` if the kernel's page
    /// tables are not active yet, if a starter was made before, or without memory.
    pub fn new(
        map: &mut BootMemoryMap,
        ap_main: fn(usize) -> !,
    ) -> Result<ApStarter, &'static str> {
        if crate::kernel_tables::kernel_root() == 0 {
            return Err("the kernel's page tables are not active yet");
        }
        if STARTER_MADE.swap(true, Ordering::AcqRel) {
            return Err("the APs are started by one ApStarter");
        }
        AP_MAIN.call_once(|| ap_main);
        let tables = crate::kernel_tables::trampoline_root()
            .ok_or("no page-table frames for the trampoline")?;
        let page = map
            .take(PAGE_SIZE, 0x1000, 0x10_0000, MemoryKind::KernelEarly)
            .ok_or("no free page below 1 MiB for the trampoline")?;
        let (_, _, efer) = crate::cpu::control_registers();
        // LME, and NXE (bit 11) and SCE (bit 0) as the boot CPU has them.
        let efer = (efer as u32 & ((1 << 11) | 1)) | (1 << 8);
        // SAFETY: the page was just taken from the boot memory map's usable memory below
        // 1 MiB, for the trampoline alone, and the HHDM maps usable RAM writable; the
        // trampoline root is below 4 GiB (`trampoline_root`), identity-maps the low
        // 2 MiB and shares the kernel half.
        let trampoline =
            unsafe { Trampoline::prepare(page, crate::HHDM_BASE, tables as u32, efer) };
        Ok(ApStarter {
            trampoline,
            tables,
            next_slot: 0,
        })
    }

    /// Physical address of the trampoline page.
    pub fn page(&self) -> u64 {
        self.trampoline.phys
    }

    /// Physical address of the trampoline's PML4.
    pub fn tables(&self) -> u64 {
        self.tables
    }

    /// Size of the trampoline code and data.
    pub fn size(&self) -> u64 {
        Trampoline::size()
    }

    /// How many APs arrived after their slot was withdrawn and halted in the
    /// trampoline (they were sent INIT too).
    pub fn parked(&self) -> u64 {
        self.trampoline.parked()
    }

    /// Maps stacks for a fresh slot and offers it to `apic_id` (not yet sent any IPI).
    fn offer(&mut self, map: &mut BootMemoryMap, apic_id: u32) -> Result<usize, StartError> {
        if crate::percpu::online().any(|cpu| cpu.apic_id() == apic_id) {
            return Err(StartError::Running);
        }
        let n = self.next_slot;
        // Slot `n` uses the stack window of position `n + 1` (position 0 is the boot
        // CPU's); a CPU's index is taken when it checks in, in arrival order.
        let slot = SLOTS
            .get(n)
            .filter(|_| n + 1 < MAX_CPUS)
            .ok_or(StartError::NoSlot)?;
        let stacks =
            crate::kernel_tables::map_cpu_stacks(n + 1, map).ok_or(StartError::NoStacks)?;
        let stacks = *AP_STACKS[n].call_once(|| stacks);
        self.next_slot += 1;
        slot.stack_top.store(stacks.kernel.top, Ordering::Relaxed);
        slot.arg.store(n as u64, Ordering::Relaxed);
        slot.word
            .store(u64::from(apic_id) | OFFERED, Ordering::Release);
        Ok(n)
    }

    /// Withdraws slot `n` unless its AP claimed it first; true if withdrawn (the AP
    /// will never use it).
    fn withdraw(n: usize, apic_id: u32) -> bool {
        SLOTS[n]
            .word
            .compare_exchange(
                u64::from(apic_id) | OFFERED,
                u64::from(apic_id) | WITHDRAWN,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Whether the AP of slot `n` has claimed it.
    fn claimed(n: usize) -> bool {
        SLOTS[n].word.load(Ordering::Acquire) >> 32 == CLAIMED >> 32
    }

    /// Whether the AP of slot `n` has checked in (`percpu::set_online`).
    fn checked_in(n: usize) -> bool {
        match INDEX_OF_SLOT[n].load(Ordering::Acquire) {
            0 => false,
            i => crate::percpu::cpu(i).online(),
        }
    }

    /// Starts every AP in `aps` at once: offers each a start slot with stacks of its
    /// own, sends INIT to all, waits the SDM's 10 ms once, sends the start-up IPIs to
    /// all (a second one to those that have not claimed their slot after 200 us), and
    /// waits for all to claim their slots until none has for `timeout_us` since the
    /// last claim (ten such waits at most, and as long for the first claim). All these
    /// times are measured on the reference counter (`time::Stopwatch`), not the TSC. Slots not claimed by then
    /// are withdrawn (their APs are sent INIT; if one arrives anyway, it halts in the
    /// trampoline); APs that claimed theirs get ten times as long to check in (they are
    /// alive, only slow: an overcommitted host). Each AP takes the next dense CPU index
    /// when it lands, and calls `ap_main(index)` once set up (`percpu::set_online` is
    /// how the kernel's `ap_main` checks in). Returns each APIC id's outcome, in
    /// `aps` order. `How::Silent` and `How::Late` are for tests of the two failure paths.
    pub fn start_all(
        &mut self,
        map: &mut BootMemoryMap,
        aps: &[(u32, How)],
        timeout_us: u64,
    ) -> Vec<(u32, Result<(), StartError>)> {
        let mut results: Vec<(u32, Result<(), StartError>)> = Vec::new();
        let mut started: Vec<(usize, u32, How)> = Vec::new();
        for &(apic_id, how) in aps {
            if results.iter().any(|&(id, _)| id == apic_id)
                || started.iter().any(|&(_, id, _)| id == apic_id)
            {
                results.push((apic_id, Err(StartError::Running)));
                continue;
            }
            match self.offer(map, apic_id) {
                Ok(n) => started.push((n, apic_id, how)),
                Err(e) => results.push((apic_id, Err(e))),
            }
        }
        let parked_before = self.parked();
        let mut late = 0;
        for &(n, apic_id, how) in &started {
            if how == How::Late && Self::withdraw(n, apic_id) {
                late += 1;
            }
        }
        let page = self.trampoline.sipi_page();
        let sent = || started.iter().filter(|&&(_, _, how)| how != How::Silent);
        for &(_, apic_id, _) in sent() {
            crate::apic::send_init(apic_id);
        }
        delay_us(10_000);
        for &(_, apic_id, _) in sent() {
            crate::apic::send_startup(apic_id, page);
        }
        delay_us(200);
        for &(n, apic_id, _) in sent() {
            if !Self::claimed(n) {
                crate::apic::send_startup(apic_id, page);
            }
        }
        let normal = || started.iter().filter(|&&(_, _, how)| how == How::Normal);
        // The time-out counts from the last AP that claimed its slot: on an
        // overcommitted host APs keep arriving slowly, and only one that stays away for
        // `timeout_us` after the others is given up (at most ten time-outs in all, which
        // is also how long the first claim is waited for).
        let claims = || normal().filter(|&&(n, _, _)| Self::claimed(n)).count();
        let total = normal().count();
        // Measured on the reference counter, not the TSC (`time::Stopwatch`).
        let mut clock = crate::time::Stopwatch::start();
        let (begin, mut last, mut seen) = (0, 0, 0);
        loop {
            let claimed = claims();
            let now = clock.elapsed_us();
            if claimed > seen {
                (seen, last) = (claimed, now);
            }
            // Until the first AP claims its slot the host may simply not have run any
            // of them yet: only the overall limit applies then.
            let quiet = seen > 0 && now - last > timeout_us;
            let too_long = now - begin > timeout_us.saturating_mul(10);
            if claimed == total || quiet || too_long || clock.stuck() {
                break;
            }
            core::hint::spin_loop();
        }
        for &(n, apic_id, how) in &started {
            if how != How::Late && Self::withdraw(n, apic_id) {
                crate::apic::send_init(apic_id);
            }
        }
        wait_for(timeout_us.saturating_mul(10), || {
            normal().all(|&(n, _, _)| !Self::claimed(n) || Self::checked_in(n))
        });
        if late > 0 {
            wait_for(timeout_us, || self.parked() >= parked_before + late);
            for &(_, apic_id, how) in &started {
                if how == How::Late {
                    crate::apic::send_init(apic_id);
                }
            }
        }
        for &(n, apic_id, _) in &started {
            let outcome = if Self::checked_in(n) {
                Ok(())
            } else if Self::claimed(n) {
                Err(StartError::Late)
            } else {
                Err(StartError::TimedOut)
            };
            results.push((apic_id, outcome));
        }
        let order = |id: u32| aps.iter().position(|&(a, _)| a == id);
        results.sort_by_key(|&(id, _)| order(id));
        results
    }
}

/// How `ApStarter::start_all` starts one AP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// INIT-SIPI-SIPI and wait for it.
    Normal,
    /// Send it nothing (a test of the time-out path: it never answers).
    Silent,
    /// Withdraw its slot before its start-up IPIs (a test of the late path: it arrives
    /// after its time-out by construction and must halt in the trampoline).
    Late,
}

/// Per slot: the CPU index its AP took when it landed (0: none yet; APs get 1 and up).
static INDEX_OF_SLOT: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// The next CPU index an AP takes when it lands (dense, in arrival order).
static NEXT_INDEX: AtomicUsize = AtomicUsize::new(1);

/// Where the trampoline lands, on the AP's own stack, still on the trampoline's tables.
extern "C" fn ap_landing(slot: u64) -> ! {
    crate::kernel_tables::load();
    let slot = slot as usize;
    let Some(stacks) = AP_STACKS.get(slot).and_then(|s| s.get()) else {
        crate::power::halt_forever()
    };
    // The AP owns its slot (it claimed it in the trampoline): it takes the next index.
    let index = NEXT_INDEX.fetch_add(1, Ordering::AcqRel);
    if index >= MAX_CPUS {
        crate::power::halt_forever()
    }
    INDEX_OF_SLOT[slot].store(index, Ordering::Release);
    crate::gdt::init_cpu(index, stacks);
    crate::idt::load();
    crate::percpu::install(
        index,
        crate::cpu::apic_id(),
        crate::gdt::tss_rsp0_address(index),
        stacks,
    );
    crate::user::init_cpu();
    match AP_MAIN.get() {
        Some(main) => main(index),
        None => crate::power::halt_forever(),
    }
}

/// Waits up to `timeout_us` for `done()`, measured on the reference counter
/// (`time::wait_us`), not the TSC.
pub fn wait_for(timeout_us: u64, done: impl Fn() -> bool) -> bool {
    crate::time::wait_us(timeout_us, done)
}

/// Set while the machine is being stopped: NMIs then halt their CPU (`STOP_HALT`), or
/// first write their CPU's report (`STOP_REPORT`, the watchdog).
static STOPPING: AtomicU64 = AtomicU64::new(0);
const STOP_HALT: u64 = 1;
const STOP_REPORT: u64 = 2;

/// Whether `stop_others` or `stop_others_reporting` has been called.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire) != 0
}

/// Whether the machine is being stopped with a report from every CPU.
pub fn stopping_with_reports() -> bool {
    STOPPING.load(Ordering::Acquire) == STOP_REPORT
}

/// Halts every other online CPU through an NMI (which even a CPU spinning with
/// interrupts off takes). Used by panic and fatal-trap paths.
pub fn stop_others() {
    if STOPPING
        .compare_exchange(0, STOP_HALT, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    nmi_others();
}

/// Like `stop_others`, but each CPU writes its report (registers, backtrace) before it
/// halts. Returns false, and sends nothing, if the machine is already being stopped.
pub fn stop_others_reporting() -> bool {
    if STOPPING
        .compare_exchange(0, STOP_REPORT, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    nmi_others();
    true
}

fn nmi_others() {
    let me = crate::percpu::checked_index().unwrap_or(usize::MAX);
    for cpu in crate::percpu::online() {
        if cpu.index() != me {
            crate::apic::send_nmi(cpu.apic_id());
        }
    }
}
