//! Agent-wide shared context for the pod tasks: the API client, the configuration, the IP
//! allocator and the record of mount-point directories the agent had to create on the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use tokio::sync::Notify;

use crate::config::AgentConfig;
use crate::env::Sources;
use crate::ipam::{Allocator, IpamError};
use crate::net::Ip;
use crate::status::PodRuntime;

/// Environment variable set in every container so that `cleanup` can find a pod's processes
/// (and their children) even without a network namespace.
pub const POD_UID_ENV: &str = "TANDEM_NODE_AGENT_POD_UID";

/// File (in the state dir) listing mount-point directories the agent created on the host.
pub const MOUNTPOINTS_FILE: &str = "mountpoints.json";
/// File (in the state dir) holding the IP allocation table.
pub const IPAM_FILE: &str = "ipam.json";

/// Shared by every pod task.
pub struct Ctx {
    /// API client (admin).
    pub client: kube::Client,
    /// Configuration.
    pub cfg: Arc<AgentConfig>,
    /// `ip` runner.
    pub ip: Ip,
    /// HTTP client for probes.
    pub http: reqwest::Client,
    ipam: Mutex<Allocator>,
    mountpoints: Mutex<BTreeSet<PathBuf>>,
}

impl Ctx {
    /// Builds the context, loading the persisted IP table and mount-point record.
    pub fn new(client: kube::Client, cfg: Arc<AgentConfig>) -> anyhow::Result<Self> {
        let ipam = Allocator::load(&cfg.args.state_dir.join(IPAM_FILE))?;
        let mountpoints = load_mountpoints(&cfg.args.state_dir);
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()?;
        Ok(Self {
            client,
            ip: Ip::new(cfg.ip.clone()),
            cfg,
            http,
            ipam: Mutex::new(ipam),
            mountpoints: Mutex::new(mountpoints),
        })
    }

    fn ipam_path(&self) -> PathBuf {
        self.cfg.args.state_dir.join(IPAM_FILE)
    }

    /// The pod's address (allocating and persisting one if new).
    pub fn allocate_ip(&self, uid: &str) -> Result<Ipv4Addr, IpamError> {
        let mut a = self.ipam.lock().unwrap_or_else(|p| p.into_inner());
        let ip = a.allocate(&self.cfg.subnet, uid)?;
        a.save(&self.ipam_path())?;
        Ok(ip)
    }

    /// Frees the pod's address.
    pub fn release_ip(&self, uid: &str) {
        let mut a = self.ipam.lock().unwrap_or_else(|p| p.into_inner());
        if a.release(uid).is_some()
            && let Err(e) = a.save(&self.ipam_path())
        {
            tracing::warn!(error = %e, "saving ip allocations");
        }
    }

    /// Frees addresses of pods that no longer exist.
    pub fn retain_ips(&self, live: &BTreeSet<String>) {
        let mut a = self.ipam.lock().unwrap_or_else(|p| p.into_inner());
        let gone = a.retain_live(live);
        if !gone.is_empty() {
            tracing::info!(
                count = gone.len(),
                "released addresses of pods that are gone"
            );
            if let Err(e) = a.save(&self.ipam_path()) {
                tracing::warn!(error = %e, "saving ip allocations");
            }
        }
    }

    /// Makes sure `target` exists on the host so it can serve as a bind-mount point, recording
    /// every directory or file created (removed again by `cleanup`).
    pub fn ensure_mountpoint(&self, target: &Path, as_file: bool) -> std::io::Result<()> {
        if target.exists() {
            return Ok(());
        }
        let mut created = Vec::new();
        let mut missing = Vec::new();
        let mut p = target.parent();
        while let Some(dir) = p {
            if dir.exists() {
                break;
            }
            missing.push(dir.to_path_buf());
            p = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            std::fs::create_dir(&dir)?;
            created.push(dir);
        }
        if as_file {
            std::fs::write(target, b"")?;
        } else {
            std::fs::create_dir(target)?;
        }
        created.push(target.to_path_buf());
        let mut set = self.mountpoints.lock().unwrap_or_else(|p| p.into_inner());
        set.extend(created);
        save_mountpoints(&self.cfg.args.state_dir, &set);
        Ok(())
    }

    /// Fetches ConfigMaps and Secrets by name (a missing one maps to `None`).
    pub async fn fetch_sources(
        &self,
        namespace: &str,
        cms: &[String],
        secrets: &[String],
    ) -> Result<Sources, kube::Error> {
        let mut out = Sources::default();
        let cm_api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        for name in cms.iter().collect::<BTreeSet<_>>() {
            let data = cm_api.get_opt(name).await?.map(|cm| {
                let mut m: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                m.extend(
                    cm.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                m
            });
            out.config_maps.insert(name.clone(), data);
        }
        let sec_api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        for name in secrets.iter().collect::<BTreeSet<_>>() {
            let data = sec_api.get_opt(name).await?.map(|s| {
                let mut m: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                m.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                m
            });
            out.secrets.insert(name.clone(), data);
        }
        Ok(out)
    }
}

/// Reads the mount-point record.
pub fn load_mountpoints(state_dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read(state_dir.join(MOUNTPOINTS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_mountpoints(state_dir: &Path, set: &BTreeSet<PathBuf>) {
    let path = state_dir.join(MOUNTPOINTS_FILE);
    match serde_json::to_vec_pretty(set) {
        Ok(bytes) => {
            if let Err(e) = std::fs::write(&path, bytes) {
                tracing::warn!(error = %e, path = %path.display(), "saving mount-point record");
            }
        }
        Err(e) => tracing::warn!(error = %e, "encoding mount-point record"),
    }
}

/// A pod's runtime record plus a change signal for the status writer.
#[derive(Default)]
pub struct PodState {
    rt: Mutex<PodRuntime>,
    /// Signalled after every change.
    pub changed: Notify,
    /// Serialises repairs of the pod's network namespace between its containers.
    pub sandbox_repair: tokio::sync::Mutex<()>,
}

impl PodState {
    /// Wraps a runtime record.
    pub fn new(rt: PodRuntime) -> Self {
        Self {
            rt: Mutex::new(rt),
            changed: Notify::new(),
            sandbox_repair: tokio::sync::Mutex::new(()),
        }
    }

    /// Changes the record and wakes the status writer.
    pub fn update(&self, f: impl FnOnce(&mut PodRuntime)) {
        {
            let mut rt = self.rt.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut rt);
        }
        self.changed.notify_one();
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> PodRuntime {
        self.rt.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
