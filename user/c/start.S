/* Entry of a C program on Panda: the kernel starts the first thread here with the
 * spawn argument in rdi and rsp at the top of the stack region. Calls
 * `uint64_t main(uint64_t arg)` and exits the process with its result. */
    .text
    .globl _start
    .section .text._start, "ax"
_start:
    xor %ebp, %ebp
    and $-16, %rsp
    call main
    mov %rax, %rdi
    mov $0x20001, %eax      /* OP_PROCESS_EXIT */
    syscall
    ud2
    .section .note.GNU-stack, "", @progbits
