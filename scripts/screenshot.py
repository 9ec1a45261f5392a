#!/usr/bin/env python3
"""Takes a picture of a QEMU guest's screen and reads it with OCR.

usage: screenshot.py MONITOR_SOCKET OUT_PREFIX
       screenshot.py --quit MONITOR_SOCKET

Asks QEMU's human monitor (a unix socket: -monitor unix:PATH,server,nowait) for a
`screendump` (OUT_PREFIX.ppm), writes OUT_PREFIX.png (to look at), runs `tesseract`
on the picture and prints the text it read. Exit 1 if any step fails. With --quit,
tells QEMU to quit instead.
Used by scripts/test.sh's screen checks; no Python packages beyond the standard library.
"""

import os
import socket
import struct
import subprocess
import sys
import time
import zlib


def screendump(sock_path, ppm):
    if os.path.exists(ppm):
        os.remove(ppm)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(f"screendump {ppm}\n".encode())
        deadline = time.time() + 10
        while time.time() < deadline:
            if os.path.exists(ppm) and os.path.getsize(ppm) > 0:
                # The monitor answers once the file is complete.
                time.sleep(0.3)
                return
            time.sleep(0.1)
    raise RuntimeError("QEMU wrote no screendump")


def read_ppm(path):
    with open(path, "rb") as f:
        data = f.read()
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise RuntimeError("not an 8-bit P6 PPM")
    width, height = int(fields[1]), int(fields[2])
    return width, height, data[pos + 1:pos + 1 + width * height * 3]


def write_png(path, width, height, rgb):
    rows = b"".join(b"\x00" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(rows, 6)))
        f.write(chunk(b"IEND", b""))


def main():
    if len(sys.argv) != 3:
        print("\n".join(__doc__.strip().splitlines()[2:4]), file=sys.stderr)
        return 64
    if sys.argv[1] == "--quit":
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(sys.argv[2])
                s.sendall(b"quit\n")
                s.recv(4096)
        except OSError as e:
            print(f"screenshot.py: {e}", file=sys.stderr)
            return 1
        return 0
    sock_path, prefix = sys.argv[1], sys.argv[2]
    try:
        ppm = prefix + ".ppm"
        screendump(sock_path, ppm)
        width, height, rgb = read_ppm(ppm)
        write_png(prefix + ".png", width, height, rgb)
        text = subprocess.run(["tesseract", ppm, "-", "--psm", "6"],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        print(f"screenshot.py: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
