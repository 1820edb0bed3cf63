#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""QEMU microvm as a peer for snapshot/restore on a PVM host (docs/snapshot-pvm.md): boots
ember's default guest (target/guest) with a tick loop, migrates it to a file after 'tick 1',
quits, then starts a second QEMU process from the file and continues it.

usage: qemu-snapshot.py [EXTRA_CMDLINE_WORDS]   (e.g. clocksource=tsc)
Work files and serial logs go to $TMPDIR/ember-qemu-snapshot/."""
import os, socket, subprocess, sys, tempfile, time
G = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../target/guest")
D = os.path.join(tempfile.gettempdir(), "ember-qemu-snapshot")
os.makedirs(D, exist_ok=True)
cs = sys.argv[1] if len(sys.argv) > 1 else ""
cmd = ("read -r cs </sys/devices/system/clocksource/clocksource0/current_clocksource; echo cs $cs; "
       "i=0; while [ $i -lt 14 ]; do read -r u x </proc/uptime; echo tick $i $u; i=$((i+1)); sleep 1; done")
append = ("console=ttyS0 reboot=k panic=-1 noxsave clearcpuid=smap,popcnt GLIBC_TUNABLES=glibc.cpu.hwcaps=-OSXSAVE "
          "random.trust_cpu=on quiet rodata=off 8250.nr_uarts=1 rdinit=/init " + cs + f' ember.cmd="{cmd}"')
base = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu",
        "host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-unhalt=off,kvm-pv-sched-yield=off",
        "-m", "64", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-device", "i8042",
        "-no-reboot", "-kernel", G + "/vmlinux", "-initrd", G + "/initramfs.cpio", "-append", append]
tag = "tsc" if "tsc" in cs else ("kvmclock" if cs else "default")
mig = f"{D}/qemu-{tag}.mig"
def mon(path, line):
    s = socket.socket(socket.AF_UNIX); s.connect(path); s.settimeout(5)
    time.sleep(0.2); 
    try: s.recv(65536)
    except Exception: pass
    s.sendall((line + "\n").encode()); time.sleep(0.5)
    try: out = s.recv(65536).decode(errors="replace")
    except Exception: out = ""
    s.close(); return out
def wait_for(path, text, t):
    end = time.time() + t
    while time.time() < end:
        if os.path.exists(path) and text in open(path, errors="replace").read(): return True
        time.sleep(0.5)
    return False
for f in (f"{D}/qa.mon", f"{D}/qb.mon", mig): 
    if os.path.exists(f): os.remove(f)
sa, sb = f"{D}/qemu-{tag}-a.serial", f"{D}/qemu-{tag}-b.serial"
for f in (sa, sb):
    if os.path.exists(f): os.remove(f)
a = subprocess.Popen(base + ["-serial", f"file:{sa}", "-monitor", f"unix:{D}/qa.mon,server,nowait"])
t0 = time.time()
if not wait_for(sa, "tick 1", 150): print("A never reached tick 1"); a.kill(); sys.exit(1)
print(f"A at tick 1 after {time.time()-t0:.1f}s")
print(mon(f"{D}/qa.mon", "stop"))
print(mon(f"{D}/qa.mon", f'migrate "exec:cat > {mig}"'))
for _ in range(60):
    o = mon(f"{D}/qa.mon", "info migrate")
    if "completed" in o or "failed" in o: print(o[-400:]); break
    time.sleep(1)
mon(f"{D}/qa.mon", "quit"); a.wait(10)
print("A serial:\n" + open(sa, errors="replace").read()[-300:])
time.sleep(3)
b = subprocess.Popen(base + ["-serial", f"file:{sb}", "-monitor", f"unix:{D}/qb.mon,server,nowait",
                             "-incoming", f"exec:cat {mig}"], stderr=open(f"{D}/qemu-{tag}-b.err", "w"))
t1 = time.time()
for _ in range(30):
    time.sleep(1)
    try:
        st = mon(f"{D}/qb.mon", "info status")
    except Exception as e:
        continue
    if "paused" in st or "running" in st:
        print("B status before cont:", st.split("VM status:")[-1][:40].strip())
        print(mon(f"{D}/qb.mon", "cont")[-60:])
        break
try: rc = b.wait(90)
except subprocess.TimeoutExpired:
    print("B still running after 90s: " + mon(f"{D}/qb.mon", "info status") + mon(f"{D}/qb.mon", "info registers")[:1500]); b.kill(); rc = "killed"
print(f"B ended rc={rc} after {time.time()-t1:.1f}s")
print("B serial:\n" + open(sb, errors="replace").read())
print("B stderr:\n" + open(f"{D}/qemu-{tag}-b.err").read()[-1000:])
