//! `run`: the manager. Creates the bridge, cleans leftovers of a previous run, registers the
//! nodes, watches the pods bound to them and keeps one task per pod in step with the API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;

use crate::config::{AgentConfig, RunArgs};
use crate::ctx::Ctx;
use crate::pod::{self, PodHandle, StopReason};

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = Arc::new(AgentConfig::from_args(args)?);
    std::fs::create_dir_all(cfg.args.state_dir.join("pods")).context("creating state dir")?;
    std::fs::create_dir_all(cfg.log_dir()).context("creating log dir")?;
    // The operator's client: HTTP/2 and `TCP_NODELAY`, as a kubelet's client-go has, where
    // kube's own client would stall each new connection's TLS handshake for up to 40 ms.
    let client = match &cfg.args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            tandem_operator::client::build(config)?
        }
        None => tandem_operator::client::infer().await?,
    };
    let ctx = Arc::new(Ctx::new(client.clone(), cfg.clone())?);

    ctx.ip
        .ensure_bridge(&cfg.args.bridge, &cfg.args.bridge_address)
        .await
        .context("creating the bridge")?;
    tracing::info!(bridge = %cfg.args.bridge, address = %cfg.args.bridge_address, "bridge ready");
    // Processes of a previous run are not adopted: kill them, their pods start again.
    crate::cleanup::kill_pods(&ctx.ip, &cfg.args.state_dir).await;

    for node in &cfg.args.nodes {
        tokio::spawn(crate::node::heartbeat_loop(
            client.clone(),
            cfg.clone(),
            node.clone(),
        ));
    }

    let mut streams = Vec::new();
    for node in &cfg.args.nodes {
        let api: Api<Pod> = Api::all(client.clone());
        let wc = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let node = node.clone();
        streams.push(watcher(api, wc).map(move |ev| (node.clone(), ev)).boxed());
    }
    let mut events = futures::stream::select_all(streams);
    let mut manager = Manager {
        ctx,
        pods: BTreeMap::new(),
        init: BTreeMap::new(),
        synced: BTreeSet::new(),
        done: BTreeSet::new(),
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some((node, Ok(ev))) => manager.handle(&node, ev),
                Some((node, Err(e))) => {
                    tracing::warn!(%node, error = %e, "pod watch error; the watcher retries");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None => anyhow::bail!("pod watch streams ended"),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down: stopping pods");
    manager.shutdown().await;
    Ok(())
}

struct Manager {
    ctx: Arc<Ctx>,
    pods: BTreeMap<String, (String, PodHandle)>,
    /// UIDs seen during a watch (re)list, per node.
    init: BTreeMap<String, BTreeSet<String>>,
    /// Nodes whose first list completed.
    synced: BTreeSet<String>,
    /// UIDs whose task has ended (pod deleted by us): later events for them are ignored.
    done: BTreeSet<String>,
}

fn uid_of(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone().filter(|u| !u.is_empty())
}

impl Manager {
    fn handle(&mut self, node: &str, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Apply(pod) => self.upsert(node, pod),
            watcher::Event::Delete(pod) => {
                if let Some(uid) = uid_of(&pod) {
                    self.done.remove(&uid);
                    if let Some((_, h)) = self.pods.remove(&uid) {
                        tracing::info!(pod = ?pod.metadata.name, "pod object gone; stopping it");
                        let _ = h.stop.send(Some(StopReason::Gone));
                    }
                }
            }
            watcher::Event::Init => {
                self.init.insert(node.to_owned(), BTreeSet::new());
            }
            watcher::Event::InitApply(pod) => {
                if let Some(uid) = uid_of(&pod) {
                    self.init.entry(node.to_owned()).or_default().insert(uid);
                }
                self.upsert(node, pod);
            }
            watcher::Event::InitDone => {
                let seen = self.init.remove(node).unwrap_or_default();
                let pods = &self.pods;
                self.done
                    .retain(|uid| seen.contains(uid) || pods.contains_key(uid));
                // Pods of this node that vanished while the watch was down.
                let gone: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(uid, (n, _))| n == node && !seen.contains(*uid))
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in gone {
                    if let Some((_, h)) = self.pods.remove(&uid) {
                        let _ = h.stop.send(Some(StopReason::Gone));
                    }
                }
                self.synced.insert(node.to_owned());
                if self.synced.len() == self.ctx.cfg.args.nodes.len() {
                    let live: BTreeSet<String> = self.pods.keys().cloned().collect();
                    self.ctx.retain_ips(&live);
                }
            }
        }
        // Forget handles of tasks that ended, remembering their UIDs.
        let finished: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, (_, h))| h.task.is_finished())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in finished {
            self.pods.remove(&uid);
            self.done.insert(uid);
        }
    }

    fn upsert(&mut self, node: &str, pod: Pod) {
        let Some(uid) = uid_of(&pod) else {
            return;
        };
        if self.done.contains(&uid) {
            return;
        }
        match self.pods.get(&uid) {
            Some((_, h)) if !h.task.is_finished() => {
                h.updates.send_replace(pod);
            }
            Some(_) => {
                // Its task already deleted it; this is a late event.
                self.pods.remove(&uid);
                self.done.insert(uid);
            }
            None => {
                tracing::info!(pod = ?pod.metadata.name, namespace = ?pod.metadata.namespace, %node, "starting pod");
                let h = pod::spawn(self.ctx.clone(), pod);
                self.pods.insert(uid, (node.to_owned(), h));
            }
        }
    }

    async fn shutdown(self) {
        let mut tasks = Vec::new();
        // Keep the senders alive until the tasks end: a dropped update channel means "gone".
        let mut keep = Vec::new();
        for (_, (_, h)) in self.pods {
            let _ = h.stop.send(Some(StopReason::Shutdown));
            tasks.push(h.task);
            keep.push((h.updates, h.stop));
        }
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(
            Duration::from_secs(self.ctx.cfg.args.shutdown_grace_seconds + 20),
            all,
        )
        .await
        .is_err()
        {
            tracing::warn!("some pods did not stop in time");
        }
        drop(keep);
        crate::cleanup::kill_pods(&self.ctx.ip, &self.ctx.cfg.args.state_dir).await;
    }
}
