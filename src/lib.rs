// SPDX-License-Identifier: Apache-2.0
//! ember: a microVM monitor on Linux KVM.
//!
//! Reading order, which is also the order a VM comes to life:
//!
//! 1. [`cli`] — the command line, turned into a
//! 2. [`config::VmConfig`], validated before anything is created;
//! 3. [`builder::build_vm`] — the boot recipe, one step per line:
//!    [`vm`] (KVM, irqchip, PIT) → [`memory`] (guest RAM around the MMIO gap) →
//!    [`devices`] (serial, i8042, boot timer, exit device; virtio-mmio; ACPI platform and VM
//!    generation ID) →
//!    [`kernel`] (ELF/bzImage, initrd, command line; [`image_file`] maps them into guest
//!    memory from ember's image cache) → [`arch::x86_64`] (zero page or PVH start info, e820,
//!    MP table, registers, CPUID) → [`vcpu`] (one thread each);
//! 4. [`vmm::Vmm::run`] — the [`event_loop`] on the main thread until the guest ends, with
//!    [`exit`] saying how (and a [`watchdog`] for when a device handler never returns).
//!
//! [`snapshot`] saves a stopped VM (its [`config::VmConfig`], every device's state and the
//! KVM state, in one versioned, checksummed file, with guest RAM beside it) and checks a
//! snapshot against the VM it is restored into. A restored VM must get a new VM generation
//! ID ([`vmm::Vmm::new_vm_generation`]) before its vCPUs run, so that its guest reseeds its RNG.
//!
//! [`sandbox`] confines ember once a VM is set up: a seccomp filter per thread, Landlock
//! rules, and an optional drop of root's privileges (docs/security.md).
//!
//! [`host`] knows what a PVM host (KVM without hardware virtualization) needs. [`exec`] (with
//! [`cpio`]) runs one command in a throwaway VM (`ember exec`).
//!
//!
//! Measuring: [`timeline`] records boot phases; [`bench`](mod@bench) (`ember bench`) boots a guest
//! many times and compares with peer VMMs; [`profiler`] samples guest stacks; [`compare`]
//! (`ember compare`) runs one workload in a container, a sandbox and a microVM side by side.

pub mod api;
pub mod arch;
pub mod bench;
pub mod builder;
pub mod cli;
pub mod compare;
pub mod config;
pub mod cpio;
pub mod devices;
pub mod event_loop;
pub mod exec;
pub mod exit;
pub mod host;
pub mod image_file;
pub mod kernel;
pub mod kernel_problems;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod profiler;
pub mod sandbox;
pub mod snapshot;
pub mod symbols;
pub mod terminal;
pub mod timeline;
pub mod user_file;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub mod watchdog;

use std::time::Instant;

/// Prints an error and its causes, one per line, on stderr.
pub fn print_error_chain(err: &dyn std::error::Error) {
    let mut msg = format!("ember: error: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!("\r\n  caused by: {s}"));
        source = s.source();
    }
    eprint!("{msg}\r\n");
}

/// Builds and runs one VM to its end, with the console in raw mode when stdin is a terminal.
pub fn run_vm(
    config: &config::VmConfig,
    start: Instant,
    hooks: builder::BuildHooks,
    mut opts: vmm::RunOptions,
) -> Result<vmm::RunOutcome, builder::BuildError> {
    if opts.signal_fd.is_none() {
        match event_loop::block_signals_to_fd() {
            Ok(fd) => opts.signal_fd = Some(fd),
            Err(e) => log::warn!("cannot handle signals: {e}"),
        }
    }
    let vmm = builder::build_vm(config, start, hooks)?;
    let _raw = config
        .stdin
        .then(|| terminal::RawTerminal::enable(libc::STDIN_FILENO))
        .flatten();
    Ok(vmm.run(opts))
}

/// Formats an error's chain on one line (for logs).
pub fn error_chain_line(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
