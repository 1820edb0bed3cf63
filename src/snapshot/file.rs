// SPDX-License-Identifier: Apache-2.0
//! A snapshot on disk (experimental, issue 13): `state.bin` (the KVM state of the VM and of
//! every vCPU, and COM1's registers) and `memory.bin` (guest RAM, region after region). The
//! format is this build's own: length-prefixed little-endian records, the KVM structures as
//! their raw bytes (kvm-bindings' zerocopy impls). A snapshot is only meant to be restored by
//! the same ember build on the same host, with the same VM flags.

use std::io::{Read, Write};
use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, CpuId};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::kvm_state::{VcpuState, VmState};
use crate::memory::GuestMemory;

const MAGIC: &[u8; 8] = b"EMBSNAP1";

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A file could not be read or written.
    #[error("snapshot file {0}")]
    Io(String, #[source] std::io::Error),
    /// The state file is not one this build wrote.
    #[error("snapshot state file is malformed: {0}")]
    Format(&'static str),
    /// Guest memory could not be read or written.
    #[error("guest memory at {0:#x} cannot be accessed")]
    Memory(u64),
}

/// What `state.bin` holds.
#[derive(Debug)]
pub struct SavedState {
    /// The VM's KVM state.
    pub vm: VmState,
    /// Every vCPU's KVM state, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1's registers and receive FIFO.
    pub serial: Option<SerialState>,
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn val<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
    fn opt<T: IntoBytes + Immutable>(&mut self, v: Option<&T>) {
        match v {
            Some(v) => {
                self.0.push(1);
                self.val(v);
            }
            None => self.0.push(0),
        }
    }
    fn list<T: IntoBytes + Immutable>(&mut self, v: &[T]) {
        self.0.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for e in v {
            self.val(e);
        }
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FileError> {
        if self.0.len() < n {
            return Err(FileError::Format("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FileError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, FileError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn len(&mut self) -> Result<usize, FileError> {
        usize::try_from(self.u64()?).map_err(|_| FileError::Format("length"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], FileError> {
        let n = self.len()?;
        self.take(n)
    }
    fn val<T: FromBytes>(&mut self) -> Result<T, FileError> {
        T::read_from_bytes(self.bytes()?).map_err(|_| FileError::Format("record size"))
    }
    fn opt<T: FromBytes>(&mut self) -> Result<Option<T>, FileError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.val().map(Some),
            _ => Err(FileError::Format("option tag")),
        }
    }
    fn list<T: FromBytes>(&mut self) -> Result<Vec<T>, FileError> {
        let n = self.len()?;
        if n > 4096 {
            return Err(FileError::Format("list length"));
        }
        (0..n).map(|_| self.val()).collect()
    }
}

/// kvm_fpu has no zerocopy impl: its fields one by one.
fn put_fpu(e: &mut Enc, f: &kvm_fpu) {
    for r in &f.fpr {
        e.bytes(r);
    }
    e.val(&f.fcw);
    e.val(&f.fsw);
    e.val(&f.ftwx);
    e.val(&f.last_opcode);
    e.val(&f.last_ip);
    e.val(&f.last_dp);
    for r in &f.xmm {
        e.bytes(r);
    }
    e.val(&f.mxcsr);
}

fn get_fpu(d: &mut Dec<'_>) -> Result<kvm_fpu, FileError> {
    let mut f = kvm_fpu::default();
    for r in &mut f.fpr {
        *r = d.val()?;
    }
    f.fcw = d.val()?;
    f.fsw = d.val()?;
    f.ftwx = d.val()?;
    f.last_opcode = d.val()?;
    f.last_ip = d.val()?;
    f.last_dp = d.val()?;
    for r in &mut f.xmm {
        *r = d.val()?;
    }
    f.mxcsr = d.val()?;
    Ok(f)
}

fn put_vcpu(e: &mut Enc, v: &VcpuState) {
    e.list::<kvm_cpuid_entry2>(v.cpuid.as_slice());
    e.val(&v.mp_state);
    e.val(&v.regs);
    e.val(&v.sregs);
    put_fpu(e, &v.fpu);
    e.opt(v.xsave.as_ref());
    e.opt(v.xcrs.as_ref());
    e.opt(v.debugregs.as_ref());
    e.val(&v.lapic);
    e.list::<kvm_msr_entry>(&v.msrs);
    e.list::<u32>(&v.msrs_failed);
    e.opt(v.vcpu_events.as_ref());
    e.opt(v.tsc_khz.as_ref());
}

fn get_vcpu(d: &mut Dec<'_>) -> Result<VcpuState, FileError> {
    let entries: Vec<kvm_cpuid_entry2> = d.list()?;
    Ok(VcpuState {
        cpuid: CpuId::from_entries(&entries).map_err(|_| FileError::Format("CPUID"))?,
        mp_state: d.val()?,
        regs: d.val()?,
        sregs: d.val()?,
        fpu: get_fpu(d)?,
        xsave: d.opt()?,
        xcrs: d.opt()?,
        debugregs: d.opt()?,
        lapic: d.val()?,
        msrs: d.list()?,
        msrs_failed: d.list()?,
        vcpu_events: d.opt()?,
        tsc_khz: d.opt()?,
    })
}

fn put_serial(e: &mut Enc, s: &SerialState) {
    e.bytes(&[
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ]);
    e.bytes(&s.in_buffer);
}

fn get_serial(d: &mut Dec<'_>) -> Result<SerialState, FileError> {
    let r = d.bytes()?;
    let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
        <[u8; 9]>::try_from(r).map_err(|_| FileError::Format("serial registers"))?;
    Ok(SerialState {
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer: d.bytes()?.to_vec(),
    })
}

/// Encodes `s` as `state.bin` holds it.
pub fn encode(s: &SavedState) -> Vec<u8> {
    let mut e = Enc::default();
    e.0.extend_from_slice(MAGIC);
    e.val(&s.vm.pic_master);
    e.val(&s.vm.pic_slave);
    e.val(&s.vm.ioapic);
    e.val(&s.vm.pit);
    e.val(&s.vm.clock);
    e.0.extend_from_slice(&(s.vcpus.len() as u64).to_le_bytes());
    for v in &s.vcpus {
        put_vcpu(&mut e, v);
    }
    match &s.serial {
        Some(st) => {
            e.0.push(1);
            put_serial(&mut e, st);
        }
        None => e.0.push(0),
    }
    e.0
}

/// Decodes what [`encode`] wrote.
pub fn decode(b: &[u8]) -> Result<SavedState, FileError> {
    let mut d = Dec(b);
    if d.take(MAGIC.len())? != MAGIC {
        return Err(FileError::Format("not an ember snapshot of this format"));
    }
    let vm = VmState {
        pic_master: d.val()?,
        pic_slave: d.val()?,
        ioapic: d.val()?,
        pit: d.val()?,
        clock: d.val()?,
    };
    let n = d.len()?;
    if n > 1024 {
        return Err(FileError::Format("vCPU count"));
    }
    let vcpus = (0..n).map(|_| get_vcpu(&mut d)).collect::<Result<_, _>>()?;
    let serial = match d.u8()? {
        0 => None,
        1 => Some(get_serial(&mut d)?),
        _ => return Err(FileError::Format("serial tag")),
    };
    if !d.0.is_empty() {
        return Err(FileError::Format("trailing bytes"));
    }
    Ok(SavedState { vm, vcpus, serial })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |e| FileError::Io(path.display().to_string(), e)
}

/// Writes `state.bin` and `memory.bin` into `dir` (created if needed).
pub fn write(dir: &Path, state: &SavedState, mem: &GuestMemory) -> Result<(), FileError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let p = dir.join("state.bin");
    std::fs::write(&p, encode(state)).map_err(io(&p))?;
    let p = dir.join("memory.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(io(&p))?);
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = usize::try_from((region.len() - off).min(buf.len() as u64)).unwrap_or(0);
            let addr = vm_memory::GuestAddress(region.start_addr().0 + off);
            mem.read_slice(&mut buf[..n], addr)
                .map_err(|_| FileError::Memory(addr.0))?;
            f.write_all(&buf[..n]).map_err(io(&p))?;
            off += n as u64;
        }
    }
    f.flush().map_err(io(&p))
}

/// Reads `state.bin` from `dir`.
pub fn read_state(dir: &Path) -> Result<SavedState, FileError> {
    let p = dir.join("state.bin");
    decode(&std::fs::read(&p).map_err(io(&p))?)
}

/// Fills `mem` from `dir/memory.bin` (which must be exactly as large).
pub fn read_memory(dir: &Path, mem: &GuestMemory) -> Result<(), FileError> {
    let p = dir.join("memory.bin");
    let mut f = std::io::BufReader::new(std::fs::File::open(&p).map_err(io(&p))?);
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = usize::try_from((region.len() - off).min(buf.len() as u64)).unwrap_or(0);
            f.read_exact(&mut buf[..n]).map_err(io(&p))?;
            let addr = vm_memory::GuestAddress(region.start_addr().0 + off);
            mem.write_slice(&buf[..n], addr)
                .map_err(|_| FileError::Memory(addr.0))?;
            off += n as u64;
        }
    }
    let mut rest = [0u8; 1];
    match f.read(&mut rest).map_err(io(&p))? {
        0 => Ok(()),
        _ => Err(FileError::Format(
            "memory.bin is larger than the guest memory",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::kvm_state::KvmCaps;
    use crate::vm::open_kvm;

    #[test]
    fn state_file_round_trip() {
        let Ok(kvm) = open_kvm() else {
            eprintln!("SKIP state_file_round_trip: /dev/kvm is not usable here");
            return;
        };
        let caps = KvmCaps::probe(&kvm).unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rbx = 0xdead_beef;
        vcpu.set_regs(&regs).unwrap();
        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.xmm[3][5] = 42;
        vcpu.set_fpu(&fpu).unwrap();
        let saved = SavedState {
            vm: VmState::save(&vm).unwrap(),
            vcpus: vec![VcpuState::save(&vcpu, &caps).unwrap()],
            serial: Some(SerialState {
                interrupt_enable: 3,
                in_buffer: b"ab".to_vec(),
                ..SerialState::default()
            }),
        };
        let bytes = encode(&saved);
        let back = decode(&bytes).unwrap();
        assert_eq!(encode(&back), bytes);
        let (v, w) = (&saved.vcpus[0], &back.vcpus[0]);
        assert_eq!(w.regs.rbx, 0xdead_beef);
        assert_eq!(w.fpu.xmm[3][5], 42);
        assert_eq!(w.msrs.len(), v.msrs.len());
        assert_eq!(w.cpuid.as_slice().len(), v.cpuid.as_slice().len());
        assert_eq!(back.vm.clock.clock, saved.vm.clock.clock);
        assert_eq!(back.serial.as_ref().unwrap().in_buffer, b"ab");
        assert_eq!(back.serial.unwrap().interrupt_enable, 3);
        // Damage is reported, not trusted.
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(b"EMBSNAP0").is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
}
