//! Pod networking with `ip`: the host bridge, one network namespace per pod joined to it by a
//! veth pair, a pod address and a default route via the bridge address. Nothing else: no
//! forwarding, no NAT, no routes anywhere but the bridge subnet.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;

/// Failures of an `ip` invocation.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The command could not be started.
    #[error("running {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command exited non-zero.
    #[error("{cmd} failed: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
}

/// Prefix of every network namespace this agent creates.
pub const NETNS_PREFIX: &str = "tandem-";

/// Names of a pod's network objects, derived from its UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetNames {
    /// Network namespace name, `tandem-<12 hex of the uid>`.
    pub netns: String,
    /// Host side of the veth pair (at most 15 bytes).
    pub host_veth: String,
}

impl PodNetNames {
    /// Derives the names from a pod UID.
    pub fn for_uid(uid: &str) -> Self {
        let hex: String = uid
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        Self {
            netns: format!("{NETNS_PREFIX}{hex}"),
            host_veth: format!("tdv{}", &hex[..hex.len().min(11)]),
        }
    }
}

/// Runs `ip` (or another tool) with arguments.
#[derive(Debug, Clone)]
pub struct Ip {
    program: PathBuf,
}

impl Ip {
    /// Uses the `ip` binary at `program`.
    pub fn new(program: PathBuf) -> Self {
        Self { program }
    }

    /// Runs `ip args..`; returns stdout.
    pub async fn run(&self, args: &[&str]) -> Result<String, NetError> {
        let cmd = format!("{} {}", self.program.display(), args.join(" "));
        let out = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| NetError::Spawn {
                cmd: cmd.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NetError::Failed {
                cmd,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Whether a link exists.
    pub async fn link_exists(&self, name: &str) -> bool {
        self.run(&["link", "show", "dev", name]).await.is_ok()
    }

    /// Creates the bridge if missing, gives it `address` (`10.244.0.1/16`) and brings it up.
    pub async fn ensure_bridge(&self, name: &str, address: &str) -> Result<(), NetError> {
        if !self.link_exists(name).await {
            self.run(&["link", "add", name, "type", "bridge"]).await?;
        }
        self.run(&["addr", "replace", address, "dev", name]).await?;
        self.run(&["link", "set", name, "up"]).await?;
        Ok(())
    }

    /// Deletes the bridge if it exists.
    pub async fn delete_bridge(&self, name: &str) -> Result<(), NetError> {
        if self.link_exists(name).await {
            self.run(&["link", "del", name]).await?;
        }
        Ok(())
    }

    /// Lists network namespace names.
    pub async fn netns_list(&self) -> Result<Vec<String>, NetError> {
        let out = self.run(&["netns", "list"]).await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// Creates the pod's namespace (replacing a stale one) with `eth0` = `ip/prefix` on the
    /// bridge and a default route via `gateway`.
    pub async fn setup_pod(
        &self,
        names: &PodNetNames,
        bridge: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Result<(), NetError> {
        if self.netns_list().await?.contains(&names.netns) {
            self.teardown_pod(names).await?;
        }
        let ns = names.netns.as_str();
        let addr = format!("{ip}/{prefix}");
        let gw = gateway.to_string();
        self.run(&["netns", "add", ns]).await?;
        self.run(&[
            "link",
            "add",
            &names.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])
        .await?;
        self.run(&["link", "set", &names.host_veth, "master", bridge])
            .await?;
        self.run(&["link", "set", &names.host_veth, "up"]).await?;
        self.run(&["-n", ns, "link", "set", "lo", "up"]).await?;
        self.run(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])
            .await?;
        self.run(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        self.run(&[
            "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0",
        ])
        .await?;
        Ok(())
    }

    /// Process IDs living in the namespace.
    pub async fn netns_pids(&self, netns: &str) -> Vec<i32> {
        match self.run(&["netns", "pids", netns]).await {
            Ok(out) => out.lines().filter_map(|l| l.trim().parse().ok()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Kills every process in the namespace, then deletes it (the veth pair goes with it).
    pub async fn teardown_pod(&self, names: &PodNetNames) -> Result<(), NetError> {
        if !self.netns_list().await?.contains(&names.netns) {
            return Ok(());
        }
        for pid in self.netns_pids(&names.netns).await {
            crate::process::kill_pid(pid);
        }
        self.run(&["netns", "del", &names.netns]).await?;
        if self.link_exists(&names.host_veth).await {
            // Normally gone with the namespace; ignore a race with the kernel.
            let _ = self.run(&["link", "del", &names.host_veth]).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_limits_and_share_the_tandem_prefix() {
        let n = PodNetNames::for_uid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        assert_eq!(n.netns, "tandem-0f1e2d3c4b5a");
        assert!(n.host_veth.len() <= 15, "{}", n.host_veth);
        assert_eq!(n.host_veth, "tdv0f1e2d3c4b5");
    }
}
