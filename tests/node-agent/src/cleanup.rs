//! `cleanup`: kills every pod process this agent started, deletes its network namespaces, the
//! mount points it created and the bridge. Also used at agent start and shutdown (without the
//! bridge) so no process of an earlier run survives.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::ctx::{IPAM_FILE, MOUNTPOINTS_FILE, POD_UID_ENV, load_mountpoints};
use crate::net::{Ip, PodNetNames};
use crate::pod::{META_FILE, PodMeta};

/// Flags of `tandem-node-agent cleanup`.
#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// The agent's state dir.
    #[arg(long, env = "TANDEM_NODE_AGENT_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Bridge to delete.
    #[arg(long, default_value = "tandem0")]
    pub bridge: String,
}

/// Full cleanup.
pub async fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    let ip = Ip::new(
        crate::config::which("ip").ok_or_else(|| anyhow::anyhow!("`ip` (iproute2) not found"))?,
    );
    kill_pods(&ip, &args.state_dir).await;
    let mut dirs: Vec<PathBuf> = load_mountpoints(&args.state_dir).into_iter().collect();
    // Deepest first; only what is empty (it always is on the host: mounts live in pod namespaces).
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let in_use = mount_points_in_use();
    for d in dirs {
        let canonical = std::fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
        if in_use.iter().any(|m| m.starts_with(&canonical)) {
            // Another agent's pod still mounts something here: removing it would detach that.
            tracing::info!(path = %d.display(), "mount point still in use elsewhere; kept");
            continue;
        }
        let r = if d.is_dir() {
            std::fs::remove_dir(&d)
        } else {
            std::fs::remove_file(&d)
        };
        if let Err(e) = r
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %d.display(), error = %e, "leaving mount point in place");
        }
    }
    let _ = std::fs::remove_file(args.state_dir.join(MOUNTPOINTS_FILE));
    let _ = std::fs::remove_file(args.state_dir.join(IPAM_FILE));
    ip.delete_bridge(&args.bridge).await?;
    tracing::info!(bridge = %args.bridge, "cleanup done");
    Ok(())
}

/// Mount points of every mount namespace on the host (from `/proc/*/mountinfo`).
fn mount_points_in_use() -> std::collections::BTreeSet<PathBuf> {
    let mut seen_ns = std::collections::BTreeSet::new();
    let mut out = std::collections::BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let pid = e.file_name();
        if !pid.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(ns) = std::fs::read_link(e.path().join("ns/mnt")) else {
            continue;
        };
        if !seen_ns.insert(ns) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(e.path().join("mountinfo")) {
            out.extend(
                text.lines()
                    .filter_map(|l| l.split(' ').nth(4))
                    .map(PathBuf::from),
            );
        }
    }
    out
}

fn pod_metas(state_dir: &Path) -> Vec<(PathBuf, PodMeta)> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("pods")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| {
            let dir = e.path();
            let meta = std::fs::read(dir.join(META_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<PodMeta>(&b).ok())
                .unwrap_or_else(|| {
                    // A pod dir without meta: the dir name is the UID.
                    let uid = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    PodMeta {
                        namespace: String::new(),
                        name: String::new(),
                        netns: Some(PodNetNames::for_uid(&uid).netns),
                        uid,
                    }
                });
            (dir, meta)
        })
        .collect()
}

/// PIDs whose environment carries one of `uids` in [`POD_UID_ENV`].
fn pids_with_pod_uid(uids: &[String]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| u32::try_from(*pid).ok() != Some(me))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| {
                    env.split(|b| *b == 0).any(|kv| {
                        std::str::from_utf8(kv)
                            .ok()
                            .and_then(|kv| {
                                kv.strip_prefix(POD_UID_ENV)?
                                    .strip_prefix('=')
                                    .map(str::to_owned)
                            })
                            .is_some_and(|v| uids.contains(&v))
                    })
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Kills the processes of every pod recorded in the state dir, deletes their network
/// namespaces and pod dirs. The IP table is kept.
pub async fn kill_pods(ip: &Ip, state_dir: &Path) {
    let metas = pod_metas(state_dir);
    if metas.is_empty() {
        return;
    }
    let uids: Vec<String> = metas.iter().map(|(_, m)| m.uid.clone()).collect();
    for pid in pids_with_pod_uid(&uids) {
        crate::process::kill_pid(pid);
    }
    for (dir, meta) in metas {
        let names = PodNetNames::for_uid(&meta.uid);
        if let Err(e) = ip.teardown_pod(&names).await {
            tracing::warn!(netns = %names.netns, error = %e, "deleting network namespace");
        }
        tracing::info!(pod = %format!("{}/{}", meta.namespace, meta.name), netns = ?meta.netns, "cleaned up pod");
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing pod dir");
        }
    }
}
