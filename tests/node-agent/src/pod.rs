//! One task per pod: sets up the sandbox (network namespace, volumes, service account
//! credentials), runs init containers then containers, writes the pod status, and on deletion
//! stops everything gracefully, tears the sandbox down and deletes the pod object.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::container::{ContainerCtx, Outcome};
use crate::ctx::{Ctx, POD_UID_ENV, PodState};
use crate::env::RuntimeFacts;
use crate::net::PodNetNames;
use crate::process::Bind;
use crate::status::{ContainerRuntime, PodRuntime, build_status};
use crate::token::{self, PodRef};
use crate::volumes::{Content, VolumePlan, plan_volume, referenced_sources, write_files};

/// Why a pod task stops its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The pod got a deletionTimestamp: graceful stop, then delete the object.
    Deleted,
    /// The pod object vanished from the API: kill now.
    Gone,
    /// The agent is shutting down: short graceful stop, keep the object and its address.
    Shutdown,
}

/// The manager's handle on a pod task.
pub struct PodHandle {
    /// Latest pod object from the watch.
    pub updates: watch::Sender<Pod>,
    /// Stop request.
    pub stop: watch::Sender<Option<StopReason>>,
    /// The task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the task for a pod.
pub fn spawn(ctx: Arc<Ctx>, pod: Pod) -> PodHandle {
    let (updates, updates_rx) = watch::channel(pod);
    let (stop, stop_rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut task = PodTask {
            ctx,
            updates: updates_rx,
            stop: stop_rx,
        };
        task.run().await;
    });
    PodHandle {
        updates,
        stop,
        task,
    }
}

/// Where every container sees the agent-written service account dir (token, ca.crt,
/// namespace, kubeconfig); `KUBECONFIG` points into it.
pub const SA_MOUNT: &str = "/var/run/secrets/tandem-node-agent";

/// Marker file (in the pod dir) with the pod's identity, read by `cleanup` and at start.
pub const META_FILE: &str = "meta.json";

/// What the pod dir's meta file records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodMeta {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Network namespace, if any.
    pub netns: Option<String>,
}

struct PodTask {
    ctx: Arc<Ctx>,
    updates: watch::Receiver<Pod>,
    stop: watch::Receiver<Option<StopReason>>,
}

/// Resolves when the pod must stop, with the reason.
async fn wait_stop(
    updates: &mut watch::Receiver<Pod>,
    stop: &mut watch::Receiver<Option<StopReason>>,
) -> StopReason {
    loop {
        if let Some(r) = *stop.borrow() {
            return r;
        }
        if updates.borrow().metadata.deletion_timestamp.is_some() {
            return StopReason::Deleted;
        }
        tokio::select! {
            biased;
            r = stop.changed() => if r.is_err() { return StopReason::Shutdown },
            r = updates.changed() => if r.is_err() {
                return stop.borrow().unwrap_or(StopReason::Gone);
            },
        }
    }
}

fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// Everything set up before containers start.
struct Sandbox {
    pod_ip: Ipv4Addr,
    netns: Option<String>,
    volumes: BTreeMap<String, PathBuf>,
    token_files: Vec<(PathBuf, Option<String>, i64)>,
    /// The service account dir (token, ca.crt, namespace, kubeconfig), bound at [`SA_MOUNT`].
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("allocating pod IP: {0}")]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("network setup: {0}")]
    Net(#[from] crate::net::NetError),
    #[error("reading volume sources: {0}")]
    Sources(#[source] kube::Error),
    #[error("{0}")]
    Volume(#[from] crate::volumes::VolumeError),
    #[error("service account token: {0}")]
    Token(#[from] crate::token::TokenError),
    #[error("pod dir {0}: {1}")]
    Io(String, #[source] std::io::Error),
}

impl PodTask {
    fn pod(&self) -> Pod {
        self.updates.borrow().clone()
    }

    async fn run(&mut self) {
        let pod = self.pod();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let pod_dir = self.ctx.cfg.pod_dir(&uid);
        let names = PodNetNames::for_uid(&uid);

        // A pod that already finished (e.g. before an agent restart) is not run again; one
        // already being deleted is only cleaned up.
        if phase == "Succeeded" || phase == "Failed" || pod.metadata.deletion_timestamp.is_some() {
            let reason = wait_stop(&mut self.updates, &mut self.stop).await;
            self.finish(reason, &uid, &pod_dir, None).await;
            return;
        }

        let rt = PodRuntime {
            init_containers: spec_containers(&pod, true),
            containers: spec_containers(&pod, false),
            host_ip: Some(self.ctx.cfg.host_ip()),
            start_time: Some(
                pod.status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .map(|t| t.0)
                    .unwrap_or_else(Timestamp::now),
            ),
            initialized: pod
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_none_or(Vec::is_empty),
            ..PodRuntime::default()
        };
        // Restart counts survive agent restarts.
        let state = Arc::new(PodState::new(carry_restart_counts(&pod, rt)));
        let writer = tokio::spawn(status_writer(
            self.ctx.clone(),
            self.updates.clone(),
            state.clone(),
        ));

        // Sandbox, retried until it works or the pod goes away.
        let sandbox = loop {
            let attempt = setup(&self.ctx, &pod, &pod_dir, &names, host_network, &state);
            let result = tokio::select! {
                r = attempt => r,
                reason = wait_stop(&mut self.updates, &mut self.stop) => {
                    self.finish(reason, &uid, &pod_dir, Some(&names)).await;
                    writer.abort();
                    return;
                }
            };
            match result {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "pod sandbox setup failed; retrying");
                    state.update(|rt| rt.message = Some(format!("sandbox setup failed: {e}")));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                        reason = wait_stop(&mut self.updates, &mut self.stop) => {
                            self.finish(reason, &uid, &pod_dir, Some(&names)).await;
                            writer.abort();
                            return;
                        }
                    }
                }
            }
        };
        state.update(|rt| {
            rt.pod_ip = Some(sandbox.pod_ip);
            rt.sandbox_ready = true;
            rt.message = None;
        });
        tracing::info!(pod = %format!("{ns}/{name}"), ip = %sandbox.pod_ip, "pod sandbox ready");

        let token_refresh = tokio::spawn(refresh_tokens(
            self.ctx.clone(),
            pod_ref(&pod),
            sandbox.token_files.clone(),
        ));
        let (stop_tx, stop_rx) = watch::channel::<Option<Duration>>(None);
        let base = ContainerBase {
            ctx: self.ctx.clone(),
            state: state.clone(),
            pod: Arc::new(pod.clone()),
            sandbox: &sandbox,
        };

        // Init containers, one after the other.
        let init_specs = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default();
        let mut init_failed = false;
        for (i, c) in init_specs.iter().enumerate() {
            let cc = base.container(i, true, c.clone());
            let outcome = tokio::select! {
                o = cc.supervise(stop_rx.clone()) => o,
                reason = wait_stop(&mut self.updates, &mut self.stop) => {
                    if reason == StopReason::Shutdown {
                        writer.abort();
                    }
                    self.stop_containers(&stop_tx, reason, None).await;
                    token_refresh.abort();
                    self.finish(reason, &uid, &pod_dir, Some(&names)).await;
                    writer.abort();
                    return;
                }
            };
            if outcome != Outcome::Completed(0) {
                init_failed = true;
                break;
            }
        }
        if !init_failed {
            state.update(|rt| rt.initialized = true);
            let mut set = JoinSet::new();
            for (i, c) in pod
                .spec
                .as_ref()
                .map(|s| s.containers.clone())
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let cc = base.container(i, false, c);
                set.spawn(cc.supervise(stop_rx.clone()));
            }
            let stopped = tokio::select! {
                _ = async { while set.join_next().await.is_some() {} } => None,
                reason = wait_stop(&mut self.updates, &mut self.stop) => Some(reason),
            };
            if let Some(reason) = stopped {
                if reason == StopReason::Shutdown {
                    // The pod keeps running as far as the API knows: it restarts with the agent.
                    writer.abort();
                }
                self.stop_containers(&stop_tx, reason, Some(&mut set)).await;
                token_refresh.abort();
                self.finish(reason, &uid, &pod_dir, Some(&names)).await;
                writer.abort();
                return;
            }
        }

        // Terminal: every container finished for good. Release the sandbox, keep the status.
        token_refresh.abort();
        tracing::info!(pod = %format!("{ns}/{name}"), "pod finished");
        if let Err(e) = self.ctx.ip.teardown_pod(&names).await {
            tracing::warn!(error = %e, "tearing down network namespace");
        }
        state.update(|rt| rt.sandbox_ready = false);
        let reason = wait_stop(&mut self.updates, &mut self.stop).await;
        self.finish(reason, &uid, &pod_dir, Some(&names)).await;
        writer.abort();
    }

    async fn stop_containers(
        &self,
        stop_tx: &watch::Sender<Option<Duration>>,
        reason: StopReason,
        set: Option<&mut JoinSet<Outcome>>,
    ) {
        let pod = self.pod();
        let grace = match reason {
            StopReason::Deleted => grace_of(&pod),
            StopReason::Gone => Duration::ZERO,
            StopReason::Shutdown => grace_of(&pod).min(Duration::from_secs(
                self.ctx.cfg.args.shutdown_grace_seconds,
            )),
        };
        tracing::info!(pod = ?pod.metadata.name, ?reason, grace_s = grace.as_secs(), "stopping pod");
        let _ = stop_tx.send(Some(grace));
        if let Some(set) = set {
            while set.join_next().await.is_some() {}
        }
    }

    /// Tears down what is left and, for a deleted pod, removes the object.
    async fn finish(
        &self,
        reason: StopReason,
        uid: &str,
        pod_dir: &Path,
        names: Option<&PodNetNames>,
    ) {
        if let Some(names) = names
            && let Err(e) = self.ctx.ip.teardown_pod(names).await
        {
            tracing::warn!(error = %e, "tearing down network namespace");
        }
        if reason == StopReason::Shutdown {
            // The pod still exists; it keeps its address for when the agent comes back.
            remove_dir(pod_dir);
            return;
        }
        self.ctx.release_ip(uid);
        remove_dir(pod_dir);
        if reason == StopReason::Deleted {
            let pod = self.pod();
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.to_owned()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "pod deleted"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "final pod delete failed")
                }
            }
        }
    }
}

async fn setup(
    ctx: &Ctx,
    pod: &Pod,
    pod_dir: &Path,
    names: &PodNetNames,
    host_network: bool,
    state: &PodState,
) -> Result<Sandbox, SetupError> {
    let cfg = &ctx.cfg;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let io = |p: &Path, e| SetupError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(pod_dir).map_err(|e| io(pod_dir, e))?;
    std::fs::create_dir_all(cfg.log_dir()).map_err(|e| io(pod_dir, e))?;
    let meta = PodMeta {
        namespace: ns.clone(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: uid.clone(),
        netns: (!host_network).then(|| names.netns.clone()),
    };
    let meta_path = pod_dir.join(META_FILE);
    std::fs::write(
        &meta_path,
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .map_err(|e| io(&meta_path, e))?;

    let pod_ip = if host_network {
        cfg.host_ip()
    } else {
        let ip = ctx.allocate_ip(&uid)?;
        ctx.ip
            .setup_pod(
                names,
                &cfg.args.bridge,
                ip,
                cfg.subnet.prefix,
                cfg.subnet.gateway,
            )
            .await?;
        ip
    };
    state.update(|rt| rt.pod_ip = Some(pod_ip));
    let facts = RuntimeFacts {
        pod_ip: pod_ip.to_string(),
        host_ip: cfg.host_ip().to_string(),
    };

    // Volumes.
    let (cms, secrets) = referenced_sources(pod);
    let sources = ctx
        .fetch_sources(&ns, &cms, &secrets)
        .await
        .map_err(SetupError::Sources)?;
    let mut volumes = BTreeMap::new();
    let mut token_files = Vec::new();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        match plan_volume(&v, pod, &facts, &sources)? {
            VolumePlan::HostPath(p) => {
                volumes.insert(v.name.clone(), p);
            }
            VolumePlan::Files { files, persistent } => {
                let root = pod_dir.join("volumes").join(&v.name);
                if persistent {
                    std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
                } else {
                    write_files(&root, &files, &|_, _| None)?;
                }
                for f in &files {
                    if let Content::Token {
                        audience,
                        expiration_seconds,
                    } = &f.content
                    {
                        token_files.push((
                            root.join(&f.path),
                            audience.clone(),
                            *expiration_seconds,
                        ));
                    }
                }
                volumes.insert(v.name.clone(), root);
            }
        }
    }

    // Service account: token, ca.crt, namespace and a kubeconfig.
    let mut kubeconfig = None;
    if automount(ctx, pod).await {
        let sa_dir = pod_dir.join("serviceaccount");
        std::fs::create_dir_all(&sa_dir).map_err(|e| io(&sa_dir, e))?;
        let ca = sa_dir.join("ca.crt");
        std::fs::write(&ca, &cfg.ca_pem).map_err(|e| io(&ca, e))?;
        let nsf = sa_dir.join("namespace");
        std::fs::write(&nsf, ns.as_bytes()).map_err(|e| io(&nsf, e))?;
        let token_path = sa_dir.join("token");
        token_files.push((token_path.clone(), None, 3600));
        // The process sees this dir at SA_MOUNT (a bind mount), so the kubeconfig names
        // in-container paths: the pod dir itself may not be reachable for runAsUser.
        let mounted = Path::new(SA_MOUNT);
        let kc = sa_dir.join("kubeconfig");
        let text = token::kubeconfig(
            &cfg.args.api_server_for_pods,
            &mounted.join("ca.crt").to_string_lossy(),
            &mounted.join("token").to_string_lossy(),
            &ns,
        );
        std::fs::write(&kc, text).map_err(|e| io(&kc, e))?;
        kubeconfig = Some(sa_dir);
    }
    if !token_files.is_empty() {
        write_tokens(ctx, &pod_ref(pod), &token_files).await?;
    }
    if let Some(uid_gid) = pod_user(pod) {
        chown_tree(pod_dir, uid_gid);
    }
    Ok(Sandbox {
        pod_ip,
        netns: (!host_network).then(|| names.netns.clone()),
        volumes,
        token_files,
        kubeconfig,
    })
}

/// Whether the pod gets service account credentials (pod field first, then the SA's).
async fn automount(ctx: &Ctx, pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    if let Some(v) = spec.and_then(|s| s.automount_service_account_token) {
        return v;
    }
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    match api.get_opt(&sa).await {
        Ok(Some(sa)) => sa.automount_service_account_token.unwrap_or(true),
        _ => true,
    }
}

struct ContainerBase<'a> {
    ctx: Arc<Ctx>,
    state: Arc<PodState>,
    pod: Arc<Pod>,
    sandbox: &'a Sandbox,
}

impl ContainerBase<'_> {
    fn container(
        &self,
        index: usize,
        init: bool,
        container: k8s_openapi::api::core::v1::Container,
    ) -> ContainerCtx {
        let cfg = &self.ctx.cfg;
        let pod = &self.pod;
        let mut base_env: Vec<(String, String)> = cfg.pass_env.clone();
        if !base_env.iter().any(|(k, _)| k == "PATH") {
            base_env.push((
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ));
        }
        base_env.push((
            "HOSTNAME".to_owned(),
            pod.metadata.name.clone().unwrap_or_default(),
        ));
        base_env.push(("KUBERNETES_SERVICE_HOST".to_owned(), cfg.api_host.clone()));
        base_env.push((
            "KUBERNETES_SERVICE_PORT".to_owned(),
            cfg.api_port.to_string(),
        ));
        base_env.push((
            "KUBERNETES_SERVICE_PORT_HTTPS".to_owned(),
            cfg.api_port.to_string(),
        ));
        let mut binds = Vec::new();
        if let Some(sa_dir) = &self.sandbox.kubeconfig {
            base_env.push(("KUBECONFIG".to_owned(), format!("{SA_MOUNT}/kubeconfig")));
            binds.push(Bind {
                source: sa_dir.clone(),
                target: PathBuf::from(SA_MOUNT),
                read_only: true,
            });
        }
        base_env.push((
            POD_UID_ENV.to_owned(),
            pod.metadata.uid.clone().unwrap_or_default(),
        ));

        for m in container.volume_mounts.iter().flatten() {
            let Some(root) = self.sandbox.volumes.get(&m.name) else {
                tracing::warn!(volume = %m.name, "volumeMount names an unknown volume; skipped");
                continue;
            };
            let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) if !sub.split('/').any(|c| c == "..") => root.join(sub),
                _ => root.clone(),
            };
            binds.push(Bind {
                source,
                target: PathBuf::from(&m.mount_path),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        let user = container_user(pod, &container);
        // Like an image without WORKDIR: `/` unless the container says otherwise.
        let workdir = container
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"));
        ContainerCtx {
            ctx: self.ctx.clone(),
            state: self.state.clone(),
            index,
            init,
            container,
            pod: pod.clone(),
            facts: RuntimeFacts {
                pod_ip: self.sandbox.pod_ip.to_string(),
                host_ip: cfg.host_ip().to_string(),
            },
            netns: self.sandbox.netns.clone(),
            base_env,
            binds,
            user,
            workdir,
            grace: grace_of(pod),
        }
    }
}

fn spec_containers(pod: &Pod, init: bool) -> Vec<ContainerRuntime> {
    let spec = pod.spec.as_ref();
    let list = if init {
        spec.and_then(|s| s.init_containers.clone())
            .unwrap_or_default()
    } else {
        spec.map(|s| s.containers.clone()).unwrap_or_default()
    };
    list.iter()
        .map(|c| ContainerRuntime::creating(&c.name, c.image.as_deref().unwrap_or("")))
        .collect()
}

fn carry_restart_counts(pod: &Pod, mut rt: PodRuntime) -> PodRuntime {
    let old = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    for c in &mut rt.containers {
        if let Some(prev) = old.and_then(|o| o.iter().find(|p| p.name == c.name)) {
            c.restart_count = prev.restart_count;
        }
    }
    rt
}

/// runAsUser/runAsGroup of a container (container securityContext over the pod's).
fn container_user(
    pod: &Pod,
    c: &k8s_openapi::api::core::v1::Container,
) -> (Option<u32>, Option<u32>) {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = c.security_context.as_ref();
    let uid = csc
        .and_then(|s| s.run_as_user)
        .or_else(|| psc.and_then(|s| s.run_as_user))
        .and_then(|v| u32::try_from(v).ok());
    let gid = csc
        .and_then(|s| s.run_as_group)
        .or_else(|| psc.and_then(|s| s.run_as_group))
        .and_then(|v| u32::try_from(v).ok());
    (uid, gid)
}

/// The pod-level user to own the pod dir, if any container runs as non-root.
fn pod_user(pod: &Pod) -> Option<(u32, u32)> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find_map(|c| match container_user(pod, c) {
            (Some(u), g) if u != 0 => Some((u, g.unwrap_or(u))),
            _ => None,
        })
}

fn chown_tree(root: &Path, (uid, gid): (u32, u32)) {
    let _ = std::os::unix::fs::chown(root, Some(uid), Some(gid));
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                chown_tree(&p, (uid, gid));
            } else {
                let _ = std::os::unix::fs::chown(&p, Some(uid), Some(gid));
            }
        }
    }
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, dir = %dir.display(), "removing pod dir");
    }
}

fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
    }
}

/// Requests tokens and writes them; returns the shortest lifetime.
async fn write_tokens(
    ctx: &Ctx,
    pod: &PodRef,
    files: &[(PathBuf, Option<String>, i64)],
) -> Result<Duration, crate::token::TokenError> {
    let mut issued: BTreeMap<(Option<String>, i64), String> = BTreeMap::new();
    let mut shortest = Duration::from_secs(3600);
    for (path, audience, exp) in files {
        let key = (audience.clone(), *exp);
        let token = match issued.get(&key) {
            Some(t) => t.clone(),
            None => {
                let t = token::request(&ctx.client, pod, audience.as_deref(), *exp).await?;
                let lifetime = t
                    .expires
                    .map(|e| e.duration_since(Timestamp::now()))
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or(Duration::from_secs(u64::try_from(*exp).unwrap_or(600)));
                shortest = shortest.min(lifetime);
                issued.insert(key, t.token.clone());
                t.token
            }
        };
        let tmp = path.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, token.as_bytes()).and_then(|()| std::fs::rename(&tmp, path))
        {
            tracing::warn!(error = %e, path = %path.display(), "writing token");
        }
    }
    Ok(shortest)
}

/// Rewrites the token files at 80% of their lifetime.
async fn refresh_tokens(ctx: Arc<Ctx>, pod: PodRef, files: Vec<(PathBuf, Option<String>, i64)>) {
    if files.is_empty() {
        return;
    }
    let mut wait = Duration::from_secs(
        u64::try_from(files.iter().map(|f| f.2).min().unwrap_or(3600)).unwrap_or(600) * 8 / 10,
    );
    loop {
        tokio::time::sleep(wait).await;
        wait = match write_tokens(&ctx, &pod, &files).await {
            Ok(lifetime) => {
                tracing::info!(pod = %pod.name, "service account tokens refreshed");
                lifetime * 8 / 10
            }
            Err(e) => {
                tracing::warn!(pod = %pod.name, error = %e, "token refresh failed; retrying");
                Duration::from_secs(10)
            }
        };
    }
}

/// Writes the pod status whenever the runtime record changes (and every 30 s).
async fn status_writer(ctx: Arc<Ctx>, updates: watch::Receiver<Pod>, state: Arc<PodState>) {
    let mut last: Option<PodStatus> = None;
    loop {
        let mut pod = updates.borrow().clone();
        if let Some(l) = &last {
            // Our last write is the freshest truth for transition times.
            let mut s = l.clone();
            if let Some(cur) = pod.status.as_ref() {
                s.qos_class = cur.qos_class.clone();
                // Keep conditions others own (readiness gates) from the watched object.
                let mut conds = s.conditions.clone().unwrap_or_default();
                for c in cur.conditions.iter().flatten() {
                    if !conds.iter().any(|k| k.type_ == c.type_) {
                        conds.push(c.clone());
                    }
                }
                s.conditions = Some(conds);
            }
            pod.status = Some(s);
        }
        let status = build_status(&pod, &state.snapshot(), Timestamp::now());
        if last.as_ref() != Some(&status) {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => last = Some(status),
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "status update failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = state.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}
