/* A C program for Panda: prints its argv, spawns a helper (itself, with the argument
 * "helper"), runs a thread, uses a buffer and the heap (brk), and prints what it did. docs/PROGRAMS.md builds
 * and runs it:
 *   gcc -static -nostdlib -ffreestanding -fno-pie -no-pie -O2 \
 *       -fno-asynchronous-unwind-tables -fcf-protection=none -Wl,--build-id=none \
 *       -I user/c -T user/programs/link.ld -o hello user/c/start.S user/c/hello.c
 *   scripts/run.sh --add hello --cmdline init=hello --args "one two"
 */
#include "panda.h"

static void say(const char *a, uint64_t n, const char *b) {
    char line[128], num[21];
    size_t len = 0;
    for (const char *p = a; *p && len < 100; p++) line[len++] = *p;
    for (const char *p = panda_utoa(n, num); *p; p++) line[len++] = *p;
    for (const char *p = b; *p && len < 126; p++) line[len++] = *p;
    line[len++] = '\n';
    panda_syscall(OP_ENVIRONMENT_LOG, (uint64_t)line, len, 0, 0);
}

static volatile uint64_t thread_sum;

static void worker(uint64_t n) {
    uint64_t sum = 0;
    for (uint64_t i = 1; i <= n; i++) sum += i;
    thread_sum = sum;
    panda_thread_exit(sum);
}

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

uint64_t main(int argc, char **argv) {
    if (argc == 2 && streq(argv[1], "helper")) {
        say("hello-c helper: pid ", (uint64_t)panda_pid(), ", exiting with 7");
        return 7;
    }
    say("hello-c: pid ", (uint64_t)panda_pid(), " started");
    say("hello-c: ", (uint64_t)panda_cpu_count(), " CPUs");
    char line[256];
    size_t len = 0;
    for (const char *p = "hello-c: argv:"; *p; p++) line[len++] = *p;
    for (int i = 0; i < argc && len < sizeof line - 2; i++) {
        line[len++] = ' ';
        for (const char *p = argv[i]; *p && len < sizeof line - 2; p++) line[len++] = *p;
    }
    line[len++] = '\n';
    panda_syscall(OP_ENVIRONMENT_LOG, (uint64_t)line, len, 0, 0);

    int64_t child = panda_spawn_args("hello", "helper", sizeof "helper", 0);
    if (child < 0) { say("hello-c: spawn failed: ", (uint64_t)-child, ""); return 1; }
    int64_t status = panda_wait((uint64_t)child);
    say("hello-c: helper exited with ", (uint64_t)status, "");
    if (status != 7) return 2;

    int64_t stack = panda_buffer_alloc(64 * 1024);
    if (stack < 0) return 3;
    int64_t tid = panda_thread_spawn(worker, (uint64_t)stack, 64 * 1024, 100);
    if (tid < 0) return 4;
    int64_t sum = panda_thread_join((uint64_t)tid);
    panda_buffer_free((uint64_t)stack);
    say("hello-c: thread summed 1..100 = ", (uint64_t)sum, "");
    if (sum != 5050 || thread_sum != 5050) return 5;

    int64_t buf = panda_buffer_alloc(1 << 20);
    if (buf < 0) return 6;
    volatile uint64_t *words = (volatile uint64_t *)buf;
    for (uint64_t i = 0; i < (1 << 20) / 8; i += 512) words[i] = i;
    for (uint64_t i = 0; i < (1 << 20) / 8; i += 512) if (words[i] != i) return 7;
    panda_buffer_free((uint64_t)buf);
    panda_log("hello-c: a 1 MiB buffer held its data\n");

    int64_t base = panda_brk(0);
    if (panda_brk((uint64_t)base + 16 * 4096) < 0) return 8;
    volatile uint64_t *heap = (volatile uint64_t *)base;
    heap[0] = 42;
    heap[16 * 512 - 1] = 43;
    if (heap[0] != 42 || heap[16 * 512 - 1] != 43) return 9;
    panda_brk((uint64_t)base);
    say("hello-c: the heap grew by ", 16, " pages and shrank back");
    panda_log("hello-c: all fine\n");
    return 0;
}
