#!/usr/bin/env python3
"""Copies a Panda console log from stdin to stdout, naming the kernel code behind each
address in crash reports: backtrace frames (`#N 0xffffffff8...`) and `rip=` values get
` function at file:line` appended (from the kernel ELF's debug information, through
one long-running `addr2line`). Lines pass through unchanged otherwise, one at a time,
so the console stays live. Usage: symbolize.py KERNEL_ELF
"""
import re
import shutil
import subprocess
import sys

ADDR = re.compile(rb"(#(\d+)\s+0x(ffffffff8[0-9a-f]{7}))|(rip=0x(ffffffff8[0-9a-f]{7}))")


def main():
    out = sys.stdout.buffer
    tool = shutil.which("addr2line")
    if len(sys.argv) != 2 or tool is None:
        for line in sys.stdin.buffer:
            out.write(line)
            out.flush()
        return
    a2l = subprocess.Popen([tool, "-f", "-C", "-e", sys.argv[1]], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, bufsize=0)
    cache = {}

    def name(addr):
        if addr not in cache:
            a2l.stdin.write(b"0x%x\n" % addr)
            func = a2l.stdout.readline().strip().decode(errors="replace")
            where = a2l.stdout.readline().strip().decode(errors="replace")
            where = re.sub(r"^.*?/(kernel|arch|mm|sched|abi)/src/", r"\1/src/", where)
            where = re.sub(r" \(discriminator \d+\)$", "", where)
            where = re.sub(r"^/rustc/[0-9a-f]+/library/", "", where)
            cache[addr] = None if func == "??" else f"{func} at {where}"
        return cache[addr]

    last_rip = None
    for line in sys.stdin.buffer:
        m = ADDR.search(line)
        if m:
            if m.group(1):
                addr = int(m.group(3), 16)
                # A return address points after its call: name the call, unless this
                # frame is the faulting instruction itself (the report's rip).
                if addr != last_rip:
                    addr -= 1
            else:
                addr = last_rip = int(m.group(5), 16)
            label = name(addr)
            if label:
                line = line.rstrip(b"\r\n") + b"  " + label.encode() + b"\n"
        out.write(line)
        out.flush()
    a2l.stdin.close()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        pass
