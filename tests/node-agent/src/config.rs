//! The agent's configuration (`run` flags) and what is derived from it once at start.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::ipam::Subnet;

/// Flags of `tandem-node-agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Kubeconfig the agent itself uses (admin).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory for pod dirs, logs and the IP allocation table.
    #[arg(long, env = "TANDEM_NODE_AGENT_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Directory for container logs (`<namespace>_<pod>_<container>.log`); default `<state-dir>/logs`.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Node names to register and serve (repeat for several).
    #[arg(long = "node", default_value = "tandem-node-1")]
    pub nodes: Vec<String>,
    /// Host bridge name.
    #[arg(long, default_value = "tandem0")]
    pub bridge: String,
    /// Host address of the bridge with the pod subnet's prefix.
    #[arg(long, default_value = "10.244.0.1/16")]
    pub bridge_address: String,
    /// API server URL as pods reach it (written into pod kubeconfigs).
    #[arg(long, default_value = "https://10.244.0.1:6443")]
    pub api_server_for_pods: String,
    /// CA bundle of the API server (written into pod kubeconfigs and ca.crt).
    #[arg(long)]
    pub ca_file: PathBuf,
    /// Directory holding the `tandem-*` binaries that images map to.
    #[arg(long, env = "TANDEM_BIN_DIR")]
    pub bin_dir: PathBuf,
    /// Node CPU capacity.
    #[arg(long, default_value = "16")]
    pub cpu: String,
    /// Node memory capacity.
    #[arg(long, default_value = "64Gi")]
    pub memory: String,
    /// Node pod capacity.
    #[arg(long, default_value = "110")]
    pub max_pods: String,
    /// Advertised `nvidia.com/gpu` count (0 to omit).
    #[arg(long, default_value = "4")]
    pub gpus: String,
    /// First crash-loop backoff delay in seconds.
    #[arg(long, default_value_t = 1)]
    pub backoff_initial_seconds: u64,
    /// Crash-loop backoff cap in seconds.
    #[arg(long, default_value_t = 30)]
    pub backoff_max_seconds: u64,
    /// Host environment variables passed through to every container (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "PATH,LD_LIBRARY_PATH,RUST_BACKTRACE,RUST_LOG"
    )]
    pub pass_env: Vec<String>,
    /// Grace period given to pods when the agent itself is stopped.
    #[arg(long, default_value_t = 5)]
    pub shutdown_grace_seconds: u64,
}

/// Settings derived once from [`RunArgs`].
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The flags.
    pub args: RunArgs,
    /// Pod subnet and gateway.
    pub subnet: Subnet,
    /// Host of `--api-server-for-pods`.
    pub api_host: String,
    /// Port of `--api-server-for-pods`.
    pub api_port: u16,
    /// CA PEM.
    pub ca_pem: Vec<u8>,
    /// This executable.
    pub self_exe: PathBuf,
    /// `ip` binary.
    pub ip: PathBuf,
    /// Backoff bounds.
    pub backoff: (Duration, Duration),
    /// Host env passed to containers.
    pub pass_env: Vec<(String, String)>,
}

impl AgentConfig {
    /// Host IP (the bridge address).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.subnet.gateway
    }

    /// Pod dir of a pod UID.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.args.state_dir.join("pods").join(uid)
    }

    /// Directory of the container logs.
    pub fn log_dir(&self) -> PathBuf {
        self.args
            .log_dir
            .clone()
            .unwrap_or_else(|| self.args.state_dir.join("logs"))
    }

    /// Log file of a container.
    pub fn log_file(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.log_dir()
            .join(format!("{namespace}_{pod}_{container}.log"))
    }
}

/// Splits `https://host:port[/..]` into host and port (default 443).
pub fn split_url(url: &str) -> Option<(String, u16)> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split('/').next()?;
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), 443)),
    }
}

/// Finds `name` in the directories of `PATH` (plus the sbin dirs).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

impl AgentConfig {
    /// Validates the flags and derives the settings.
    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let subnet = Subnet::parse(&args.bridge_address)?;
        let (api_host, api_port) = split_url(&args.api_server_for_pods).with_context(|| {
            format!(
                "--api-server-for-pods {:?} is not https://host:port",
                args.api_server_for_pods
            )
        })?;
        let ca_pem = std::fs::read(&args.ca_file)
            .with_context(|| format!("reading --ca-file {}", args.ca_file.display()))?;
        let self_exe = std::env::current_exe().context("locating own executable")?;
        let ip = which("ip").context("`ip` (iproute2) not found")?;
        let pass_env = args
            .pass_env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        Ok(Self {
            backoff: (
                Duration::from_secs(args.backoff_initial_seconds),
                Duration::from_secs(args.backoff_max_seconds),
            ),
            subnet,
            api_host,
            api_port,
            ca_pem,
            self_exe,
            ip,
            pass_env,
            args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_split_into_host_and_port() {
        assert_eq!(
            split_url("https://10.244.0.1:6443"),
            Some(("10.244.0.1".into(), 6443))
        );
        assert_eq!(
            split_url("https://api.example/"),
            Some(("api.example".into(), 443))
        );
        assert_eq!(split_url("10.0.0.1:6443"), None);
    }
}
