//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas are safe: only
//! the holder reconciles. The decision is a pure function of the Lease and the time; the loop
//! around it does the I/O, using the Lease's resourceVersion for optimistic concurrency (two
//! candidates racing for an expired Lease: one replace wins, the other gets 409 Conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What a candidate should do with the Lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder stopped renewing: take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live Lease: stand by.
    Follow {
        /// The current holder.
        holder: String,
    },
}

/// Decides from the Lease spec, our identity and the current time.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration =
        SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(at) if at.saturating_add(duration).is_ok_and(|expiry| expiry > now) => {
            Decision::Follow {
                holder: holder.to_owned(),
            }
        }
        _ => Decision::Acquire,
    }
}

/// The Lease spec after acting on a decision (`None` for [`Decision::Follow`]).
pub fn next_spec(
    prev: Option<&LeaseSpec>,
    decision: &Decision,
    me: &str,
    duration: Duration,
    now: Timestamp,
) -> Option<LeaseSpec> {
    let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1);
    match decision {
        Decision::Follow { .. } => None,
        Decision::Renew => {
            let mut s = prev.cloned().unwrap_or_default();
            s.renew_time = Some(MicroTime(now));
            s.lease_duration_seconds = Some(secs);
            Some(s)
        }
        Decision::Acquire => {
            let transitions = prev.and_then(|s| s.lease_transitions).unwrap_or(0);
            let had_holder = prev
                .and_then(|s| s.holder_identity.as_deref())
                .is_some_and(|h| !h.is_empty());
            Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(if had_holder {
                    transitions.saturating_add(1)
                } else {
                    transitions
                }),
                ..LeaseSpec::default()
            })
        }
    }
}

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal; a follower takes over after this.
    pub lease_duration: Duration,
}

/// Why one election round failed (logged and retried).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Reading the Lease failed.
    #[error("reading Lease {0}")]
    Get(String, #[source] kube::Error),
    /// Creating or replacing the Lease failed.
    #[error("writing Lease {0}")]
    Write(String, #[source] kube::Error),
    /// The Lease changed between reading and writing it (another replica campaigning, or any
    /// other writer, such as `helm upgrade` relabelling it): the next round reads it again.
    #[error("Lease {0} changed while it was being written; read again next round")]
    Conflict(String),
}

/// Campaigns for the Lease until `shutdown` turns true, publishing leadership on `leading`.
/// On shutdown a held Lease is released so a follower takes over at once.
pub async fn run(
    api: Api<Lease>,
    cfg: LeaderConfig,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = (cfg.lease_duration / 3).max(Duration::from_millis(200));
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match round(&api, &cfg).await {
            Ok(true) => {
                if !*leading.borrow() {
                    info!(identity = %cfg.identity, lease = %cfg.name, "became leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    warn!("another replica took the lease");
                }
                leading.send_replace(false);
            }
            Err(e) => {
                if matches!(e, LeaderError::Conflict(_)) {
                    debug!(error = %e, "leader election round conflicted");
                } else {
                    warn!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "leader election round failed");
                }
                // Keep leading only while our last renewal is certainly still valid.
                let valid = last_renewed
                    .is_some_and(|t| t.elapsed() < cfg.lease_duration.saturating_sub(period));
                if *leading.borrow() && !valid {
                    warn!("could not renew the lease in time; stepping down");
                    leading.send_replace(false);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    if *leading.borrow() {
        release(&api, &cfg).await;
        leading.send_replace(false);
    }
}

/// One election round; `Ok(true)` when we hold the Lease afterwards.
async fn round(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, LeaderError> {
    let now = Timestamp::now();
    let current = api
        .get_opt(&cfg.name)
        .await
        .map_err(|e| LeaderError::Get(cfg.name.clone(), e))?;
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &cfg.identity,
        now,
    );
    let Some(spec) = next_spec(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &decision,
        &cfg.identity,
        cfg.lease_duration,
        now,
    ) else {
        return Ok(false);
    };
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            // resourceVersion stays set: a concurrent writer makes this fail with 409.
            lease.spec = Some(spec);
            api.replace(&cfg.name, &PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(_) => Ok(true),
        // Not a verdict on who leads: a leader keeps leading while its last renewal is valid,
        // as after any failed round. (Taken as "another replica holds it", any write to the
        // Lease, even a label change, made the leader step down and exit.)
        Err(kube::Error::Api(s)) if s.code == 409 => Err(LeaderError::Conflict(cfg.name.clone())),
        Err(e) => Err(LeaderError::Write(cfg.name.clone(), e)),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaderConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let ours = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .is_some_and(|h| h == cfg.identity);
    if !ours {
        return;
    }
    if let Some(s) = lease.spec.as_mut() {
        s.holder_identity = None;
        s.renew_time = None;
    }
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => info!("released the leader lease"),
        Err(e) => {
            warn!(error = %e, "releasing the leader lease failed; a follower takes over when it expires")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_or_released_lease_is_acquired() {
        assert_eq!(decide(None, "a", at(100)), Decision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", at(100)),
            Decision::Acquire
        );
    }

    #[test]
    fn a_live_lease_of_another_replica_is_followed() {
        assert_eq!(
            decide(Some(&held("b", 90)), "a", at(100)),
            Decision::Follow { holder: "b".into() }
        );
    }

    #[test]
    fn an_expired_lease_of_another_replica_is_taken_over() {
        assert_eq!(
            decide(Some(&held("b", 80)), "a", at(100)),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held("b", 85)), "a", at(100)),
            Decision::Acquire
        );
    }

    #[test]
    fn our_own_lease_is_renewed_even_if_late() {
        assert_eq!(decide(Some(&held("a", 10)), "a", at(100)), Decision::Renew);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_the_count() {
        let prev = held("b", 80);
        let s = next_spec(
            Some(&prev),
            &Decision::Acquire,
            "a",
            Duration::from_secs(15),
            at(100),
        )
        .unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_transitions, Some(3));
        assert_eq!(s.renew_time, Some(MicroTime(at(100))));
        let r = next_spec(
            Some(&s),
            &Decision::Renew,
            "a",
            Duration::from_secs(15),
            at(105),
        )
        .unwrap();
        assert_eq!(r.lease_transitions, Some(3));
        assert_eq!(r.renew_time, Some(MicroTime(at(105))));
        assert_eq!(r.acquire_time, Some(MicroTime(at(100))));
        assert!(
            next_spec(
                Some(&s),
                &Decision::Follow { holder: "a".into() },
                "b",
                Duration::from_secs(15),
                at(105)
            )
            .is_none()
        );
    }
}

#[cfg(test)]
mod conflict_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    type Held = Arc<Mutex<Option<serde_json::Value>>>;

    fn status(code: u16, reason: &str) -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": reason, "code": code})
    }

    /// One request to the fake API server: GET returns the Lease, a write stores it, except
    /// the writes numbered in `conflicts`, which answer 409.
    async fn handle(
        req: http::Request<hyper::body::Incoming>,
        lease: Held,
        puts: Arc<AtomicUsize>,
        conflicts: std::ops::Range<usize>,
    ) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
        use http_body_util::BodyExt as _;
        let method = req.method().clone();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut held = lease.lock().unwrap();
        let (code, answer) = if method == http::Method::GET {
            held.clone()
                .map_or_else(|| (404, status(404, "NotFound")), |l| (200, l))
        } else {
            let n = puts.fetch_add(1, Ordering::SeqCst) + 1;
            if conflicts.contains(&n) {
                (409, status(409, "Conflict"))
            } else {
                let mut l: serde_json::Value = serde_json::from_slice(&body).unwrap();
                l["metadata"]["resourceVersion"] = n.to_string().into();
                *held = Some(l.clone());
                (200, l)
            }
        };
        Ok(http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                answer.to_string(),
            )))
            .unwrap())
    }

    /// A fake API server holding one Lease; returns its URL and the count of writes.
    async fn lease_server(conflicts: std::ops::Range<usize>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let lease = Held::default();
        let puts = Arc::new(AtomicUsize::new(0));
        let count = puts.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (lease, count, conflicts) = (lease.clone(), count.clone(), conflicts.clone());
                let service = hyper::service::service_fn(move |req| {
                    handle(req, lease.clone(), count.clone(), conflicts.clone())
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), service)
                        .await;
                });
            }
        });
        (url, puts)
    }

    /// Any write to the Lease between a renewal's read and write (another campaigner, or
    /// `helm upgrade` relabelling it) answers 409. Taken as "another replica holds it", that
    /// made the leader step down and exit; it is now a failed round, retried.
    #[tokio::test]
    async fn a_leader_whose_renewals_conflict_briefly_keeps_leading() {
        // PUT 1 creates the Lease; PUT 2 (the next renewal) conflicts. One conflict is within
        // the renewal deadline (two thirds of the Lease); two in a row are not.
        let (url, puts) = lease_server(2..3).await;
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let (leading_tx, mut leading) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let elector = tokio::spawn(run(
            Api::namespaced(client, "ops"),
            LeaderConfig {
                name: "tandem".into(),
                namespace: "ops".into(),
                identity: "me".into(),
                lease_duration: Duration::from_millis(1500),
            },
            leading_tx,
            stop,
        ));
        leading.wait_for(|l| *l).await.unwrap();
        let mut stepped_down = false;
        while puts.load(Ordering::SeqCst) < 4 {
            tokio::select! {
                r = leading.changed() => {
                    r.unwrap();
                    stepped_down |= !*leading.borrow();
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        assert!(!stepped_down, "stepped down on a conflicting renewal");
        assert!(*leading.borrow(), "leads after renewing again");
        stop_tx.send_replace(true);
        elector.await.unwrap();
    }
}
