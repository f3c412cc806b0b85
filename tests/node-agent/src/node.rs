//! Node registration and heartbeats: the Node object (capacity, addresses, Ready) and its Lease
//! in `kube-node-lease`, renewed every [`HEARTBEAT`].

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};

use crate::config::AgentConfig;

/// Field manager for everything the agent writes.
pub const MANAGER: &str = "tandem-node-agent";
/// Heartbeat period (lease renewal and node status refresh).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Lease duration announced to the node lifecycle controller.
pub const LEASE_SECONDS: i32 = 40;

/// Node registration failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Applying the Node failed.
    #[error("registering node {0}: {1}")]
    Register(String, #[source] kube::Error),
    /// Patching the Node status failed.
    #[error("updating status of node {0}: {1}")]
    Status(String, #[source] kube::Error),
    /// Renewing the Lease failed.
    #[error("renewing lease of node {0}: {1}")]
    Lease(String, #[source] kube::Error),
}

/// The node's resource capacity (also its allocatable).
pub fn capacity(cfg: &AgentConfig) -> BTreeMap<String, Quantity> {
    let mut m = BTreeMap::from([
        ("cpu".to_owned(), Quantity(cfg.args.cpu.clone())),
        ("memory".to_owned(), Quantity(cfg.args.memory.clone())),
        ("pods".to_owned(), Quantity(cfg.args.max_pods.clone())),
        ("ephemeral-storage".to_owned(), Quantity("100Gi".to_owned())),
    ]);
    if cfg.args.gpus != "0" && !cfg.args.gpus.is_empty() {
        m.insert("nvidia.com/gpu".to_owned(), Quantity(cfg.args.gpus.clone()));
    }
    m
}

/// The Node object (metadata and spec) the agent applies.
pub fn node_object(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                "node.kubernetes.io/instance-type": "tandem-node-agent",
            }
        },
        "spec": {}
    })
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The Node status at `now`: Ready, capacity, addresses.
pub fn node_status(
    cfg: &AgentConfig,
    name: &str,
    now: Timestamp,
    ready_since: Timestamp,
) -> NodeStatus {
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(ready_since)),
    };
    let cap = capacity(cfg);
    NodeStatus {
        capacity: Some(cap.clone()),
        allocatable: Some(cap),
        conditions: Some(vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "no memory pressure",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "no disk pressure",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "no PID pressure",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "tandem-node-agent is posting ready status",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_owned(),
                address: cfg.host_ip().to_string(),
            },
            NodeAddress {
                type_: "Hostname".to_owned(),
                address: name.to_owned(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints::default()),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.to_owned(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: "tandem-node-agent://0.1.0".to_owned(),
            kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
            kube_proxy_version: String::new(),
            kubelet_version: "v1.36.0-tandem".to_owned(),
            machine_id: read_trimmed("/etc/machine-id"),
            operating_system: "linux".to_owned(),
            os_image: "tandem-node-agent".to_owned(),
            system_uuid: String::new(),
            swap: None,
        }),
        ..NodeStatus::default()
    }
}

/// Applies the Node and its first status; returns the Node's UID.
pub async fn register(
    client: &kube::Client,
    cfg: &AgentConfig,
    name: &str,
    now: Timestamp,
) -> Result<String, NodeError> {
    let api: Api<Node> = Api::all(client.clone());
    let pp = PatchParams::apply(MANAGER).force();
    let node = api
        .patch(name, &pp, &Patch::Apply(node_object(name)))
        .await
        .map_err(|e| NodeError::Register(name.to_owned(), e))?;
    update_status(client, cfg, name, now, now).await?;
    Ok(node.metadata.uid.unwrap_or_default())
}

/// Refreshes the Node status (heartbeat).
pub async fn update_status(
    client: &kube::Client,
    cfg: &AgentConfig,
    name: &str,
    now: Timestamp,
    ready_since: Timestamp,
) -> Result<(), NodeError> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({ "status": node_status(cfg, name, now, ready_since) });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| NodeError::Status(name.to_owned(), e))
}

/// Creates or renews the node's Lease.
pub async fn renew_lease(
    client: &kube::Client,
    name: &str,
    node_uid: &str,
    now: Timestamp,
) -> Result<(), NodeError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(now),
        }
    });
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(lease),
    )
    .await
    .map(|_| ())
    .map_err(|e| NodeError::Lease(name.to_owned(), e))
}

/// Registers the node (retrying) and then heartbeats forever.
pub async fn heartbeat_loop(client: kube::Client, cfg: std::sync::Arc<AgentConfig>, name: String) {
    let ready_since = Timestamp::now();
    let mut uid = None;
    loop {
        let now = Timestamp::now();
        match &uid {
            None => match register(&client, &cfg, &name, now).await {
                Ok(u) => {
                    tracing::info!(node = %name, "node registered");
                    uid = Some(u);
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "node registration failed; retrying"),
            },
            Some(u) => {
                if let Err(e) = renew_lease(&client, &name, u, now).await {
                    tracing::warn!(error = %e, "lease renewal failed");
                }
                if let Err(e) = update_status(&client, &cfg, &name, now, ready_since).await {
                    tracing::warn!(error = %e, "node status update failed");
                    if let NodeError::Status(_, kube::Error::Api(ae)) = &e
                        && ae.code == 404
                    {
                        // Someone deleted the Node: register it again.
                        uid = None;
                        continue;
                    }
                }
            }
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}
