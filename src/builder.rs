// SPDX-License-Identifier: Apache-2.0
//! The boot recipe: from a validated [`VmConfig`] to a [`Vmm`] whose vCPUs are running.
//! Each step is one call, in the order the hardware needs them; read [`build_vm`] top to
//! bottom.

use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

use crate::arch::x86_64::layout::{
    ACPI_MMIO_SIZE, ACPI_MMIO_START, BOOT_TIMER_SIZE, BOOT_TIMER_START, COM1_IRQ, COM1_PORT,
    COM2_IRQ, COM2_PORT, EXIT_DEVICE_SIZE, EXIT_DEVICE_START, GED_IRQ, I8042_COMMAND_PORT,
    I8042_DATA_PORT, SERIAL_PORT_SIZE,
};
use crate::arch::x86_64::regs::EntryProtocol;
use crate::arch::x86_64::{acpi, mptable, write_pvh_start_info, write_zero_page, BootError};
use crate::config::{ConfigError, ConsoleSink, VmConfig};
use crate::devices::acpi::{AcpiPlatform, GedEvents, PowerButton};
use crate::devices::legacy::boot_timer::BootTimer;
use crate::devices::legacy::console::ConsoleHandle;
use crate::devices::legacy::exit_device::{ExitDevice, ReadySignal};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{ConsoleOutput, SerialDevice, SerialInput};
use crate::devices::virtio::block::{Block, BlockError, DiskFile};
use crate::devices::virtio::fs::{FsError, VirtioFs};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::device::Net;
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::NetError;
use crate::devices::virtio::rng::{Rng, RngError};
use crate::devices::virtio::vsock::device::Vsock;
use crate::devices::virtio::vsock::VsockError;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::vmgenid::{VmGenId, VmGenIdError};
use crate::devices::{DeviceError, DeviceManager, MmioSlot};
use crate::event_loop::{new_event_manager, EventManager, ExitWatcher};
use crate::exit::VmExit;
use crate::host::{append_switches, HostInfo};
use crate::kernel::{self, ImageLoader, KernelError, KernelFormat};
use crate::memory::{create_guest_memory, GuestMemory, MemoryError};
use crate::snapshot::devices::DeviceStates;
use crate::snapshot::file::FileState;
use crate::snapshot::format::SnapshotError;
use crate::symbols::LazySymbols;
use crate::timeline::{Phase, Timeline};
use crate::vcpu::{Vcpu, VcpuBootParams, VcpuError, VcpuShared};
use crate::vm::{open_kvm, Vm, VmError};
use crate::vmm::Vmm;
use event_manager::{MutEventSubscriber, SubscriberOps};

/// Errors while building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM or VM set-up failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel, initrd or command line failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Writing boot structures failed.
    #[error("cannot set up the boot structures")]
    Boot(#[from] BootError),
    /// A device could not be attached.
    #[error("cannot attach devices")]
    Device(#[from] DeviceError),
    /// A vCPU could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop could not be set up.
    #[error("cannot set up the event loop")]
    EventLoop(#[source] std::io::Error),
    /// Reading host CPUID support failed.
    #[error("cannot read the host's supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// A disk image could not be opened, locked or used.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A TAP could not be opened or set up.
    #[error("cannot set up the network device")]
    Net(#[from] NetError),
    /// The vsock Unix socket could not be set up.
    #[error("cannot set up the vsock device")]
    Vsock(#[from] VsockError),
    /// A snapshot to restore could not be read or restored.
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] SnapshotError),
    /// A virtio-fs device (its virtiofsd) could not be set up.
    #[error("cannot set up a --share directory")]
    Fs(#[from] FsError),
    /// The rng device could not be created.
    #[error("cannot set up the rng device")]
    Rng(#[from] RngError),
    /// The VM generation ID could not be set up.
    #[error("cannot set up the VM generation ID")]
    VmGenId(#[from] VmGenIdError),
    /// Root's privileges could not be dropped (`--uid`/`--gid`).
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// Extra pieces a caller can plug into the build (the profiler's kick hook, devices added
/// by later subsystems).
#[derive(Default)]
pub struct BuildHooks {
    /// Called on vCPU threads after each kick.
    pub kick_hook: Option<Arc<dyn crate::vcpu::KickHook>>,
    /// Signalled when the guest writes the boot timer (`ember bench` samples memory then).
    pub boot_timer_notify: Option<vmm_sys_util::eventfd::EventFd>,
    /// Start from the snapshot in this directory instead of booting (`ember restore`, or
    /// `ember run --restore-from` with the VM flags of the saved run).
    pub restore_from: Option<std::path::PathBuf>,
    /// The state file of `restore_from`, when the caller has read it already (`ember
    /// restore` takes the configuration from it); read from the directory when `None`.
    pub restore_state: Option<Box<FileState>>,
    /// Start with every vCPU paused before its first instruction (the run loop must be told:
    /// [`RunOptions::start_paused`](crate::vmm::RunOptions::start_paused)).
    pub start_paused: bool,
}

impl std::fmt::Debug for BuildHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildHooks").finish_non_exhaustive()
    }
}

/// How a guest starts: booted (`B`: its kernel and initrd being loaded, then loaded), or
/// restored from the snapshot in a directory.
enum Start<B> {
    Boot(B),
    Snapshot(std::path::PathBuf, Box<FileState>),
}

impl<B> Start<B> {
    /// The snapshot's state, for a restore.
    fn saved(&self) -> Option<&FileState> {
        match self {
            Start::Boot(_) => None,
            Start::Snapshot(_, saved) => Some(saved),
        }
    }
}

/// Builds the VM described by `config` and starts its vCPUs. `start` is the process start,
/// from which boot phases are timed.
///
/// With a snapshot to restore (`hooks.restore_from`), guest memory is mapped from the
/// snapshot's memory file, which holds everything a boot writes into memory (kernel, initrd,
/// command line, ACPI and MP tables, boot structures): steps 6 and 7 are skipped and the
/// vCPUs are created from their saved state. The devices are attached as for a boot, in the
/// same order (the same MMIO windows and interrupt lines), and restored before the vCPUs
/// start.
pub fn build_vm(
    config: &VmConfig,
    start: Instant,
    mut hooks: BuildHooks,
) -> Result<Vmm, BuildError> {
    let timeline = Arc::new(Timeline::new(start));

    // 1. Validate what can be validated without KVM, and look at the host (a restore does
    //    not read the kernel and initrd files: the snapshot's memory holds them).
    let restore_from = hooks.restore_from.take();
    if restore_from.is_some() {
        config.validate_without_images()?;
    } else {
        config.validate()?;
    }
    let host = HostInfo::detect();
    // Disk images are opened and locked now, so that a missing or busy image is reported
    // before anything is created.
    let disks = config
        .disks
        .iter()
        .map(DiskFile::open)
        .collect::<Result<Vec<_>, _>>()?;
    // A snapshot to start from is read and checked against `config` now, so that a bad one
    // (or one with other NICs) stops here, before TAPs are opened.
    let restore = restore_from
        .map(|dir| read_snapshot(config, &dir, hooks.restore_state.take()).map(|s| (dir, s)))
        .transpose()?;
    // So are TAPs and the vsock socket: a missing TAP or a busy socket path stops here.
    let taps = open_taps(config)?;
    let vsock = config.vsock.as_ref().map(Vsock::new).transpose()?;

    // 2. Guest memory. For a boot: fresh memory, and the kernel and initrd loaded into it on
    //    a helper thread while the VM is set up (mapped from the image cache, or copied: CPU
    //    work that needs no KVM). For a restore: the snapshot's memory file mapped
    //    copy-on-write (a page is read when it is first touched).
    let (mem, mapped_images, guest) = match restore {
        None => {
            // virtiofsd maps guest memory too: it must be a shared memory file then.
            let mem = if config.shares.is_empty() {
                create_guest_memory(config.mem_bytes())?
            } else {
                crate::memory::create_shared_guest_memory(config.mem_bytes())?
            };
            // Before the images are mapped into it; dropped before it is unmapped.
            let mapped_images = crate::image_file::MappedImages::new(&mem);
            let images = ImageLoader::spawn(
                &mem,
                config.mem_bytes(),
                &config.kernel,
                config.initrd.as_deref(),
                config.initrd_append.as_deref(),
                // Images mapped over guest memory would replace the shared memory file's
                // pages there with private ones that virtiofsd does not see: copy instead.
                config
                    .image_cache
                    .as_ref()
                    .filter(|_| config.shares.is_empty()),
            );
            (mem, mapped_images, Start::Boot(images))
        }
        Some((dir, saved)) if !config.shares.is_empty() => {
            // virtiofsd maps guest memory: a shared memory file, with a copy of the
            // snapshot's memory (a private mapping of the file would hide ember's and the
            // guest's writes from the daemon).
            let mem = crate::snapshot::file::copy_memory_shared(&dir, config.mem_bytes())?;
            let mapped_images = crate::image_file::MappedImages::new(&mem);
            (mem, mapped_images, Start::Snapshot(dir, saved))
        }
        Some((dir, saved)) => {
            let (mem, file) = crate::snapshot::file::map_memory(&dir, config.mem_bytes())?;
            // Its SIGBUS handler mends (and reports) the pages that vanish should another
            // program truncate the file while the VM runs.
            let mut mapped_images = crate::image_file::MappedImages::new(&mem);
            let path = dir.join(crate::snapshot::format::MEMORY_FILE);
            if !mapped_images.covered() {
                log::warn!(
                    "no SIGBUS handler watches guest memory: ember dies if {} is truncated \
                     while the VM runs",
                    path.display()
                );
            }
            mapped_images.watch_snapshot_memory(path, file, config.mem_bytes());
            (mem, mapped_images, Start::Snapshot(dir, saved))
        }
    };

    // 3. KVM, the VM with its memory and its interrupt controllers.
    let kvm = open_kvm()?;
    let vm = Vm::new(&kvm, &mem, &timeline)?;
    config.validate_vcpus(vm.max_vcpus())?;

    // 4. The exit latch and the event loop.
    let exit = Arc::new(VmExit::new().map_err(BuildError::EventLoop)?);
    let mut event_manager = new_event_manager().map_err(BuildError::EventLoop)?;
    event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(exit.clone()))));

    // 5. Legacy devices.
    let mut devices = DeviceManager::new();
    let legacy = attach_legacy_devices(
        config,
        &vm,
        &mut devices,
        &mut event_manager,
        &exit,
        &timeline,
        guest.saved().map(|s| &s.devices),
    )?;
    let (exit_status, ready) = attach_pseudo_devices(
        config,
        &mut devices,
        &exit,
        &timeline,
        hooks.boot_timer_notify.take(),
    )?;
    event_manager.add_subscriber(Arc::new(Mutex::new(crate::event_loop::Wakeup(
        ready.wake_fd().map_err(BuildError::EventLoop)?,
    ))));
    let blocks = attach_block_devices(config, disks, &vm, &mem, &mut devices, &mut event_manager)?;
    attach_net_devices(taps, &vm, &mem, &mut devices, &mut event_manager)?;
    if let Some(vsock) = vsock {
        let slot = attach_virtio_device(
            &vm,
            &mem,
            &mut devices,
            &mut event_manager,
            Arc::new(Mutex::new(vsock)),
        )?;
        log::debug!(
            "vsock: guest CID {} at {:#x}, IRQ {}",
            config.vsock.as_ref().map_or(0, |v| v.cid),
            slot.addr,
            slot.irq
        );
    }
    if let Some(rng) = &config.rng {
        let rng = Rng::new(rng)?;
        attach_virtio_device(
            &vm,
            &mem,
            &mut devices,
            &mut event_manager,
            Arc::new(Mutex::new(rng)),
        )?;
    }
    for (i, share) in config.shares.iter().enumerate() {
        let tag = share.tag(i);
        let fs = VirtioFs::new(share, &tag)?;
        let slot = attach_virtio_device(
            &vm,
            &mem,
            &mut devices,
            &mut event_manager,
            Arc::new(Mutex::new(fs)),
        )?;
        log::debug!(
            "virtio-fs: {} as tag {tag} at {:#x}, IRQ {}",
            share.dir.display(),
            slot.addr,
            slot.irq
        );
    }
    // With ACPI: the platform registers, its power button, and the VM generation ID when the
    // VM may be snapshotted (its random ID written into guest memory now, or a snapshot's
    // read from it; a new one written and its GED event raised after a restore).
    let (power_button, mut vmgenid, acpi_platform) = if config.acpi {
        let (button, ged, platform) = attach_acpi_platform(&vm, &mut devices, &exit)?;
        let vmgenid = match guest {
            _ if !config.vm_generation_id => None,
            Start::Boot(_) => Some(VmGenId::new(&mem, ged)?),
            Start::Snapshot(..) => Some(VmGenId::restored(&mem, ged)?),
        };
        (Some(button), vmgenid, Some(platform))
    } else {
        (None, None, None)
    };

    // 6. and 7. For a boot: the command line, kernel and initrd, boot structures (see
    //    load_guest). A restore skips them: the snapshot's memory holds what its boot wrote.
    let guest = match guest {
        Start::Boot(images) => Start::Boot(load_guest(
            config,
            &host,
            &mem,
            &devices,
            images,
            vmgenid.as_ref(),
            &timeline,
        )?),
        Start::Snapshot(dir, saved) => Start::Snapshot(dir, saved),
    };

    // 8. vCPUs: configure every one (or restore it from the snapshot), then start them.
    let symbols_path = match &guest {
        Start::Boot(loaded) => (loaded.format == KernelFormat::Elf).then(|| config.kernel.clone()),
        // The kernel the snapshot was booted from, if that file is (still) an ELF vmlinux.
        Start::Snapshot(..) => Some(config.kernel.clone()),
    };
    let shared = VcpuShared {
        buses: Arc::new(std::mem::take(&mut devices.buses)),
        exit: exit.clone(),
        mem: mem.clone(),
        symbols: Arc::new(LazySymbols::new(symbols_path)),
        hook: hooks.kick_hook,
        timeline: timeline.clone(),
    };
    let vcpus = match &guest {
        Start::Boot(loaded) => {
            let supported_cpuid = kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(BuildError::Cpuid)?;
            let boot = VcpuBootParams {
                supported_cpuid,
                vcpu_count: config.vcpus,
                hide_pv_hypercalls: config.host_tuning && host.hide_pv_hypercalls(),
                protocol: loaded.protocol,
                entry: loaded.entry,
            };
            (0..config.vcpus)
                .map(|i| Vcpu::new(vm.fd(), i, &boot, &shared))
                .collect::<Result<Vec<_>, _>>()?
        }
        // A snapshot: its devices and KVM state, into the VM built on its memory.
        Start::Snapshot(dir, saved) => restore_snapshot(
            dir,
            saved,
            &mem,
            &vm,
            &devices,
            acpi_platform.as_ref(),
            vmgenid.as_mut(),
            &shared,
        )?,
    };
    // The NICs' MACs are fixed now: one derived from the machine ID (/etc/machine-id) must
    // not be derived again when a snapshot is taken, in the sandbox, which cannot read it.
    let mut parts_config = config.clone();
    for n in &mut parts_config.net {
        n.mac = Some(n.mac());
    }
    let restore_parts = crate::snapshot::RestoreParts {
        config: parts_config,
        shared: shared.clone(),
        irqfds: devices.take_irqfds(),
        virtio: devices.virtio_transports().to_vec(),
        com1: legacy.com1,
        com2: legacy.com2,
        acpi: acpi_platform,
    };
    if hooks.start_paused {
        let kvm = open_kvm()?;
        let caps = Arc::new(
            crate::snapshot::kvm_state::KvmCaps::probe(&kvm)
                .map_err(|e| BuildError::Snapshot(SnapshotError::Caps(e)))?,
        );
        for v in &vcpus {
            v.pause_before_start(caps.clone());
        }
    }
    // /dev/kvm, the TAPs and the images are open: `--uid`/`--gid` take effect before any
    // guest instruction runs.
    crate::sandbox::drop_privileges()?;
    let handles = vcpus
        .into_iter()
        .map(Vcpu::start)
        .collect::<Result<Vec<_>, _>>()?;
    timeline.mark(Phase::VcpusStarted);
    if let Start::Snapshot(dir, _) = &guest {
        log_restored(dir, &timeline);
    }

    let mut vmm = Vmm::new(vm, mem, exit, event_manager, handles, timeline, exit_status);
    vmm.set_kvm(kvm);
    vmm.set_mapped_images(mapped_images);
    vmm.set_ready_signal(ready);
    vmm.set_restore_parts(restore_parts);
    vmm.set_block_devices(blocks);
    for console in legacy.consoles {
        vmm.add_console(console);
    }
    if let Some(button) = power_button {
        vmm.set_shutdown_requester(button.requester(), Some(GED_IRQ));
    }
    if let Some(vmgenid) = vmgenid {
        vmm.set_vm_generation_id(vmgenid);
    }
    Ok(vmm)
}

/// Steps 6 and 7 of a boot: builds the command line, waits for the kernel and initrd
/// (`images`), and writes the command line, the ACPI tables (with `config.acpi`), the PVH
/// start info or zero page and the MP table into guest memory.
fn load_guest(
    config: &VmConfig,
    host: &HostInfo,
    mem: &GuestMemory,
    devices: &DeviceManager,
    images: ImageLoader,
    vmgenid: Option<&VmGenId>,
    timeline: &Timeline,
) -> Result<kernel::LoadedKernel, BuildError> {
    // The command line: the user's, then the host's needs, then the devices'.
    let cmdline = build_cmdline(config, host, devices);

    // Kernel and initrd (from the loader), command line and boot structures.
    let (loaded, initrd) = images.join()?;
    let cmdline_len = kernel::write_cmdline(mem, &loaded, &cmdline)?;
    // ACPI tables (with every device that has an interrupt: see arch::x86_64::acpi) for
    // guests that read them, and the MP table for guests without ACPI.
    let rsdp = if config.acpi {
        let acpi_devices = acpi::AcpiDevices {
            serial: &serial_ports(config),
            virtio: devices.mmio_slots(),
            vmgenid: vmgenid.map(VmGenId::addr),
        };
        let tables =
            acpi::create_acpi_tables(mem, config.vcpus, &acpi_devices).map_err(BootError::from)?;
        Some(tables.rsdp)
    } else {
        None
    };
    match loaded.protocol {
        EntryProtocol::Pvh => write_pvh_start_info(mem, config.mem_bytes(), initrd, rsdp)?,
        EntryProtocol::Linux64 => {
            write_zero_page(mem, config.mem_bytes(), loaded.header, cmdline_len, initrd)?;
        }
    }
    mptable::setup_mptable(mem, config.vcpus).map_err(BootError::from)?;
    timeline.mark(Phase::KernelLoaded);
    log::debug!(
        "kernel {:?} entry {:#x} ({:?}); cmdline: {cmdline}",
        loaded.format,
        loaded.entry,
        loaded.protocol
    );
    Ok(loaded)
}

/// Logs how long a restore took (the time from ember's start to the vCPUs' start, and the
/// steps on the way) and how much memory the process holds right after it.
fn log_restored(dir: &std::path::Path, timeline: &Timeline) {
    use crate::bench::procfs::status_bytes;
    let ms = |p: Phase| {
        timeline.get(p).map_or("-".to_string(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        })
    };
    let mib = |field: &str| {
        status_bytes(None, field).map_or("-".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
        })
    };
    log::info!(
        "restored the snapshot in {}: vCPUs started {} after ember started (VM with guest \
         memory mapped at {}); RSS {} ({} anonymous, {} file-backed)",
        dir.display(),
        ms(Phase::VcpusStarted),
        ms(Phase::MemoryMapped),
        mib("VmRSS"),
        mib("RssAnon"),
        mib("RssFile"),
    );
}

/// The final guest command line.
pub fn build_cmdline(config: &VmConfig, host: &HostInfo, devices: &DeviceManager) -> String {
    let mut cmdline = config.cmdline.trim().to_string();
    if let Some(root) = config.root_cmdline() {
        cmdline.push(' ');
        cmdline.push_str(&root);
    }
    if config.host_tuning {
        if let Some(switches) = host.cmdline_switches() {
            let before = cmdline.clone();
            cmdline = append_switches(&cmdline, switches);
            if cmdline != before {
                log::info!(
                    "PVM host detected (KVM without hardware virtualization): added \
                     `{switches}` to the guest command line and hid KVM's hypercall-based PV \
                     features (--no-host-tuning turns this off)"
                );
            }
        }
    }
    if !config.acpi {
        // No tables: spare an ACPI-capable kernel the search for them (and its "no valid
        // RSDP" error). A kernel without ACPI ignores the switch.
        cmdline = append_switches(&cmdline, NO_ACPI_SWITCH);
    }
    for entry in devices.cmdline_entries() {
        // With ACPI the DSDT describes the virtio-mmio windows; a command-line entry would
        // name an interrupt number a hardware-reduced ACPI guest has not mapped.
        if config.acpi && entry.starts_with(VIRTIO_MMIO_CMDLINE_KEY) {
            continue;
        }
        cmdline.push(' ');
        cmdline.push_str(entry);
    }
    cmdline
}

/// Command-line entries that declare a virtio-mmio device (`virtio_mmio.device=4K@0x..:5`).
pub const VIRTIO_MMIO_CMDLINE_KEY: &str = "virtio_mmio.device=";

/// The serial ports the guest has, for the DSDT.
fn serial_ports(config: &VmConfig) -> Vec<acpi::SerialPort> {
    let mut ports = vec![acpi::SerialPort {
        base: COM1_PORT,
        irq: COM1_IRQ,
    }];
    if config.com2.is_some() {
        ports.push(acpi::SerialPort {
            base: COM2_PORT,
            irq: COM2_IRQ,
        });
    }
    ports
}

/// What ember adds to the guest command line with `--no-acpi`, unless `acpi=` is there.
pub const NO_ACPI_SWITCH: &str = "acpi=off";

/// What a console sink is called in messages.
fn sink_name(sink: ConsoleSink) -> &'static str {
    match sink {
        ConsoleSink::Stdout => "stdout",
        ConsoleSink::Stderr => "stderr",
        ConsoleSink::Null => "/dev/null",
    }
}

fn sink_writer(sink: ConsoleSink) -> Box<dyn std::io::Write + Send> {
    match sink {
        ConsoleSink::Stdout => raw_fd_writer(libc::STDOUT_FILENO),
        ConsoleSink::Stderr => raw_fd_writer(libc::STDERR_FILENO),
        ConsoleSink::Null => Box::new(std::io::sink()),
    }
}

/// An unbuffered writer on a close-on-exec dup of the standard fd `fd`, so every guest
/// byte is out as soon as it is written (and nothing is lost if the process ends). When no
/// fd is left for the dup, it writes to `fd` itself without ever closing it: ember's own
/// messages go there too.
fn raw_fd_writer(fd: std::os::fd::RawFd) -> Box<dyn std::io::Write + Send> {
    // SAFETY: F_DUPFD_CLOEXEC on a standard fd (Rust's runtime keeps 0, 1 and 2 open); the
    // result, when not -1, is a new fd that nothing else owns.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new >= 0 {
        // SAFETY: `new` is a fresh fd owned by nothing else.
        return Box::new(unsafe { std::fs::File::from_raw_fd(new) });
    }
    log::debug!(
        "cannot duplicate fd {fd} for the console ({}): writing to it directly",
        std::io::Error::last_os_error()
    );
    Box::new(StdFdWriter(fd))
}

/// Writes to a standard fd it does not own (and so never closes).
struct StdFdWriter(std::os::fd::RawFd);

impl std::io::Write for StdFdWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: fd 0, 1 or 2 stays open for the whole process (nothing in ember closes
        // it); `buf` is valid for `buf.len()` bytes of reading.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Puts the snapshot `saved` (read from `dir`) into a VM built from its configuration on
/// guest memory mapped from its memory file: the ACPI registers (the serial ports were built
/// from their state), the VM's KVM state, its vCPUs, the virtio transports and devices, and
/// last a new VM generation. Returns the vCPUs, not started.
#[allow(clippy::too_many_arguments)]
fn restore_snapshot(
    dir: &std::path::Path,
    saved: &FileState,
    mem: &GuestMemory,
    vm: &Vm,
    devices: &DeviceManager,
    acpi_platform: Option<&Arc<Mutex<AcpiPlatform>>>,
    vmgenid: Option<&mut VmGenId>,
    shared: &VcpuShared,
) -> Result<Vec<Vcpu>, BuildError> {
    log::debug!(
        "restoring the snapshot in {} (guest memory from its memory file)",
        dir.display()
    );
    if let (Some(platform), Some(state)) = (acpi_platform, &saved.devices.acpi) {
        crate::devices::bus::lock(platform).restore_state(state);
    }
    let opts = crate::snapshot::kvm_state::RestoreOptions::standard();
    saved
        .vm
        .vm
        .restore(vm.fd(), &opts)
        .map_err(|e| BuildError::Snapshot(SnapshotError::RestoreVm(e)))?;
    let vcpus = saved
        .vm
        .vcpus
        .iter()
        .zip(0u32..)
        .map(|(s, i)| Vcpu::restored(vm.fd(), i, s, &opts, shared))
        .collect::<Result<Vec<_>, _>>()?;
    // The virtio transports and devices, with the irqchip restored (a pending interrupt is
    // signalled again through its irqfd) and before any vCPU runs: their queues are in this
    // VM's memory, which holds the snapshot's RAM now.
    let transports = devices.virtio_transports();
    if transports.len() != saved.devices.virtio.len() {
        return Err(SnapshotError::Mismatch {
            what: "virtio device count".into(),
            snapshot: saved.devices.virtio.len().to_string(),
            now: transports.len().to_string(),
        }
        .into());
    }
    for (t, state) in transports.iter().zip(&saved.devices.virtio) {
        crate::devices::bus::lock(t).restore_state(state)?;
    }
    // Last, with RAM, the ACPI registers, the irqchip and every vCPU's LAPIC restored and
    // before any vCPU runs (see devices::vmgenid): a new VM generation, so that two VMs
    // restored from one snapshot do not share random streams. (This is
    // Vmm::new_vm_generation, called before the Vmm exists: its vCPUs start with it.)
    match vmgenid {
        Some(g) => {
            g.regenerate(mem).map_err(SnapshotError::from)?;
        }
        None => log::warn!(
            "restore: the VM has no VM generation ID (--no-acpi): the guest cannot be told it \
             was restored from a snapshot"
        ),
    }
    Ok(vcpus)
}

/// Reads the snapshot in `dir` (its state file, unless the caller read it already: `read`)
/// and checks that a VM built from `config` can take it.
fn read_snapshot(
    config: &VmConfig,
    dir: &std::path::Path,
    read: Option<Box<FileState>>,
) -> Result<Box<FileState>, SnapshotError> {
    let saved = match read {
        Some(s) => s,
        None => Box::new(crate::snapshot::file::read_state(dir)?),
    };
    saved.meta.check(config)?;
    if saved.vm.vcpus.len() != config.vcpus as usize {
        return Err(SnapshotError::Mismatch {
            what: "vCPU state count".into(),
            snapshot: saved.vm.vcpus.len().to_string(),
            now: config.vcpus.to_string(),
        });
    }
    Ok(saved)
}

/// The legacy devices a snapshot saves.
struct LegacyDevices {
    /// The console outputs to flush at the end of the run.
    consoles: Vec<ConsoleHandle>,
    /// COM1.
    com1: Arc<Mutex<SerialDevice>>,
    /// COM2, when the VM has one.
    com2: Option<Arc<Mutex<SerialDevice>>>,
}

/// COM1, COM2 (when asked for) and the i8042; the serial ports with the registers of
/// `saved` when a snapshot is restored.
fn attach_legacy_devices(
    config: &VmConfig,
    vm: &Vm,
    devices: &mut DeviceManager,
    event_manager: &mut EventManager,
    exit: &Arc<VmExit>,
    timeline: &Arc<Timeline>,
    saved: Option<&DeviceStates>,
) -> Result<LegacyDevices, BuildError> {
    // COM1: the console.
    let irq = devices.irqfd(vm.fd(), COM1_IRQ)?;
    let out = ConsoleOutput::new(
        sink_writer(config.console),
        sink_name(config.console),
        Some(timeline.clone()),
        Some(exit.clone()),
    )
    .map_err(BuildError::EventLoop)?;
    let mut consoles = vec![out.handle()];
    let com1 = match saved {
        Some(s) => SerialDevice::from_state(irq, out, &s.com1)?,
        None => SerialDevice::new(irq, out).map_err(BuildError::EventLoop)?,
    };
    let com1 = Arc::new(Mutex::new(com1));
    devices.add_pio(com1.clone(), COM1_PORT, SERIAL_PORT_SIZE)?;
    if config.stdin {
        // SAFETY: close-on-exec dup of stdin; the new fd, when not -1, is owned by the File.
        let fd = unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(BuildError::EventLoop(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh fd nothing else owns.
        let input = unsafe { std::fs::File::from_raw_fd(fd) };
        let sub = SerialInput::new(com1.clone(), input).map_err(BuildError::EventLoop)?;
        event_manager.add_subscriber(Arc::new(Mutex::new(sub)));
    }

    // COM2, when asked for.
    let mut com2 = None;
    if let Some(sink) = config.com2 {
        let irq = devices.irqfd(vm.fd(), COM2_IRQ)?;
        let out = ConsoleOutput::new(sink_writer(sink), sink_name(sink), None, None)
            .map_err(BuildError::EventLoop)?;
        consoles.push(out.handle());
        let port = match saved.and_then(|s| s.com2.as_ref()) {
            Some(state) => SerialDevice::from_state(irq, out, state)?,
            None => SerialDevice::new(irq, out).map_err(BuildError::EventLoop)?,
        };
        let port = Arc::new(Mutex::new(port));
        devices.add_pio(port.clone(), COM2_PORT, SERIAL_PORT_SIZE)?;
        com2 = Some(port);
    }

    // i8042: data port 0x60 through command port 0x64, one device.
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    devices.add_pio(
        i8042,
        I8042_DATA_PORT,
        I8042_COMMAND_PORT - I8042_DATA_PORT + 1,
    )?;
    Ok(LegacyDevices {
        consoles,
        com1,
        com2,
    })
}

/// The exit device's status slot and ready signal.
type PseudoDevices = (Arc<Mutex<Option<u32>>>, Arc<ReadySignal>);

fn attach_pseudo_devices(
    config: &VmConfig,
    devices: &mut DeviceManager,
    exit: &Arc<VmExit>,
    timeline: &Arc<Timeline>,
    boot_timer_notify: Option<vmm_sys_util::eventfd::EventFd>,
) -> Result<PseudoDevices, BuildError> {
    let timer = BootTimer::new(timeline.clone(), config.boot_timer).with_notify(boot_timer_notify);
    let timer = Arc::new(Mutex::new(timer));
    devices.add_mmio(timer, BOOT_TIMER_START, BOOT_TIMER_SIZE)?;
    let ready = Arc::new(ReadySignal::new().map_err(BuildError::EventLoop)?);
    let exit_dev = ExitDevice::new(exit.clone(), config.exit_on_status).with_ready(ready.clone());
    let status = exit_dev.status();
    devices.add_mmio(
        Arc::new(Mutex::new(exit_dev)),
        EXIT_DEVICE_START,
        EXIT_DEVICE_SIZE,
    )?;
    Ok((status, ready))
}

/// One virtio-blk device per `--disk`, in order (the guest names them vda, vdb, ...).
/// Opens the TAP of every `--net` device and makes the NICs.
fn open_taps(config: &VmConfig) -> Result<Vec<Net>, BuildError> {
    let mut nics = Vec::new();
    for n in &config.net {
        let tap = Tap::open(&n.tap)?;
        match tap.bring_up() {
            Ok(true) => log::info!("TAP {} was down: set it up", n.tap),
            Ok(false) => {}
            Err(e) => log::warn!(
                "TAP {} may be down and ember cannot set it up ({e}): run `ip link set {} up`",
                n.tap,
                n.tap
            ),
        }
        nics.push(Net::new(tap, n.mac())?.with_rate_limit(n.rx, n.tx)?);
    }
    Ok(nics)
}

fn attach_net_devices(
    nics: Vec<Net>,
    vm: &Vm,
    mem: &GuestMemory,
    devices: &mut DeviceManager,
    event_manager: &mut EventManager,
) -> Result<(), BuildError> {
    for nic in nics {
        let (tap, mac) = (nic.tap_name().to_string(), nic.mac());
        let slot =
            attach_virtio_device(vm, mem, devices, event_manager, Arc::new(Mutex::new(nic)))?;
        log::debug!(
            "net: TAP {tap}, MAC {mac} at {:#x}, IRQ {}",
            slot.addr,
            slot.irq
        );
    }
    Ok(())
}

fn attach_block_devices(
    config: &VmConfig,
    disks: Vec<DiskFile>,
    vm: &Vm,
    mem: &GuestMemory,
    devices: &mut DeviceManager,
    event_manager: &mut EventManager,
) -> Result<Vec<Arc<Mutex<Block>>>, BuildError> {
    let mut blocks = Vec::new();
    for (i, (disk, cfg)) in disks.into_iter().zip(&config.disks).enumerate() {
        let name = VmConfig::disk_name(i);
        let path = disk.path().display().to_string();
        let (sectors, ro) = (disk.sectors(), disk.read_only());
        let block = Arc::new(Mutex::new(
            Block::new(disk, &name, cfg.id.as_deref())?.with_rate_limit(cfg.bw, cfg.iops)?,
        ));
        blocks.push(block.clone());
        let slot = attach_virtio_device(vm, mem, devices, event_manager, block)?;
        log::debug!(
            "{name}: {path} ({} MiB{}) at {:#x}, IRQ {}",
            sectors >> 11,
            if ro { ", read-only" } else { "" },
            slot.addr,
            slot.irq
        );
    }
    Ok(blocks)
}

/// Plugs a virtio device into the VM, in one call: allocates its MMIO window and interrupt
/// line, connects the line to a KVM irqfd, registers one KVM ioeventfd per queue on the
/// QueueNotify register (datamatch = queue index, so notifications never exit to the VMM),
/// puts a [`MmioTransport`] for it on the MMIO bus, adds the device to the event loop, and
/// tells the guest about it with a `virtio_mmio.device=` command-line entry. Call it before
/// the command line is built (step 6 of [`build_vm`]).
pub fn attach_virtio_device<D>(
    vm: &Vm,
    mem: &GuestMemory,
    devices: &mut DeviceManager,
    event_manager: &mut EventManager,
    device: Arc<Mutex<D>>,
) -> Result<MmioSlot, DeviceError>
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    use kvm_ioctls::IoEventAddress;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let slot = devices.allocate_mmio_slot()?;
    let interrupt = Arc::new(Interrupt::new(devices.irqfd(vm.fd(), slot.irq)?));
    let queues = crate::devices::bus::lock(&device).queue_max_sizes().len();
    let notify = slot.addr + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY);
    let mut queue_evts = Vec::with_capacity(queues);
    for i in 0..queues {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        vm.fd()
            .register_ioevent(&evt, &IoEventAddress::Mmio(notify), index)
            .map_err(|e| DeviceError::Ioeventfd(notify, e))?;
        queue_evts.push(Arc::new(evt));
    }
    let transport = MmioTransport::new(mem.clone(), device.clone(), interrupt, queue_evts)?;
    let transport = Arc::new(Mutex::new(transport));
    devices.add_mmio(transport.clone(), slot.addr, slot.size)?;
    devices.push_virtio_transport(transport);
    event_manager.add_subscriber(device);
    devices.push_cmdline(virtio_mmio_cmdline(&slot));
    Ok(slot)
}

/// The command-line entry that announces a virtio-mmio device to Linux
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`): `virtio_mmio.device=<size>@<base>:<irq>`.
pub fn virtio_mmio_cmdline(slot: &MmioSlot) -> String {
    format!(
        "virtio_mmio.device={:#x}@{:#x}:{}",
        slot.size, slot.addr, slot.irq
    )
}

/// The ACPI register window (sleep, reset, GED events) with the GED's interrupt line. The
/// returned power button asks the guest to shut down; the [`GedEvents`] handle raises the
/// GED's other events (the VM generation ID's); the platform itself is kept for snapshots.
fn attach_acpi_platform(
    vm: &Vm,
    devices: &mut DeviceManager,
    exit: &Arc<VmExit>,
) -> Result<(PowerButton, GedEvents, Arc<Mutex<AcpiPlatform>>), BuildError> {
    let irq = devices.irqfd(vm.fd(), GED_IRQ)?;
    let (platform, button) = AcpiPlatform::new(exit.clone(), irq);
    let ged = platform.ged_events();
    let platform = Arc::new(Mutex::new(platform));
    devices.add_mmio(platform.clone(), ACPI_MMIO_START, ACPI_MMIO_SIZE)?;
    Ok((button, ged, platform))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mmio_entries_only_without_acpi() {
        let host = HostInfo { pvm: false };
        let mut devices = DeviceManager::new();
        devices.push_cmdline("virtio_mmio.device=4K@0xd0000000:5");
        devices.push_cmdline("other.option=1");
        let mut c = VmConfig::new("/k");
        let line = build_cmdline(&c, &host, &devices);
        assert!(
            !line.contains("virtio_mmio") && line.ends_with(" other.option=1"),
            "{line}"
        );
        c.acpi = false;
        let line = build_cmdline(&c, &host, &devices);
        assert!(
            line.contains(" virtio_mmio.device=4K@0xd0000000:5"),
            "{line}"
        );
    }

    #[test]
    fn serial_ports_follow_the_config() {
        let mut c = VmConfig::new("/k");
        assert_eq!(serial_ports(&c).len(), 1);
        c.com2 = Some(ConsoleSink::Null);
        let ports = serial_ports(&c);
        assert_eq!((ports[1].base, ports[1].irq), (COM2_PORT, COM2_IRQ));
    }

    #[test]
    fn no_acpi_turns_the_guests_acpi_off_unless_the_user_chose() {
        let host = HostInfo { pvm: false };
        let devices = DeviceManager::new();
        let mut c = VmConfig::new("/k");
        assert!(!build_cmdline(&c, &host, &devices).contains("acpi="));
        c.acpi = false;
        assert!(build_cmdline(&c, &host, &devices).ends_with(" acpi=off"));
        c.cmdline.push_str(" acpi=strict");
        let line = build_cmdline(&c, &host, &devices);
        assert!(
            line.contains("acpi=strict") && !line.contains("acpi=off"),
            "{line}"
        );
    }
}
