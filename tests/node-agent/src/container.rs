//! Supervises one container: resolves image and env, starts the process, runs its probes,
//! restarts it by the pod's restart policy with crash-loop backoff, and stops it gracefully.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backoff::CrashLoopBackoff;
use crate::ctx::{Ctx, PodState};
use crate::env::{RuntimeFacts, expand, referenced_sources, resolve_env};
use crate::image::{build_argv, map_image};
use crate::probe::{Action, ProbeTiming, ProbeTracker, Verdict, resolve_action, run_network};
use crate::process::{self, Bind, LaunchSpec};
use crate::status::{ContainerRuntime, RunState, Termination};

/// Retry delay for a container that cannot be created yet (missing ConfigMap, binary..).
const CONFIG_RETRY: Duration = Duration::from_secs(3);

/// Everything fixed for the life of one container.
#[derive(Clone)]
pub struct ContainerCtx {
    /// Shared context.
    pub ctx: Arc<Ctx>,
    /// The pod's runtime record.
    pub state: Arc<PodState>,
    /// Index in `containers` or `initContainers`.
    pub index: usize,
    /// An init container (runs to completion, restarts only on failure).
    pub init: bool,
    /// The container spec.
    pub container: Container,
    /// The pod as first seen.
    pub pod: Arc<Pod>,
    /// Pod IP and host IP.
    pub facts: RuntimeFacts,
    /// Network namespace (`None` for hostNetwork).
    pub netns: Option<String>,
    /// Agent-provided env (pass-through, HOSTNAME, KUBERNETES_*, KUBECONFIG).
    pub base_env: Vec<(String, String)>,
    /// Volume binds of this container.
    pub binds: Vec<Bind>,
    /// runAsUser / runAsGroup.
    pub user: (Option<u32>, Option<u32>),
    /// Working directory.
    pub workdir: PathBuf,
    /// terminationGracePeriodSeconds.
    pub grace: Duration,
}

/// How a supervised container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exited for good with this code (policy says no restart).
    Completed(i32),
    /// Stopped on request (deletion or agent shutdown).
    Stopped,
}

enum ProbeEvent {
    Started,
    Ready(bool),
    Failed(&'static str),
}

impl ContainerCtx {
    fn set(&self, f: impl FnOnce(&mut ContainerRuntime)) {
        let (idx, init) = (self.index, self.init);
        self.state.update(|rt| {
            let list = if init {
                &mut rt.init_containers
            } else {
                &mut rt.containers
            };
            if let Some(c) = list.get_mut(idx) {
                f(c);
            }
        });
    }

    fn name(&self) -> &str {
        &self.container.name
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn event(&self, type_: &str, reason: &str, message: &str) {
        crate::events::emit(
            &self.ctx.client,
            &self.pod,
            Some(self.name()),
            type_,
            reason,
            message,
        );
    }

    fn waiting(&self, reason: &str, message: String) {
        tracing::info!(container = self.name(), reason, %message, "container waiting");
        let same = self
            .state
            .snapshot()
            .containers_of(self.init)
            .get(self.index)
            .is_some_and(
                |c| matches!(&c.state, RunState::Waiting { reason: r, .. } if r == reason),
            );
        if !same {
            self.event(
                crate::events::WARNING,
                "Failed",
                &format!("{reason}: {message}"),
            );
        }
        self.set(|c| {
            c.state = RunState::Waiting {
                reason: reason.to_owned(),
                message: Some(message),
            };
            c.ready = false;
        });
    }

    fn log_path(&self) -> PathBuf {
        let ns = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = self.pod.metadata.name.as_deref().unwrap_or("");
        self.ctx.cfg.log_file(ns, name, self.name())
    }

    /// Recreates the pod's network namespace (same address) if someone deleted it.
    async fn repair_sandbox(&self) -> Result<(), crate::net::NetError> {
        let Some(netns) = &self.netns else {
            return Ok(());
        };
        if std::path::Path::new("/run/netns").join(netns).exists() {
            return Ok(());
        }
        let _guard = self.state.sandbox_repair.lock().await;
        if std::path::Path::new("/run/netns").join(netns).exists() {
            return Ok(());
        }
        let cfg = &self.ctx.cfg;
        tracing::warn!(%netns, "pod network namespace vanished; recreating it");
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        let ip: Ipv4Addr = self.facts.pod_ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
        self.ctx
            .ip
            .ensure_bridge(&cfg.args.bridge, &cfg.args.bridge_address)
            .await?;
        self.ctx
            .ip
            .setup_pod(
                &crate::net::PodNetNames::for_uid(&uid),
                &cfg.args.bridge,
                ip,
                cfg.subnet.prefix,
                cfg.subnet.gateway,
            )
            .await
    }

    /// Resolves image, env and argv for one run; `Err((reason, message, retry))`.
    async fn prepare(&self) -> Result<LaunchSpec, (&'static str, String, bool)> {
        let cfg = &self.ctx.cfg;
        let image = self.container.image.clone().unwrap_or_default();
        let mapped = map_image(&image, &cfg.args.bin_dir, &cfg.self_exe)
            .map_err(|e| ("ImageNotMapped", e.to_string(), false))?;
        if !mapped.program.is_file() {
            return Err((
                "BinaryNotFound",
                format!(
                    "image {image:?} maps to {} which does not exist",
                    mapped.program.display()
                ),
                true,
            ));
        }
        self.repair_sandbox().await.map_err(|e| {
            (
                "CreateContainerError",
                format!("recreating the pod network namespace: {e}"),
                true,
            )
        })?;
        let ns = self.pod.metadata.namespace.as_deref().unwrap_or("default");
        let (cms, secrets) = referenced_sources(&self.container);
        let sources = self
            .ctx
            .fetch_sources(ns, &cms, &secrets)
            .await
            .map_err(|e| {
                (
                    "CreateContainerConfigError",
                    format!("reading configmaps/secrets: {e}"),
                    true,
                )
            })?;
        let env = resolve_env(
            &self.pod,
            &self.container,
            &self.facts,
            &sources,
            &self.base_env,
        )
        .map_err(|e| ("CreateContainerConfigError", e.to_string(), true))?;
        let command: Vec<String> = self
            .container
            .command
            .iter()
            .flatten()
            .map(|s| expand(s, &env))
            .collect();
        let args: Vec<String> = self
            .container
            .args
            .iter()
            .flatten()
            .map(|s| expand(s, &env))
            .collect();
        let argv = build_argv(&mapped, &command, &args);
        let mut binds = self.binds.clone();
        binds.push(self.fresh_termination_log().map_err(|e| {
            (
                "CreateContainerError",
                format!("termination log: {e}"),
                true,
            )
        })?);
        for b in &binds {
            self.ctx
                .ensure_mountpoint(&b.target, b.source.is_file())
                .map_err(|e| {
                    (
                        "CreateContainerError",
                        format!("mount point {}: {e}", b.target.display()),
                        true,
                    )
                })?;
        }
        self.set(|c| c.image_id = format!("tandem://{}", mapped.program.display()));
        Ok(LaunchSpec {
            ip: cfg.ip.clone(),
            self_exe: cfg.self_exe.clone(),
            netns: self.netns.clone(),
            binds,
            uid: self.user.0,
            gid: self.user.1,
            workdir: self.workdir.clone(),
            argv,
            env,
            log: self.log_path(),
        })
    }

    /// The host file behind the container's `terminationMessagePath`.
    fn termination_log_path(&self) -> PathBuf {
        let uid = self.pod.metadata.uid.as_deref().unwrap_or_default();
        self.ctx.cfg.pod_dir(uid).join("termination").join(format!(
            "{}-{}",
            if self.init { "init" } else { "main" },
            self.index
        ))
    }

    /// An empty termination log the container's user may write, bound at its
    /// `terminationMessagePath` (default `/dev/termination-log`), as the kubelet provides.
    fn fresh_termination_log(&self) -> std::io::Result<Bind> {
        let source = self.termination_log_path();
        if let Some(dir) = source.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&source, b"")?;
        if let (Some(uid), gid) = self.user {
            std::os::unix::fs::chown(&source, Some(uid), gid)?;
        }
        let target = self
            .container
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/dev/termination-log".to_owned());
        Ok(Bind {
            source,
            target: PathBuf::from(target),
            read_only: false,
        })
    }

    /// The termination message after an exit with `code`, as the kubelet makes it: what the
    /// container wrote to its termination log (at most 4 KiB), or, under
    /// `FallbackToLogsOnError` after a failure, the end of its log (80 lines, 2 KiB at most).
    fn termination_message(&self, log: &std::path::Path, code: i32) -> Option<String> {
        let written = std::fs::read(self.termination_log_path()).unwrap_or_default();
        let written = String::from_utf8_lossy(&written[..written.len().min(4096)]);
        if !written.trim().is_empty() {
            return Some(written.into_owned());
        }
        if code == 0
            || self.container.termination_message_policy.as_deref() != Some("FallbackToLogsOnError")
        {
            return None;
        }
        let text = std::fs::read(log).ok()?;
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(2048)..]).into_owned();
        // The container's own lines since the agent's last marker.
        let own = text
            .rsplit("---- tandem-node-agent: ")
            .next()
            .unwrap_or(&text);
        let own = own.split_once('\n').map_or("", |(_, rest)| rest);
        let lines: Vec<&str> = own.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        (!tail.trim().is_empty()).then_some(tail)
    }

    /// Runs the container until it completes for good or is stopped.
    pub async fn supervise(self, mut stop: watch::Receiver<Option<Duration>>) -> Outcome {
        let (initial, max) = self.ctx.cfg.backoff;
        let mut backoff = CrashLoopBackoff::new(initial, max);
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        let mut run: u32 = 0;
        loop {
            if stop.borrow().is_some() {
                return Outcome::Stopped;
            }
            let spec = match self.prepare().await {
                Ok(s) => s,
                Err((reason, message, retry)) => {
                    self.waiting(reason, message);
                    if retry {
                        tokio::select! {
                            _ = tokio::time::sleep(CONFIG_RETRY) => continue,
                            _ = stop.changed() => return Outcome::Stopped,
                        }
                    }
                    let _ = stop.changed().await;
                    return Outcome::Stopped;
                }
            };
            run += 1;
            let container_id = format!("tandem://{uid}/{}/{run}", self.name());
            let started_at = Timestamp::now();
            let started_instant = Instant::now();
            let marker = format!(
                "---- tandem-node-agent: starting {} (run {run}) at {started_at}: {:?}\n",
                self.name(),
                spec.argv
            );
            append_log(&spec.log, &marker);
            let (code, signal, reason, message, stopped) = match process::spawn(&spec) {
                Err(e) => (
                    128,
                    None,
                    "StartError".to_owned(),
                    Some(e.to_string()),
                    false,
                ),
                Ok(child) => {
                    let has_startup = self.container.startup_probe.is_some();
                    let has_readiness = self.container.readiness_probe.is_some();
                    self.event(
                        crate::events::NORMAL,
                        "Started",
                        &format!("Started container {}", self.name()),
                    );
                    self.set(|c| {
                        c.state = RunState::Running { started_at };
                        c.container_id = Some(container_id.clone());
                        c.started = !has_startup;
                        c.ready = !has_startup && !has_readiness;
                    });
                    self.run_process(child, &spec, &mut stop).await
                }
            };
            let message = message.or_else(|| self.termination_message(&spec.log, code));
            let termination = Termination {
                exit_code: code,
                signal,
                reason,
                message,
                started_at,
                finished_at: Timestamp::now(),
                container_id: Some(container_id),
            };
            tracing::info!(
                container = self.name(),
                exit_code = code,
                ?signal,
                stopped,
                "container exited"
            );
            append_log(
                &spec.log,
                &format!(
                    "---- tandem-node-agent: {} exited with code {code}\n",
                    self.name()
                ),
            );
            // A probe kill restarts the container unless the policy is Never, whatever the code.
            let probe_killed = reason_is_probe(&termination.message);
            let restart = !stopped
                && match (self.init, self.restart_policy()) {
                    (_, "Never") => false,
                    (true, _) | (false, "OnFailure") => code != 0 || probe_killed,
                    (false, _) => true,
                };
            if !restart {
                self.set(|c| {
                    c.state = RunState::Terminated(termination);
                    c.ready = false;
                    c.started = false;
                });
                return if stopped {
                    Outcome::Stopped
                } else {
                    Outcome::Completed(code)
                };
            }
            let delay = backoff.next_delay(started_instant.elapsed());
            let msg = format!(
                "back-off {}s restarting failed container={} pod={}",
                delay.as_secs(),
                self.name(),
                self.pod.metadata.name.as_deref().unwrap_or("")
            );
            self.event(crate::events::WARNING, "BackOff", &msg);
            self.set(|c| {
                c.restart_count = c.restart_count.saturating_add(1);
                c.last_termination = Some(termination);
                c.state = RunState::Waiting {
                    reason: "CrashLoopBackOff".to_owned(),
                    message: Some(msg),
                };
                c.ready = false;
                c.started = false;
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return Outcome::Stopped,
            }
        }
    }

    /// Waits for the process while running its probes; handles liveness kills and stop
    /// requests. Returns (exit code, signal, reason, message, stopped-on-request).
    async fn run_process(
        &self,
        mut child: tokio::process::Child,
        spec: &LaunchSpec,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> (i32, Option<i32>, String, Option<String>, bool) {
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let (tx, mut rx) = mpsc::channel(8);
        let probes = tokio::spawn(probe_loop(self.clone(), spec.clone(), tx));
        let mut stopping = false;
        let mut kill_at: Option<Instant> = None;
        let mut probe_failure: Option<&'static str> = None;
        let status = loop {
            tokio::select! {
                r = child.wait() => break r,
                Some(ev) = rx.recv() => match ev {
                    ProbeEvent::Started => self.set(|c| {
                        c.started = true;
                        if self.container.readiness_probe.is_none() {
                            c.ready = true;
                        }
                    }),
                    ProbeEvent::Ready(r) => self.set(|c| c.ready = r),
                    ProbeEvent::Failed(which) => {
                        if kill_at.is_none() {
                            tracing::info!(container = self.name(), probe = which, "probe failed; killing container");
                            self.event(crate::events::WARNING, "Unhealthy", &format!("{which} probe failed"));
                            self.event(
                                crate::events::NORMAL,
                                "Killing",
                                &format!("Container {} failed {which} probe, will be restarted", self.name()),
                            );
                            probe_failure = Some(which);
                            self.set(|c| c.ready = false);
                            let grace = probe_grace(&self.container, which).unwrap_or(self.grace);
                            process::term_group(pid);
                            kill_at = Some(Instant::now() + grace);
                        }
                    }
                },
                r = stop.changed(), if !stopping => {
                    stopping = true;
                    let grace = match r {
                        Ok(()) => stop.borrow().unwrap_or(Duration::ZERO),
                        Err(_) => Duration::ZERO,
                    };
                    process::term_group(pid);
                    kill_at = Some(Instant::now() + grace);
                },
                _ = sleep_until_opt(kill_at) => {
                    process::kill_group(pid);
                    kill_at = None;
                },
            }
        };
        probes.abort();
        // Whatever the main process left behind in its group goes too.
        process::kill_group(pid);
        let (code, signal) = match status {
            Ok(s) => process::exit_info(s),
            Err(e) => {
                return (
                    128,
                    None,
                    "Error".to_owned(),
                    Some(format!("waiting for process: {e}")),
                    stopping,
                );
            }
        };
        let reason = if code == 0 { "Completed" } else { "Error" };
        let message =
            probe_failure.map(|p| format!("{PROBE_KILL_PREFIX} {p} probe and was killed"));
        (code, signal, reason.to_owned(), message, stopping)
    }
}

fn reason_is_probe(message: &Option<String>) -> bool {
    message
        .as_deref()
        .is_some_and(|m| m.starts_with(PROBE_KILL_PREFIX))
}

/// Start of the termination message of a container killed by a failing probe.
const PROBE_KILL_PREFIX: &str = "container failed its";

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn probe_grace(c: &Container, which: &str) -> Option<Duration> {
    let p = match which {
        "liveness" => c.liveness_probe.as_ref(),
        _ => c.startup_probe.as_ref(),
    }?;
    p.termination_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
}

fn append_log(path: &std::path::Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Runs one probe attempt.
async fn probe_once(
    cc: &ContainerCtx,
    spec: &LaunchSpec,
    action: &Action,
    timeout: Duration,
) -> bool {
    match action {
        Action::Exec { command } => {
            let mut s = spec.clone();
            s.argv = command.clone();
            s.log = PathBuf::from("/dev/null");
            match process::spawn(&s) {
                Ok(mut child) => match tokio::time::timeout(timeout, child.wait()).await {
                    Ok(Ok(st)) => st.success(),
                    _ => {
                        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                            process::kill_group(pid);
                        }
                        false
                    }
                },
                Err(_) => false,
            }
        }
        other => run_network(other, timeout, &cc.ctx.http).await,
    }
}

fn resolved(cc: &ContainerCtx, probe: &Probe) -> Option<(Action, ProbeTiming)> {
    let ip: Ipv4Addr = cc.facts.pod_ip.parse().unwrap_or(Ipv4Addr::LOCALHOST);
    match resolve_action(probe, &cc.container, ip) {
        Ok(a) => Some((a, ProbeTiming::of(probe))),
        Err(e) => {
            tracing::warn!(container = cc.name(), error = %e, "ignoring unusable probe");
            None
        }
    }
}

/// Startup probe first; then readiness and liveness side by side. Events go to `tx`.
async fn probe_loop(cc: ContainerCtx, spec: LaunchSpec, tx: mpsc::Sender<ProbeEvent>) {
    if let Some((action, timing)) = cc
        .container
        .startup_probe
        .as_ref()
        .and_then(|p| resolved(&cc, p))
    {
        tokio::time::sleep(timing.initial_delay).await;
        let mut tracker = ProbeTracker::new(&timing);
        loop {
            let ok = probe_once(&cc, &spec, &action, timing.timeout).await;
            match tracker.record(ok) {
                Some(Verdict::Success) => break,
                Some(Verdict::Failure) => {
                    let _ = tx.send(ProbeEvent::Failed("startup")).await;
                    return;
                }
                _ => {}
            }
            tokio::time::sleep(timing.period).await;
        }
    }
    let _ = tx.send(ProbeEvent::Started).await;
    let readiness = async {
        let Some((action, timing)) = cc
            .container
            .readiness_probe
            .as_ref()
            .and_then(|p| resolved(&cc, p))
        else {
            return;
        };
        tokio::time::sleep(timing.initial_delay).await;
        let mut tracker = ProbeTracker::new(&timing);
        loop {
            let ok = probe_once(&cc, &spec, &action, timing.timeout).await;
            if let Some(v) = tracker.record(ok) {
                let _ = tx.send(ProbeEvent::Ready(v == Verdict::Success)).await;
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    let liveness = async {
        let Some((action, timing)) = cc
            .container
            .liveness_probe
            .as_ref()
            .and_then(|p| resolved(&cc, p))
        else {
            return;
        };
        tokio::time::sleep(timing.initial_delay).await;
        let mut tracker = ProbeTracker::new(&timing);
        loop {
            let ok = probe_once(&cc, &spec, &action, timing.timeout).await;
            if tracker.record(ok) == Some(Verdict::Failure) {
                let _ = tx.send(ProbeEvent::Failed("liveness")).await;
                return;
            }
            tokio::time::sleep(timing.period).await;
        }
    };
    tokio::join!(readiness, liveness);
    std::future::pending::<()>().await;
}
