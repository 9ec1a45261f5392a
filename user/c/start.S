/* Entry of a C program on Panda: the kernel starts the first thread here with the
 * spawn's number argument in rdi, argc in rsi, argv in rdx, and rsp just below the
 * argument strings at the top of the stack region (docs/ABI.md). Calls
 * `uint64_t main(int argc, char **argv, uint64_t arg)` and exits the process with its
 * result (a main declared with fewer parameters works too). */
    .text
    .globl _start
    .section .text._start, "ax"
_start:
    xor %ebp, %ebp
    and $-16, %rsp
    mov %rdi, %rcx          /* arg  -> third parameter */
    mov %rsi, %rdi          /* argc -> first */
    mov %rdx, %rsi          /* argv -> second */
    mov %rcx, %rdx
    call main
    mov %rax, %rdi
    mov $0x20001, %eax      /* OP_PROCESS_EXIT */
    syscall
    ud2
    .section .note.GNU-stack, "", @progbits
