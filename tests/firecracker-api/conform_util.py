# SPDX-License-Identifier: Apache-2.0
"""Helpers for scripts/api-conformance.sh (standard library only):

  conform_util.py call SOCKET METHOD PATH BODY|- STATUS   one request on ember's Unix socket;
                                                         fails unless it answers STATUS
  conform_util.py idle-guest FILE                        writes a tiny guest: an ELF64 kernel
                                                         that halts in a loop (as in
                                                         tests/common/mod.rs), so a VM runs
                                                         for the post-boot phase in ms
  conform_util.py fetch URL FILE SHA256                  downloads FILE and checks its SHA-256
"""
import hashlib
import http.client
import os
import socket
import struct
import sys
import urllib.request


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=60)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.unix_path)


def call(sock, method, path, body, status):
    conn = UnixConnection(sock)
    headers = {"Accept": "application/json"}
    data = None
    if body != "-":
        data = body.encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    text = resp.read().decode(errors="replace")
    print(f"{method} {path}: {resp.status} {text}")
    if resp.status != int(status):
        sys.exit(f"{method} {path}: expected {status}, got {resp.status}: {text}")


def idle_guest(path):
    load = 0x10_0000
    code = bytes([0xF4, 0xEB, 0xFD])  # hlt; jmp back to the hlt
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, little endian, version 1
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, load, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, load, load, len(code), len(code), 0x1000)
    image = (ehdr + phdr).ljust(0x1000, b"\0") + code
    with open(path, "wb") as f:
        f.write(image)


def fetch(url, path, sha256):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        sys.exit(f"{url}: {e}")
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        sys.exit(f"{url}: SHA-256 {got}, expected {sha256}: not the pinned file")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"call": call, "idle-guest": idle_guest, "fetch": fetch}[cmd](*args)
