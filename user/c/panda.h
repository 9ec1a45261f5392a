/* panda.h: Panda's system calls for C programs (no C library needed).
 *
 * Build (see docs/PROGRAMS.md):
 *   gcc -static -nostdlib -ffreestanding -fno-pie -no-pie -O2 \
 *       -fno-asynchronous-unwind-tables -fcf-protection=none -Wl,--build-id=none \
 *       -I user/c -T user/programs/link.ld -o hello user/c/start.S hello.c
 *
 * `start.S` calls `uint64_t main(int argc, char **argv, uint64_t arg)` and exits with
 * its result: argv[0] is the program's path, then the arguments its spawner passed
 * (`panda_spawn_args`; for the first program, the words after `--` on the kernel
 * command line, `scripts/run.sh --args "..."`); `arg` is the spawn's number. Numbers and
 * semantics: docs/ABI.md (the Rust source of truth is abi/src/syscall.rs). Results are
 * >= 0 on success and -(error code) on failure.
 */
#ifndef PANDA_H
#define PANDA_H

#include <stddef.h>
#include <stdint.h>

enum {
    OP_PROCESS_YIELD = 0x20000, OP_PROCESS_EXIT = 0x20001, OP_PROCESS_GET_PID = 0x20002,
    OP_PROCESS_WAIT = 0x20003, OP_PROCESS_BRK = 0x20004, OP_PROCESS_SLEEP = 0x20005,
    OP_PROCESS_KILL = 0x20006, OP_PROCESS_WAIT_TIMEOUT = 0x20007,
    OP_ENVIRONMENT_SPAWN = 0x30000, OP_ENVIRONMENT_LOG = 0x30001,
    OP_ENVIRONMENT_TIME = 0x30002, OP_ENVIRONMENT_INFO = 0x30003,
    OP_ENVIRONMENT_SPAWN_ARGS = 0x30004,
    OP_BUFFER_ALLOC = 0x40000, OP_BUFFER_FREE = 0x40001, OP_BUFFER_LOG = 0x40002,
    OP_THREAD_SPAWN = 0x50000, OP_THREAD_JOIN = 0x50001, OP_THREAD_EXIT = 0x50002,
    OP_THREAD_SET_AFFINITY = 0x50003, OP_CPU_COUNT = 0x50004,
    OP_THREAD_CURRENT_CPU = 0x50005, OP_THREAD_GET_ID = 0x50006,
    OP_THREAD_SET_FS_BASE = 0x50007,
    OP_FILE_READ_BUFFER = 0x60000,
};

/* Error codes (a failed call returns their negation). */
enum {
    PANDA_EINVAL = 1, PANDA_ENOMEM = 2, PANDA_ENOTFOUND = 3, PANDA_EFAULT = 4,
    PANDA_EUNKNOWN = 5, PANDA_EPERM = 6, PANDA_ETIMEDOUT = 7,
};

/* The status a waiter sees for a process the kernel ended. */
#define PANDA_EXIT_KILLED (1ULL << 32)

static inline int64_t panda_syscall(uint64_t op, uint64_t a0, uint64_t a1, uint64_t a2,
                                    uint64_t a3) {
    int64_t r;
    register uint64_t r10 __asm__("r10") = a3;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(op), "D"(a0), "S"(a1), "d"(a2), "r"(r10)
                     : "rcx", "r11", "memory");
    return r;
}

/* The same with a fifth argument in r8 (OP_ENVIRONMENT_SPAWN_ARGS). */
static inline int64_t panda_syscall5(uint64_t op, uint64_t a0, uint64_t a1, uint64_t a2,
                                     uint64_t a3, uint64_t a4) {
    int64_t r;
    register uint64_t r10 __asm__("r10") = a3;
    register uint64_t r8 __asm__("r8") = a4;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(op), "D"(a0), "S"(a1), "d"(a2), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return r;
}

static inline size_t panda_strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

__attribute__((noreturn)) static inline void panda_exit(uint64_t code) {
    panda_syscall(OP_PROCESS_EXIT, code, 0, 0, 0);
    __builtin_unreachable();
}
static inline int64_t panda_log(const char *s) {
    return panda_syscall(OP_ENVIRONMENT_LOG, (uint64_t)s, panda_strlen(s), 0, 0);
}
static inline int64_t panda_spawn(const char *path, uint64_t arg) {
    return panda_syscall(OP_ENVIRONMENT_SPAWN, (uint64_t)path, panda_strlen(path), arg, 0);
}
/* Spawns `path` with arguments: `block` holds `len` bytes of NUL-terminated strings,
 * e.g. "one\0two" with len sizeof "one\0two" (the literal's own NUL ends the last).
 * The new program's argv is path, then those strings. At most 64 KiB and 4096
 * arguments, each UTF-8: otherwise -PANDA_EINVAL. */
static inline int64_t panda_spawn_args(const char *path, const char *block, size_t len,
                                       uint64_t arg) {
    return panda_syscall5(OP_ENVIRONMENT_SPAWN_ARGS, (uint64_t)path, panda_strlen(path),
                          (uint64_t)block, len, arg);
}
static inline int64_t panda_wait(uint64_t pid) {
    return panda_syscall(OP_PROCESS_WAIT, pid, 0, 0, 0);
}
static inline int64_t panda_brk(uint64_t end) {
    return panda_syscall(OP_PROCESS_BRK, end, 0, 0, 0);
}
static inline int64_t panda_buffer_alloc(uint64_t size) {
    return panda_syscall(OP_BUFFER_ALLOC, size, 0, 0, 0);
}
static inline int64_t panda_buffer_free(uint64_t addr) {
    return panda_syscall(OP_BUFFER_FREE, addr, 0, 0, 0);
}
static inline int64_t panda_pid(void) { return panda_syscall(OP_PROCESS_GET_PID, 0, 0, 0, 0); }
static inline int64_t panda_cpu_count(void) { return panda_syscall(OP_CPU_COUNT, 0, 0, 0, 0); }
__attribute__((noreturn)) static inline void panda_thread_exit(uint64_t code) {
    panda_syscall(OP_THREAD_EXIT, code, 0, 0, 0);
    __builtin_unreachable();
}
/* Starts `entry(arg)` on a new thread whose stack is `[stack, stack + size)` (e.g. a
 * buffer). `entry` must end with `panda_thread_exit`. The top is set 8 bytes below a
 * 16-byte boundary, as a function entered by `call` expects. */
static inline int64_t panda_thread_spawn(void (*entry)(uint64_t), uint64_t stack,
                                         uint64_t size, uint64_t arg) {
    uint64_t top = ((stack + size) & ~15ULL) - 8;
    return panda_syscall(OP_THREAD_SPAWN, (uint64_t)entry, top, arg, 0);
}
static inline int64_t panda_thread_join(uint64_t tid) {
    return panda_syscall(OP_THREAD_JOIN, tid, 0, 0, 0);
}

/* Formats an unsigned number into `buf` (at least 21 bytes); returns `buf`. */
static inline char *panda_utoa(uint64_t v, char *buf) {
    char tmp[21];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (int i = 0; i < n; i++) buf[i] = tmp[n - 1 - i];
    buf[n] = 0;
    return buf;
}

#endif
