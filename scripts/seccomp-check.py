#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Replays every system call an ember thread made after it entered the sandbox against
ember's seccomp filters, and prints each call a filter would not allow (docs/security.md).

    EMBER_DUMP_FILTERS=/tmp/f cargo test --lib dump_filters -- --ignored
    strace -f -X verbose -qq -o /tmp/t.txt target/debug/deps/tiny_guest-HASH --test-threads=1
    python3 scripts/seccomp-check.py /tmp/f /tmp/t.txt [more traces...]

A thread is recognised by the name it gives itself (prctl PR_SET_NAME) and counts from its
own seccomp() call; a thread started by one that entered already counts from its start.
The system call numbers come from the kernel headers (linux-libc-dev)."""
import re, struct, sys, collections
SYS = {}
# x86_64 syscall numbers from the kernel headers
for line in open('/usr/include/x86_64-linux-gnu/asm/unistd_64.h'):
    m = re.match(r'#define __NR_(\w+)\s+(\d+)', line)
    if m: SYS[m.group(1)] = int(m.group(2))
def load(kind):
    b = open(f'{sys.argv[1]}/{kind}.bpf', 'rb').read()
    return [struct.unpack('<HBBI', b[i:i+8]) for i in range(0, len(b), 8)]
FILTERS = {k: load(k) for k in ['vmm','vcpu','console','watchdog','exec-job']}
def run(prog, nr, args):
    data = struct.pack('<iIQ6Q', nr, 0xc000003e, 0, *[a & 0xffffffffffffffff for a in args])
    A = 0; pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        cls = code & 7
        if cls == 0:  # LD
            A = struct.unpack('<I', data[k:k+4])[0]; pc += 1
        elif cls == 4:  # ALU
            op = code & 0xf0
            if op == 0x50: A &= k
            else: raise Exception(f'alu {code:#x}')
            pc += 1
        elif cls == 5:  # JMP
            op = code & 0xf0
            if op == 0x00: pc += 1 + k; continue
            if op == 0x10: c = A == k
            elif op == 0x20: c = A > k
            elif op == 0x30: c = A >= k
            elif op == 0x40: c = (A & k) != 0
            else: raise Exception(f'jmp {code:#x}')
            pc += 1 + (jt if c else jf)
        elif cls == 6:
            return k
        else:
            raise Exception(f'op {code:#x}')
def num(s):
    s = s.strip()
    m = re.match(r'(-?0x[0-9a-f]+|-?\d+)', s)
    if not m: return 0
    t = m.group(1)
    return int(t, 16) if 'x' in t else int(t, 8) if t.lstrip('-').startswith('0') and len(t.lstrip('-')) > 1 else int(t)
def split_args(a):
    out, depth, cur = [], 0, ''
    for ch in a:
        if ch in '[{(': depth += 1
        if ch in ']})': depth -= 1
        if ch == ',' and depth == 0: out.append(cur); cur = ''
        else: cur += ch
    out.append(cur)
    return out
line_re = re.compile(r'^(\d+)\s+(.*)$')
call_re = re.compile(r'^([a-z0-9_]+)\((.*)$')
resumed_re = re.compile(r'^<\.\.\. ([a-z0-9_]+) resumed>(.*)$')
exe, name, entered, pending = {}, {}, {}, {}
bad = collections.Counter()
def kind_of(n):
    if n.startswith('ember-vcpu'): return 'vcpu'
    if n == 'ember-console': return 'console'
    if n.startswith('ember-watchdog'): return 'watchdog'
    if n == 'exec-job': return 'exec-job'
    return 'vmm'
def record(tid, sc, args, ret):
    if sc in ('clone', 'clone3'):
        m = re.search(r'=\s*(\d+)', ret)
        if m:
            c = int(m.group(1)); exe[c] = exe.get(tid); name[c] = name.get(tid, '?'); entered[c] = entered.get(tid, False)
    if sc == 'execve' and '= 0' in ret:
        m = re.match(r'"([^"]*)"', args)
        if m: exe[tid] = m.group(1); name[tid] = 'main'; entered[tid] = False
    if sc == 'prctl' and 'PR_SET_NAME' in args and not entered.get(tid):
        m = re.search(r'"([^"]*)"', args)
        if m: name[tid] = m.group(1)
    if entered.get(tid) and (exe.get(tid) or '').endswith('/ember'):
        k = kind_of(name.get(tid, '?'))
        nr = SYS.get(sc)
        if nr is None: bad[(k, sc, 'unknown')] += 1; return
        a = [num(x) for x in split_args(args)][:6]
        a += [0] * (6 - len(a))
        r = run(FILTERS[k], nr, a)
        if r != 0x7fff0000:
            bad[(k, sc, args[:60])] += 1
    if sc == 'seccomp' and ret.strip().startswith('= 0'):
        entered[tid] = True
for path in sys.argv[2:]:
    for line in open(path, errors='replace'):
        m = line_re.match(line.rstrip('\n'))
        if not m: continue
        tid, rest = int(m.group(1)), m.group(2)
        r = resumed_re.match(rest)
        if r:
            sc = r.group(1); prev = pending.pop(tid, (sc, '')); body = prev[1] + r.group(2)
        else:
            c = call_re.match(rest)
            if not c: continue
            sc, body = c.group(1), c.group(2)
            if body.endswith('<unfinished ...>'):
                pending[tid] = (sc, body[:-len('<unfinished ...>')]); continue
        i = body.rfind(') = ')
        if i < 0: i = body.rfind(') ')
        record(tid, sc, body[:i], body[i+1:])
for (k, sc, a), n in sorted(bad.items()):
    print(f'{k:9} {sc:20} x{n:<6} {a}')
print(f'checked against the filters in {sys.argv[1]}: {sum(bad.values())} call(s) not allowed')
