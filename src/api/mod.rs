// SPDX-License-Identifier: Apache-2.0
//! Firecracker's interface: its config file (`ember run --config-file`) and its REST API on
//! a Unix socket (`ember run --api-sock`), so that tools written for Firecracker drive ember.
//!
//! - [`model`]: the request bodies (serde types; unknown fields refused, as Firecracker does);
//! - [`resources`]: what is set before the start, checked as it is set, and turned into
//!   ember's one [`VmConfig`] at `InstanceStart`;
//! - [`http`]: the HTTP/1.1 server (bounded connections, headers and bodies);
//! - [`Api`]: the routes, with Firecracker's pre-/post-boot rules and `fault_message` errors.
//!
//! Threads: the API serves on a thread of its own. The VM is built and run on the main
//! thread: `InstanceStart` hands the configuration over ([`StartCall`]) and waits for the
//! build; after that, requests that act on the running VM (pause, resume, Ctrl+Alt+Del,
//! snapshots) go to the VM's event loop as [`VmmCall`]s, which wake it through an eventfd and
//! are answered when the loop has carried them out. docs/api.md lists the subset and every
//! difference from Firecracker.

pub mod http;
pub mod model;
pub mod resources;

use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use self::http::{Request, Response};
use self::model::*;
use self::resources::{Refused, VmResources};
use crate::config::VmConfig;

/// The version of Firecracker's API that ember implements (`GET /version`).
pub const FIRECRACKER_API_VERSION: &str = "1.17.0";

/// How long an API request waits for the VM's event loop.
const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the API asks of the running VM's event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmRequest {
    /// `PATCH /vm {"state": "Paused"}`.
    Pause,
    /// `PATCH /vm {"state": "Resumed"}`.
    Resume,
    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`: the ACPI power button.
    CtrlAltDel,
    /// `PATCH /drives/{id}` after the start: the drive at `index` (`--disk` order) gets the
    /// image `disk`.
    SwapDrive {
        /// The drive's position in the VM's disks.
        index: usize,
        /// The new image (path and mode).
        disk: crate::config::DiskConfig,
    },
    /// `PUT /snapshot/create`: the VM must be paused.
    SnapshotCreate {
        /// Where the state goes.
        snapshot_path: std::path::PathBuf,
        /// Where guest memory goes.
        mem_file_path: std::path::PathBuf,
    },
}

/// A request to the event loop and where its answer goes.
#[derive(Debug)]
pub struct VmmCall {
    /// What to do.
    pub request: VmmRequest,
    /// `Ok` or the `fault_message`.
    pub reply: Sender<Result<(), String>>,
}

/// The event loop's end of the API: the calls, and the eventfd that wakes the loop for them.
#[derive(Debug)]
pub struct ApiLink {
    /// Calls from the API thread.
    pub calls: Receiver<VmmCall>,
    /// Written once per call.
    pub wake: EventFd,
}

/// The API thread's end: sends calls and waits for their answers.
#[derive(Debug)]
pub struct VmmHandle {
    tx: Sender<VmmCall>,
    wake: EventFd,
}

impl VmmHandle {
    /// A connected pair.
    pub fn pair() -> std::io::Result<(Self, ApiLink)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let handle = Self {
            tx,
            wake: wake.try_clone()?,
        };
        Ok((handle, ApiLink { calls: rx, wake }))
    }

    /// Sends `request` and waits for the event loop's answer.
    pub fn call(&self, request: VmmRequest) -> Result<(), String> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx
            .send(VmmCall { request, reply })
            .map_err(|_| "the VM has ended".to_string())?;
        let _ = self.wake.write(1);
        match answer.recv_timeout(VMM_REPLY_TIMEOUT) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the VM's event loop did not answer within {VMM_REPLY_TIMEOUT:?}"
            )),
        }
    }
}

/// `InstanceStart`: the configuration for the main thread to build and run, and where the
/// result of the build goes (the handle for later calls, or why it failed).
#[derive(Debug)]
pub struct StartCall {
    /// The VM.
    pub config: VmConfig,
    /// `PUT /snapshot/load`: restore the snapshot in this directory (its `state` and `memory`
    /// are links to the files named in the request; remove it once the VM is built), and
    /// whether the guest runs at once (else it starts paused).
    pub restore: Option<(std::path::PathBuf, bool)>,
    /// The build's result.
    pub reply: Sender<Result<VmmHandle, String>>,
}

/// The instance's state as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before `InstanceStart`.
    NotStarted,
    /// Running.
    Running,
    /// Paused (`PATCH /vm`).
    Paused,
}

/// The API's state and routes.
#[derive(Debug)]
pub struct Api {
    /// Set before the start (and reported by `GET /vm/config` after it).
    pub resources: VmResources,
    /// `--id`.
    pub id: String,
    phase: Phase,
    start: Option<Sender<StartCall>>,
    vmm: Option<VmmHandle>,
}

const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

fn body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    model::from_json(&req.body).map_err(|e| {
        let what = if req.body.is_empty() {
            "the request has no body".to_string()
        } else {
            e.to_string()
        };
        Response::fault(400, &format!("{} {}: {what}", req.method, req.path))
    })
}

fn done(r: Result<(), Refused>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::fault(400, &e.0),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => Response::json(s),
        Err(e) => Response::fault(500, &e.to_string()),
    }
}

impl Api {
    /// An API before the start; `start` takes `InstanceStart`.
    pub fn new(id: String, resources: VmResources, start: Sender<StartCall>) -> Self {
        Self {
            resources,
            id,
            phase: Phase::NotStarted,
            start: Some(start),
            vmm: None,
        }
    }

    /// An API whose VM was started from a config file already.
    pub fn started(id: String, resources: VmResources, vmm: VmmHandle) -> Self {
        Self {
            resources,
            id,
            phase: Phase::Running,
            start: None,
            vmm: Some(vmm),
        }
    }

    /// The state `GET /` reports.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Answers one request.
    pub fn handle(&mut self, req: Request) -> Response {
        let resp = self.route(&req).unwrap_or_else(|r| r);
        crate::metrics::api_server::requests.inc();
        if resp.status >= 400 {
            crate::metrics::api_server::errors.inc();
            log::info!(
                "API: {} {}: {} {}",
                req.method,
                req.path,
                resp.status,
                resp.body.as_deref().unwrap_or("")
            );
        } else {
            log::debug!("API: {} {}: {}", req.method, req.path, resp.status);
        }
        resp
    }

    fn pre_boot(&self) -> Result<(), Response> {
        if self.phase == Phase::NotStarted {
            Ok(())
        } else {
            Err(Response::fault(400, AFTER_START))
        }
    }

    fn route(&mut self, req: &Request) -> Result<Response, Response> {
        let path = req.path.trim_end_matches('/');
        let (base, id) = match path.strip_prefix("/drives/") {
            Some(id) => ("/drives/", id),
            None => match path.strip_prefix("/network-interfaces/") {
                Some(id) => ("/network-interfaces/", id),
                None => (if path.is_empty() { "/" } else { path }, ""),
            },
        };
        let r = &mut self.resources;
        Ok(match (req.method.as_str(), base) {
            ("GET", "/") => json(&InstanceInfo {
                app_name: "ember".into(),
                id: self.id.clone(),
                state: match self.phase {
                    Phase::NotStarted => "Not started",
                    Phase::Running => "Running",
                    Phase::Paused => "Paused",
                }
                .into(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            }),
            ("GET", "/version") => json(&Version {
                firecracker_version: FIRECRACKER_API_VERSION.into(),
            }),
            ("GET", "/machine-config") => json(&r.machine),
            ("GET", "/vm/config") => json(&r.to_file()),
            ("PUT", "/boot-source") => {
                self.pre_boot()?;
                done(self.resources.set_boot_source(body(req)?))
            }
            ("PUT", "/machine-config") => {
                self.pre_boot()?;
                done(self.resources.set_machine_config(body(req)?))
            }
            ("PATCH", "/machine-config") => {
                self.pre_boot()?;
                done(self.resources.update_machine_config(body(req)?))
            }
            ("PUT", "/drives/") => {
                self.pre_boot()?;
                done(self.resources.put_drive(id, body(req)?))
            }
            ("PATCH", "/drives/") if self.phase == Phase::NotStarted => {
                done(self.resources.patch_drive(id, body(req)?))
            }
            ("PATCH", "/drives/") => {
                let p: PartialDrive = body(req)?;
                self.swap_drive(id, p)?
            }
            ("PUT", "/network-interfaces/") => {
                self.pre_boot()?;
                done(self.resources.put_net(id, body(req)?))
            }
            ("PATCH", "/network-interfaces/") => {
                self.pre_boot().map_err(|_| {
                    Response::fault(
                        400,
                        "PATCH /network-interfaces after the start is not supported by ember \
                         (rate limiters are fixed at the start)",
                    )
                })?;
                done(self.resources.patch_net(id, body(req)?))
            }
            ("PUT", "/vsock") => {
                self.pre_boot()?;
                done(self.resources.set_vsock(body(req)?))
            }
            ("PUT", "/entropy") => {
                self.pre_boot()?;
                done(self.resources.set_entropy(body(req)?))
            }
            ("PUT", "/logger") => {
                self.pre_boot()?;
                let l: Logger = body(req)?;
                done(crate::logger::configure(&l, &self.id).map(|()| {
                    self.resources.logger = Some(l);
                }))
            }
            ("PUT", "/metrics") => {
                self.pre_boot()?;
                let m: Metrics = body(req)?;
                done(crate::metrics::configure(&m.metrics_path).map(|()| {
                    self.resources.metrics = Some(m);
                }))
            }
            ("PUT", "/actions") => {
                let a: InstanceAction = body(req)?;
                self.action(&a.action_type)
            }
            ("PATCH", "/vm") => {
                let s: VmState = body(req)?;
                let (request, phase) = match s.state.as_str() {
                    "Paused" => (VmmRequest::Pause, Phase::Paused),
                    "Resumed" => (VmmRequest::Resume, Phase::Running),
                    other => {
                        return Err(Response::fault(
                            400,
                            &format!("state {other:?} is not one of \"Paused\", \"Resumed\""),
                        ))
                    }
                };
                self.vmm_call(request)?;
                self.phase = phase;
                Response::no_content()
            }
            ("PUT", "/snapshot/create") => {
                let s: SnapshotCreate = body(req)?;
                if s.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
                    return Err(Response::fault(
                        400,
                        "snapshot_type \"Diff\" is not supported by ember: give \"Full\"",
                    ));
                }
                if self.phase != Phase::Paused {
                    return Err(Response::fault(
                        400,
                        "the microVM must be paused for a snapshot: PATCH /vm {\"state\": \
                         \"Paused\"} first",
                    ));
                }
                self.vmm_call(VmmRequest::SnapshotCreate {
                    snapshot_path: s.snapshot_path.into(),
                    mem_file_path: s.mem_file_path.into(),
                })?;
                Response::no_content()
            }
            ("PUT", "/snapshot/load") => {
                self.pre_boot()?;
                self.load_snapshot(body(req)?)
            }
            (m, p) => {
                let unsupported = [
                    "/balloon",
                    "/balloon/statistics",
                    "/mmds",
                    "/mmds/config",
                    "/cpu-config",
                    "/hotplug/memory",
                    "/serial",
                ];
                let msg = if unsupported.contains(&p) {
                    format!("{p} is not supported by ember (see docs/api.md)")
                } else {
                    format!("Invalid request method and/or path: {m} {}.", req.path)
                };
                Response::fault(400, &msg)
            }
        })
    }

    /// Hands `config` (and a snapshot to restore) to the main thread and waits for the build.
    fn start_vm(
        &mut self,
        config: VmConfig,
        restore: Option<(std::path::PathBuf, bool)>,
    ) -> Response {
        let Some(start) = &self.start else {
            return Response::fault(400, AFTER_START);
        };
        let paused = restore.as_ref().is_some_and(|(_, resume)| !resume);
        let (reply, answer) = std::sync::mpsc::channel();
        let call = StartCall {
            config,
            restore,
            reply,
        };
        if start.send(call).is_err() {
            return Response::fault(500, "the VMM thread has ended");
        }
        match answer.recv() {
            Ok(Ok(handle)) => {
                // The VM runs: from now on this thread only serves the socket.
                crate::sandbox::enter(crate::sandbox::ThreadKind::Api);
                self.vmm = Some(handle);
                self.phase = if paused {
                    Phase::Paused
                } else {
                    Phase::Running
                };
                self.start = None;
                Response::no_content()
            }
            Ok(Err(e)) => Response::fault(400, &format!("cannot start the microVM: {e}")),
            Err(_) => Response::fault(500, "the VMM thread has ended"),
        }
    }

    /// `PUT /snapshot/load` before the start: the VM of the snapshot, restored.
    fn load_snapshot(&mut self, l: SnapshotLoad) -> Response {
        if l.enable_diff_snapshots == Some(true) {
            return Response::fault(
                400,
                "enable_diff_snapshots is not supported by ember (full snapshots only)",
            );
        }
        let mem = match (&l.mem_file_path, &l.mem_backend) {
            (Some(p), None) => p.clone(),
            (None, Some(b)) if b.backend_type == "File" => b.backend_path.clone(),
            (None, Some(b)) => {
                return Response::fault(
                    400,
                    &format!(
                        "mem_backend backend_type {:?} is not supported by ember: give \"File\"",
                        b.backend_type
                    ),
                )
            }
            _ => return Response::fault(400, "give exactly one of mem_file_path and mem_backend"),
        };
        let dir = match link_snapshot_dir(&l.snapshot_path, &mem) {
            Ok(d) => d,
            Err(e) => return Response::fault(400, &e),
        };
        let config = crate::snapshot::file::read_state(&dir).map(|s| s.meta.config);
        let mut config = match config {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Response::fault(
                    400,
                    &format!("cannot load the snapshot: {}", crate::error_chain_line(&e)),
                );
            }
        };
        for o in l.network_overrides.iter().flatten() {
            // ember's snapshots know NICs by position, not by Firecracker's interface IDs:
            // with one NIC the override is unambiguous.
            match config.net.as_mut_slice() {
                [nic] => nic.tap = o.host_dev_name.clone(),
                _ => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Response::fault(
                        400,
                        &format!(
                            "network_overrides for {}: ember applies an override only to a \
                             snapshot with exactly one NIC (it has {})",
                            o.iface_id,
                            config.net.len()
                        ),
                    );
                }
            }
        }
        self.resources = VmResources::from_vm_config(&config);
        self.start_vm(config, Some((dir, l.resume_vm.unwrap_or(false))))
    }

    /// `PATCH /drives/{id}` on a running VM: a new image under the drive (its rate limiter
    /// cannot change after the start).
    fn swap_drive(&mut self, id: &str, p: PartialDrive) -> Result<Response, Response> {
        if p.drive_id != id {
            return Err(Response::fault(
                400,
                &format!(
                    "the drive ID in the path ({id}) differs from drive_id in the body ({})",
                    p.drive_id
                ),
            ));
        }
        if p.rate_limiter.is_some() {
            return Err(Response::fault(
                400,
                "a drive's rate_limiter cannot be changed after the start in ember: give \
                 path_on_host only",
            ));
        }
        let Some(path) = p.path_on_host else {
            return Ok(Response::no_content());
        };
        // The VM's disks: the root drive first, then the others in the order they were put
        // (VmResources::to_vm_config).
        let mut order: Vec<&Drive> = self
            .resources
            .drives
            .iter()
            .filter(|d| d.is_root_device)
            .collect();
        order.extend(self.resources.drives.iter().filter(|d| !d.is_root_device));
        let Some(index) = order.iter().position(|d| d.drive_id == id) else {
            return Err(Response::fault(400, &format!("drive {id} does not exist")));
        };
        let mut disk = crate::config::DiskConfig::new(&path);
        disk.read_only = order[index].is_read_only.unwrap_or(false);
        self.vmm_call(VmmRequest::SwapDrive { index, disk })?;
        if let Some(d) = self.resources.drives.iter_mut().find(|d| d.drive_id == id) {
            d.path_on_host = Some(path);
        }
        Ok(Response::no_content())
    }

    fn vmm_call(&self, request: VmmRequest) -> Result<(), Response> {
        let Some(vmm) = &self.vmm else {
            return Err(Response::fault(
                400,
                "The requested operation is not supported before starting the microVM.",
            ));
        };
        vmm.call(request).map_err(|e| Response::fault(400, &e))
    }

    fn action(&mut self, action: &str) -> Response {
        match action {
            "InstanceStart" => {
                if self.phase != Phase::NotStarted {
                    return Response::fault(400, AFTER_START);
                }
                let config = match self.resources.to_vm_config() {
                    Ok(c) => c,
                    Err(e) => return Response::fault(400, &e.0),
                };
                if let Err(e) = config.validate() {
                    return Response::fault(400, &crate::error_chain_line(&e));
                }
                self.start_vm(config, None)
            }
            "SendCtrlAltDel" => match self.vmm_call(VmmRequest::CtrlAltDel) {
                Ok(()) => Response::no_content(),
                Err(r) => r,
            },
            "FlushMetrics" => match crate::metrics::flush() {
                Ok(()) => Response::no_content(),
                Err(e) => Response::fault(400, &e.0),
            },
            other => Response::fault(
                400,
                &format!(
                    "action_type {other:?} is not one of \"InstanceStart\", \"SendCtrlAltDel\", \
                     \"FlushMetrics\""
                ),
            ),
        }
    }
}

/// A private directory whose `state` and `memory` are links to `state` and `memory` (made
/// absolute): the snapshot directory ember restores from.
fn link_snapshot_dir(state: &str, memory: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let abs = |p: &str| -> Result<std::path::PathBuf, String> {
        std::fs::canonicalize(p).map_err(|e| format!("snapshot file {p}: {e}"))
    };
    let (state, memory) = (abs(state)?, abs(memory)?);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ember-load-{}-{n}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let link = |to: &std::path::Path, name: &str| {
        std::os::unix::fs::symlink(to, dir.join(name))
            .map_err(|e| format!("cannot link {}: {e}", to.display()))
    };
    if let Err(e) = link(&state, crate::snapshot::format::STATE_FILE)
        .and_then(|()| link(&memory, crate::snapshot::format::MEMORY_FILE))
    {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> Api {
        let (start, _) = std::sync::mpsc::channel();
        Api::new("t".into(), VmResources::default(), start)
    }

    fn call(api: &mut Api, method: &str, path: &str, body: &str) -> Response {
        api.handle(Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        })
    }

    /// Firecracker's swagger file types every body as a JSON object; serde's derived
    /// structs would also take a JSON array of the fields in order (found by schemathesis:
    /// `PUT /logger [null, null]` answered 204).
    #[test]
    fn bodies_must_be_objects_at_every_level() {
        let mut a = api();
        for (method, path, body) in [
            ("PUT", "/logger", "[null, null]"),
            ("PUT", "/logger", "[]"),
            ("PUT", "/entropy", r#"{"rate_limiter": [null, null]}"#),
            (
                "PUT",
                "/entropy",
                r#"{"rate_limiter": {"bandwidth": [1, 0, 100]}}"#,
            ),
            ("PUT", "/machine-config", "[2, 256]"),
            ("PATCH", "/machine-config", "[2]"),
            ("PATCH", "/vm", r#"["Paused"]"#),
            ("PUT", "/actions", r#"["FlushMetrics"]"#),
        ] {
            let r = call(&mut a, method, path, body);
            assert_eq!(r.status, 400, "{method} {path} {body}: {r:?}");
            let b = r.body.unwrap_or_default();
            assert!(b.contains("JSON object"), "{method} {path} {body}: {b}");
        }
        assert_eq!(a.resources, VmResources::default(), "nothing was set");
        // Objects, and null for an optional field (taken as not given, as by Firecracker).
        for (method, path, body) in [
            (
                "PUT",
                "/entropy",
                r#"{"rate_limiter": {"bandwidth": null, "ops": null}}"#,
            ),
            (
                "PATCH",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": null}"#,
            ),
        ] {
            let r = call(&mut a, method, path, body);
            assert_eq!(r.status, 204, "{method} {path} {body}: {r:?}");
        }
        assert_eq!(a.resources.machine.vcpu_count, 2);
        let r = call(&mut a, "PUT", "/machine-config", r#"{"vcpu_count": 1}"#);
        assert!(
            r.body
                .unwrap_or_default()
                .contains("missing field `mem_size_mib`"),
            "a missing required field is named"
        );
    }
}
