//! Probes: the pure threshold tracker ([`ProbeTracker`]) and the executors for httpGet,
//! tcpSocket, grpc (grpc.health.v1) and exec.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Probe timing and thresholds, with Kubernetes defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    /// Delay before the first probe.
    pub initial_delay: Duration,
    /// Time between probes.
    pub period: Duration,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Consecutive successes to flip to success.
    pub success_threshold: u32,
    /// Consecutive failures to flip to failure.
    pub failure_threshold: u32,
}

fn secs(v: Option<i32>, default: i32, min: i32) -> Duration {
    let s = v.unwrap_or(default).max(min);
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

fn count(v: Option<i32>, default: i32) -> u32 {
    u32::try_from(v.unwrap_or(default).max(1)).unwrap_or(1)
}

impl ProbeTiming {
    /// Timing of `probe` with the Kubernetes defaults (period 10s, timeout 1s, thresholds 1/3).
    pub fn of(probe: &Probe) -> Self {
        Self {
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// The probe's verdict after thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet decided (no threshold reached since start).
    Unknown,
    /// Success threshold reached.
    Success,
    /// Failure threshold reached.
    Failure,
}

/// Counts consecutive results and flips the verdict at the thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTracker {
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    verdict: Verdict,
}

impl ProbeTracker {
    /// A tracker with the given thresholds.
    pub fn new(timing: &ProbeTiming) -> Self {
        Self {
            success_threshold: timing.success_threshold,
            failure_threshold: timing.failure_threshold,
            successes: 0,
            failures: 0,
            verdict: Verdict::Unknown,
        }
    }

    /// Records one probe result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<Verdict> {
        let next = if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes >= self.success_threshold).then_some(Verdict::Success)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures >= self.failure_threshold).then_some(Verdict::Failure)
        };
        match next {
            Some(v) if v != self.verdict => {
                self.verdict = v;
                Some(v)
            }
            _ => None,
        }
    }

    /// The current verdict.
    #[cfg(test)]
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }
}

/// A probe action with every reference resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// HTTP(S) GET; success is a status in 200..400.
    Http {
        /// `http` or `https`.
        scheme: String,
        /// Host to dial.
        host: String,
        /// Port.
        port: u16,
        /// Path with query.
        path: String,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// TCP connect.
    Tcp {
        /// Host to dial.
        host: String,
        /// Port.
        port: u16,
    },
    /// grpc.health.v1 Check; success is SERVING.
    Grpc {
        /// Host to dial.
        host: String,
        /// Port.
        port: u16,
        /// Service name ("" for the server as a whole).
        service: String,
    },
    /// Command run in the container's namespaces; success is exit 0.
    Exec {
        /// argv.
        command: Vec<String>,
    },
}

/// A probe whose action cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// A named port that the container does not declare.
    #[error("probe port {0:?} is not a port of the container")]
    UnknownPort(String),
    /// A port number outside 1..=65535.
    #[error("probe port {0} is out of range")]
    BadPort(i32),
    /// The probe has no handler.
    #[error("probe has no handler (httpGet, tcpSocket, grpc or exec)")]
    NoHandler,
}

fn resolve_port(container: &Container, port: &IntOrString) -> Result<u16, ProbeError> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or(ProbeError::BadPort(*p)),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| ProbeError::UnknownPort(name.clone())),
    }
}

/// Resolves the probe's handler against the container and the pod IP.
pub fn resolve_action(
    probe: &Probe,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<Action, ProbeError> {
    let default_host = pod_ip.to_string();
    if let Some(h) = &probe.http_get {
        let path = h.path.clone().unwrap_or_else(|| "/".to_owned());
        return Ok(Action::Http {
            scheme: h
                .scheme
                .clone()
                .unwrap_or_else(|| "HTTP".to_owned())
                .to_ascii_lowercase(),
            host: h
                .host
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or(default_host),
            port: resolve_port(container, &h.port)?,
            path: if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            },
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|hh| (hh.name.clone(), hh.value.clone()))
                .collect(),
        });
    }
    if let Some(t) = &probe.tcp_socket {
        return Ok(Action::Tcp {
            host: t
                .host
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or(default_host),
            port: resolve_port(container, &t.port)?,
        });
    }
    if let Some(g) = &probe.grpc {
        return Ok(Action::Grpc {
            host: default_host,
            port: u16::try_from(g.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or(ProbeError::BadPort(g.port))?,
            service: g.service.clone().unwrap_or_default(),
        });
    }
    if let Some(e) = &probe.exec {
        return Ok(Action::Exec {
            command: e.command.clone().unwrap_or_default(),
        });
    }
    Err(ProbeError::NoHandler)
}

/// Runs a network probe action once (exec probes are run by the pod runtime, which knows the
/// namespaces); `true` on success.
pub async fn run_network(action: &Action, timeout: Duration, http: &reqwest::Client) -> bool {
    let fut = async {
        match action {
            Action::Http {
                scheme,
                host,
                port,
                path,
                headers,
            } => {
                let url = format!("{scheme}://{host}:{port}{path}");
                let mut req = http.get(&url);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                match req.send().await {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        (200..400).contains(&code)
                    }
                    Err(_) => false,
                }
            }
            Action::Tcp { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .is_ok(),
            Action::Grpc {
                host,
                port,
                service,
            } => grpc_check(host, *port, service).await,
            Action::Exec { .. } => false,
        }
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or(false)
}

async fn grpc_check(host: &str, port: u16, service: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
    else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    match client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
    {
        Ok(resp) => resp.into_inner().status == ServingStatus::Serving as i32,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).expect("valid probe")
    }

    #[test]
    fn timing_applies_kubernetes_defaults() {
        let t = ProbeTiming::of(&probe(json!({"tcpSocket": {"port": 80}})));
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        let t = ProbeTiming::of(&probe(
            json!({"tcpSocket": {"port": 80}, "periodSeconds": 2,
            "failureThreshold": 1, "successThreshold": 2, "initialDelaySeconds": 5}),
        ));
        assert_eq!(t.period, Duration::from_secs(2));
        assert_eq!(t.initial_delay, Duration::from_secs(5));
        assert_eq!((t.success_threshold, t.failure_threshold), (2, 1));
    }

    #[test]
    fn tracker_flips_only_at_thresholds() {
        let t = ProbeTiming::of(&probe(
            json!({"tcpSocket": {"port": 80}, "successThreshold": 2}),
        ));
        let mut tr = ProbeTracker::new(&t);
        assert_eq!(tr.record(true), None);
        assert_eq!(tr.record(true), Some(Verdict::Success));
        assert_eq!(tr.record(true), None);
        assert_eq!(tr.record(false), None);
        assert_eq!(tr.record(false), None);
        assert_eq!(tr.verdict(), Verdict::Success);
        assert_eq!(tr.record(false), Some(Verdict::Failure));
        assert_eq!(tr.record(true), None);
        assert_eq!(tr.record(true), Some(Verdict::Success));
    }

    #[test]
    fn named_ports_resolve_from_the_container_ports() {
        let c: Container = serde_json::from_value(json!({"name": "c",
            "ports": [{"name": "http", "containerPort": 8080}]}))
        .expect("container");
        let ip = Ipv4Addr::new(10, 244, 0, 9);
        let a = resolve_action(
            &probe(json!({"httpGet": {"port": "http", "path": "healthz"}})),
            &c,
            ip,
        )
        .expect("action");
        assert_eq!(
            a,
            Action::Http {
                scheme: "http".into(),
                host: "10.244.0.9".into(),
                port: 8080,
                path: "/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            resolve_action(&probe(json!({"tcpSocket": {"port": "grpc"}})), &c, ip),
            Err(ProbeError::UnknownPort("grpc".into()))
        );
        assert_eq!(
            resolve_action(&probe(json!({"grpc": {"port": 9000}})), &c, ip),
            Ok(Action::Grpc {
                host: "10.244.0.9".into(),
                port: 9000,
                service: String::new()
            })
        );
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_against_a_listener_and_fails_without_one() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let http = reqwest::Client::new();
        let a = Action::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        assert!(run_network(&a, Duration::from_secs(1), &http).await);
        drop(l);
        assert!(!run_network(&a, Duration::from_secs(1), &http).await);
    }
}
