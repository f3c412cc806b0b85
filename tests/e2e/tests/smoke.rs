//! Smoke test of the local cluster itself (tier 3/4): the node agent runs a
//! Deployment's pods as real processes with their own pod IPs, scaling to zero
//! stops them, deleting the Deployment lets the garbage collector remove its
//! ReplicaSet and pods, and RBAC denies a ServiceAccount what it was not granted.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tandem_e2e::{Cluster, http_get, processes_of_pod, wait_until};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
spec:
  replicas: 2
  selector:
    matchLabels: {app: hello}
  template:
    metadata:
      labels: {app: hello}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: server
        image: tandem-testserver:latest
        args: ["--port", "8080"]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        readinessProbe:
          httpGet: {path: /healthz, port: 8080}
          periodSeconds: 1
"#;

struct ReadyPod {
    name: String,
    ip: IpAddr,
}

fn ready_pods(cluster: &Cluster, ns: &str) -> anyhow::Result<Vec<ReadyPod>> {
    let list = cluster.get_json(&["pods", "-n", ns, "-l", "app=hello"])?;
    let mut pods = Vec::new();
    for pod in list["items"].as_array().into_iter().flatten() {
        let ready = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let ip = pod["status"]["podIP"].as_str().and_then(|s| s.parse().ok());
        if let (true, Some(ip)) = (ready, ip) {
            pods.push(ReadyPod {
                name: pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                ip,
            });
        }
    }
    Ok(pods)
}

#[test]
fn deployment_pods_run_as_processes_with_distinct_reachable_pod_ips_and_stop_on_scale_to_zero()
-> anyhow::Result<()> {
    let cluster = Cluster::connect();
    let ns = cluster.namespace("smoke")?;
    let ns = ns.name();
    let manifest = DEPLOYMENT.replace(
        "name: hello\n",
        &format!("name: hello\n  namespace: {ns}\n"),
    );
    cluster.apply(&manifest)?;

    let pods = wait_until("2 Ready pods", Duration::from_secs(90), || {
        let pods = ready_pods(&cluster, ns)?;
        Ok((pods.len() == 2).then_some(pods))
    })?;
    assert_ne!(pods[0].ip, pods[1].ip, "each pod gets its own IP");
    for pod in &pods {
        assert!(
            !pod.ip.is_loopback(),
            "pod IPs are private, not loopback: {}",
            pod.ip
        );
        let (status, body) = http_get(SocketAddr::new(pod.ip, 8080), "/", Duration::from_secs(5))?;
        assert_eq!(status, 200, "GET / on {} answered {status}: {body}", pod.ip);
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(
            answer["pod"],
            pod.name.as_str(),
            "the pod's own process answered"
        );
        assert_eq!(
            answer["ip"],
            pod.ip.to_string(),
            "POD_IP from the downward API"
        );
        assert!(
            !processes_of_pod(&pod.name).is_empty(),
            "{} runs as a process",
            pod.name
        );
    }

    cluster.kubectl_ok(["scale", "deployment/hello", "-n", ns, "--replicas=0"])?;
    wait_until(
        "the pods' processes to exit",
        Duration::from_secs(60),
        || {
            Ok(pods
                .iter()
                .all(|p| processes_of_pod(&p.name).is_empty())
                .then_some(()))
        },
    )?;
    wait_until("the pods to be deleted", Duration::from_secs(60), || {
        Ok(
            cluster.get_json(&["pods", "-n", ns, "-l", "app=hello"])?["items"]
                .as_array()
                .is_some_and(|items| items.is_empty())
                .then_some(()),
        )
    })?;
    for pod in &pods {
        assert!(
            http_get(SocketAddr::new(pod.ip, 8080), "/", Duration::from_secs(1)).is_err(),
            "{} no longer answers after scale to zero",
            pod.ip
        );
    }
    Ok(())
}

#[test]
fn deleting_a_deployment_lets_the_garbage_collector_remove_its_replicaset_and_pods()
-> anyhow::Result<()> {
    let cluster = Cluster::connect();
    let ns = cluster.namespace("gc")?;
    let ns = ns.name();
    let manifest = DEPLOYMENT.replace(
        "name: hello\n",
        &format!("name: hello\n  namespace: {ns}\n"),
    );
    cluster.apply(&manifest)?;
    wait_until("the ReplicaSet and 2 pods", Duration::from_secs(60), || {
        let rs = cluster.get_json(&["replicasets", "-n", ns])?;
        let pods = cluster.get_json(&["pods", "-n", ns])?;
        let n = |v: &serde_json::Value| v["items"].as_array().map_or(0, Vec::len);
        Ok((n(&rs) == 1 && n(&pods) == 2).then_some(()))
    })?;

    // --cascade=background: the Deployment goes at once and the garbage
    // collector (kube-controller-manager) must delete what it owned.
    cluster.kubectl_ok([
        "delete",
        "deployment/hello",
        "-n",
        ns,
        "--cascade=background",
    ])?;
    wait_until(
        "the garbage collector to delete the ReplicaSet and pods",
        Duration::from_secs(90),
        || {
            let rs = cluster.get_json(&["replicasets", "-n", ns])?;
            let pods = cluster.get_json(&["pods", "-n", ns])?;
            let empty = |v: &serde_json::Value| v["items"].as_array().is_some_and(Vec::is_empty);
            Ok((empty(&rs) && empty(&pods)).then_some(()))
        },
    )?;
    Ok(())
}

#[test]
fn a_service_account_token_without_rbac_grants_is_forbidden() -> anyhow::Result<()> {
    let cluster = Cluster::connect();
    let ns = cluster.namespace("rbac")?;
    let ns = ns.name();
    cluster.kubectl_ok(["create", "serviceaccount", "unprivileged", "-n", ns])?;
    // A real bound token from the TokenRequest API, used as a bearer token:
    // authentication succeeds, authorization (RBAC) must refuse.
    let token = cluster.kubectl_ok(["create", "token", "unprivileged", "-n", ns])?;
    let out = cluster.kubectl_with_token(token.trim(), &["get", "secrets", "-n", ns])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "listing secrets must be refused");
    assert!(
        stderr.contains("Forbidden")
            && stderr.contains(&format!("system:serviceaccount:{ns}:unprivileged")),
        "expected a 403 naming the ServiceAccount, got: {stderr}"
    );

    // The same token may do what a Role grants it.
    cluster.kubectl_ok([
        "create",
        "role",
        "read-configmaps",
        "-n",
        ns,
        "--verb=list",
        "--resource=configmaps",
    ])?;
    cluster.kubectl_ok([
        "create",
        "rolebinding",
        "read-configmaps",
        "-n",
        ns,
        "--role=read-configmaps",
        &format!("--serviceaccount={ns}:unprivileged"),
    ])?;
    wait_until(
        "the RoleBinding to take effect",
        Duration::from_secs(30),
        || {
            let out = cluster.kubectl_with_token(token.trim(), &["get", "configmaps", "-n", ns])?;
            Ok(out.status.success().then_some(()))
        },
    )?;
    Ok(())
}
