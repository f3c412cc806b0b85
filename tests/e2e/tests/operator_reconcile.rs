//! Tier 3: the operator, run as a local process with the admin kubeconfig, against the real
//! API server: examples become exactly the expected objects, a second reconcile changes
//! nothing, spec edits flow through, a deleted Deployment comes back, a retired color is
//! deleted, and deleting the pipeline lets the garbage collector remove everything it owned.
//! Each test uses its own namespace and its own operator (watching only that namespace).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_e2e::{Cluster, Operator, TestNamespace, condition, repo_root, wait_until};

// ---- helpers of this file (shared ones live in tests/e2e/src/lib.rs) ----

fn example(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("docs/examples").join(name)).expect("example")
}

fn get(cluster: &Cluster, ns: &str, what: &str) -> Value {
    cluster
        .get_json(&[what, "-n", ns])
        .unwrap_or_else(|e| panic!("get {what}: {e:#}"))
}

fn names(list: &Value) -> Vec<String> {
    let mut n: Vec<String> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    n.sort();
    n
}

/// Owned objects of one pipeline, by kind, name → resourceVersion.
fn owned_versions(cluster: &Cluster, ns: &str, pipeline: &str) -> BTreeMap<String, String> {
    let selector = format!(
        "app.kubernetes.io/instance={pipeline},app.kubernetes.io/managed-by=tandem-operator"
    );
    let list = cluster
        .get_json(&[
            "deployments,services,configmaps,serviceaccounts,poddisruptionbudgets",
            "-n",
            ns,
            "-l",
            &selector,
        ])
        .expect("list owned");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                format!(
                    "{}/{}",
                    i["kind"].as_str().unwrap_or(""),
                    i["metadata"]["name"].as_str().unwrap_or("")
                ),
                i["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect()
}

fn wait_for_status(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    op: &Operator,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, Duration::from_secs(60), || {
        let p = cluster.get_json(&["ipl", name, "-n", ns])?;
        Ok(pred(&p).then_some(p))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()))
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn deployment(cluster: &Cluster, ns: &str, name: &str) -> Value {
    cluster
        .get_json(&["deployment", name, "-n", ns])
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A pipeline no node can run (absurd CPU request, and a GPU): its pods stay Pending, so
/// nothing but the operator changes its objects.
const UNSCHEDULABLE: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {name: parked}
spec:
  preprocess:
    text: {tokenizer: "file:///var/lib/tandem/models/minilm/tokenizer.json"}
    replicas: {min: 1, max: 4}
    resources: {requests: {cpu: "1000", memory: 64Mi}}
  inference:
    model: {name: minilm, version: "1", uri: "file:///var/lib/tandem/models/minilm/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}
    device: CUDA
    replicas: {min: 1, max: 4}
    resources: {requests: {cpu: "1000", memory: 64Mi}}
"#;

/// A namespace of its own (deleted when dropped), an operator watching only it, and
/// `manifest` applied there.
fn pipeline_in_own_namespace(
    cluster: &Cluster,
    prefix: &str,
    manifest: &str,
) -> (TestNamespace, Operator) {
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace(prefix).expect("namespace");
    let op = Operator::start(cluster, ns.name(), "a");
    cluster
        .kubectl_stdin(&["apply", "-n", ns.name()], manifest)
        .expect("apply");
    (ns, op)
}

// ---- tests ----

#[test]
fn each_example_becomes_exactly_the_expected_objects_with_the_expected_fields() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-objects").expect("namespace");
    let ns = ns.name();
    let op = Operator::start(&cluster, ns, "a");
    for file in [
        "minilm-text-embedding.yaml",
        "efficientnet-image-classification.yaml",
    ] {
        let out = cluster
            .kubectl_stdin(&["apply", "-n", ns], &example(file))
            .expect("kubectl");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let expected_deployments = [
        "efficientnet-inference-blue",
        "efficientnet-preprocess",
        "minilm-inference-blue",
        "minilm-preprocess",
    ];
    wait_until(
        "both pipelines' Deployments",
        Duration::from_secs(60),
        || Ok((names(&get(&cluster, ns, "deployments")) == expected_deployments).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));

    // Exactly the expected objects.
    assert_eq!(
        names(&get(&cluster, ns, "poddisruptionbudgets")),
        expected_deployments
    );
    assert_eq!(
        names(&get(&cluster, ns, "services")),
        ["efficientnet", "minilm"]
    );
    let cms = names(&get(&cluster, ns, "configmaps"));
    assert_eq!(
        cms.iter()
            .filter(|n| *n != "kube-root-ca.crt")
            .collect::<Vec<_>>(),
        ["efficientnet-config", "minilm-config"]
    );
    let sas = names(&get(&cluster, ns, "serviceaccounts"));
    assert_eq!(sas, ["default", "efficientnet-worker", "minilm-worker"]);

    // Labels and owner references on everything owned.
    let uid =
        cluster.get_json(&["ipl", "minilm", "-n", ns]).expect("ipl")["metadata"]["uid"].clone();
    let owned = cluster
        .get_json(&[
            "deployments,services,configmaps,serviceaccounts,poddisruptionbudgets",
            "-n",
            ns,
            "-l",
            "app.kubernetes.io/instance=minilm",
        ])
        .expect("list");
    let owned = owned["items"].as_array().expect("items");
    assert_eq!(
        owned.len(),
        7,
        "SA, ConfigMap, Service, 2 Deployments, 2 PDBs"
    );
    for o in owned {
        let l = &o["metadata"]["labels"];
        assert_eq!(l["app.kubernetes.io/name"], "tandem-worker");
        assert_eq!(l["app.kubernetes.io/managed-by"], "tandem-operator");
        let owners = o["metadata"]["ownerReferences"]
            .as_array()
            .expect("owner refs");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0]["kind"], "InferencePipeline");
        assert_eq!(owners[0]["uid"], uid);
        assert_eq!(owners[0]["controller"], true);
    }

    // Fields that matter.
    let sa = cluster
        .get_json(&["serviceaccount", "minilm-worker", "-n", ns])
        .expect("sa");
    assert_eq!(sa["automountServiceAccountToken"], false);
    let svc = cluster
        .get_json(&["service", "minilm", "-n", ns])
        .expect("svc");
    let ports: Vec<(String, i64)> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                p["port"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("grpc".to_owned(), 8001), ("http".to_owned(), 8000)]
    );
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/component"],
        "preprocess"
    );
    let cm = cluster
        .get_json(&["configmap", "minilm-config", "-n", ns])
        .expect("cm");
    let yaml = cm["data"]["pipeline.yaml"].as_str().expect("pipeline.yaml");
    assert!(
        yaml.starts_with("pipeline: minilm\n") && yaml.contains("kind: Embedding"),
        "{yaml}"
    );

    let pre = deployment(&cluster, ns, "minilm-preprocess");
    let c = container(&pre);
    assert_eq!(
        c["args"],
        json!(["preprocess", "--config", "/etc/tandem/pipeline.yaml"])
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/v2/health/ready");
    let pod = &pre["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["serviceAccountName"], "minilm-worker");

    let minilm_inf = deployment(&cluster, ns, "minilm-inference-blue");
    assert_eq!(minilm_inf["metadata"]["labels"]["tandem.dev/color"], "blue");
    let args = container(&minilm_inf)["args"]
        .as_array()
        .expect("args")
        .clone();
    assert!(
        args.windows(2).any(|w| w[0] == "--device" && w[1] == "cpu"),
        "{args:?}"
    );
    assert!(
        container(&minilm_inf)["resources"]["limits"]
            .get("nvidia.com/gpu")
            .is_none()
    );
    let effnet_inf = deployment(&cluster, ns, "efficientnet-inference-blue");
    assert_eq!(
        container(&effnet_inf)["resources"]["limits"]["nvidia.com/gpu"],
        "1"
    );
    assert_eq!(
        container(&effnet_inf)["resources"]["requests"]["nvidia.com/gpu"],
        "1"
    );

    // Status: observedGeneration, conditions, summary, printer columns.
    let p = wait_for_status(&cluster, ns, "minilm", &op, "minilm status", |p| {
        p["status"]["observedGeneration"] == p["metadata"]["generation"]
            && p["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.len() == 3)
    });
    assert_eq!(p["status"]["activeColor"], "blue");
    assert_eq!(p["status"]["summary"]["model"], "minilm:1");
    for t in ["Ready", "Progressing", "Degraded"] {
        let c = condition(&p, t);
        assert!(
            c["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{t}: {c}"
        );
        assert!(
            c["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{t}: {c}"
        );
    }
    let table = cluster
        .kubectl_ok(["get", "ipl", "-n", ns])
        .expect("kubectl get ipl");
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "MODEL",
        "ACTIVE",
        "TRAFFIC",
        "PREPROCESS",
        "INFERENCE",
        "QUEUE",
        "PHASE",
        "AGE",
    ] {
        assert!(header.contains(col), "missing column {col}: {header}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("minilm "))
        .unwrap_or_default();
    assert!(
        row.contains("minilm:1") && row.contains("blue 100%"),
        "{table}"
    );
}

#[test]
fn a_second_reconcile_changes_nothing_and_spec_edits_flow_through() {
    let cluster = Cluster::connect();
    let (ns, op) = pipeline_in_own_namespace(&cluster, "op-idem", UNSCHEDULABLE);
    let ns = ns.name();

    // The status says why nothing runs.
    let p = wait_for_status(
        &cluster,
        ns,
        "parked",
        &op,
        "Ready and Degraded conditions naming the scheduler's reason for inference",
        |p| {
            // Both stages are unschedulable; the inference pod may appear a moment after the
            // preprocess one, so wait until the inference stage's reason is known too.
            let ready = condition(p, "Ready")["message"]
                .as_str()
                .unwrap_or_default();
            ready.starts_with("0/1 inference pods ready: ")
                && ready.contains("Insufficient")
                && condition(p, "Degraded")["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("Insufficient"))
        },
    );
    assert_eq!(condition(&p, "Degraded")["status"], "True");
    assert_eq!(condition(&p, "Degraded")["reason"], "PodsUnschedulable");
    assert_eq!(p["status"]["phase"], "Degraded");
    let message = condition(&p, "Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("0/1 inference pods ready: ") && message.contains("Insufficient"),
        "{message}"
    );

    // Let things settle, then restart the operator: it reconciles everything again.
    std::thread::sleep(Duration::from_secs(3));
    let before = owned_versions(&cluster, ns, "parked");
    let ipl_before =
        cluster.get_json(&["ipl", "parked", "-n", ns]).expect("ipl")["metadata"]["resourceVersion"]
            .clone();
    assert_eq!(before.len(), 7, "{before:?}");
    op.terminate();
    let op = Operator::start(&cluster, ns, "b");
    wait_until(
        "the new operator to reconcile",
        Duration::from_secs(60),
        || Ok((op.successes() >= 1).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        owned_versions(&cluster, ns, "parked"),
        before,
        "a second reconcile changed owned objects\n{}",
        op.log_tail()
    );
    let ipl_after =
        cluster.get_json(&["ipl", "parked", "-n", ns]).expect("ipl")["metadata"]["resourceVersion"]
            .clone();
    assert_eq!(ipl_after, ipl_before, "a second reconcile rewrote status");

    // Spec edits: replica bounds, resources and a worker-config field.
    cluster
        .kubectl_ok([
            "patch", "ipl", "parked", "-n", ns, "--type=merge", "-p",
            r#"{"spec":{"inference":{"replicas":{"min":2,"max":3}},
                "preprocess":{"maxQueueDepth":77,"resources":{"requests":{"cpu":"999","memory":"96Mi"}}}}}"#,
        ])
        .expect("patch");
    wait_until(
        "the Deployments and ConfigMap to follow the spec",
        Duration::from_secs(60),
        || {
            let inf = deployment(&cluster, ns, "parked-inference-blue");
            let pre = deployment(&cluster, ns, "parked-preprocess");
            let cm = cluster.get_json(&["configmap", "parked-config", "-n", ns])?;
            Ok((inf["spec"]["replicas"] == 2
                && container(&pre)["resources"]["requests"]["cpu"] == "999"
                && container(&pre)["resources"]["requests"]["memory"] == "96Mi"
                && cm["data"]["pipeline.yaml"]
                    .as_str()
                    .is_some_and(|y| y.contains("maxQueueDepth: 77")))
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    let p = wait_for_status(
        &cluster,
        ns,
        "parked",
        &op,
        "status for the new generation",
        |p| p["status"]["observedGeneration"] == p["metadata"]["generation"],
    );
    assert_eq!(p["status"]["inference"]["desiredReplicas"], 2);
}

/// Preprocess pods that ask for a node label no node carries (and nothing else a node lacks),
/// beside an inference stage that tolerates taints and starts at zero pods, so that its own pods
/// cannot take the Degraded condition.
const PLACED: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {name: placed}
spec:
  preprocess:
    text: {tokenizer: "file:///var/lib/tandem/models/minilm/tokenizer.json"}
    replicas: {min: 1, max: 1}
    resources: {requests: {cpu: 10m, memory: 64Mi}}
    scheduling:
      nodeSelector: {e2e.tandem.dev/no-node-has-this: "true"}
  inference:
    model: {name: minilm, version: "1", uri: "file:///var/lib/tandem/models/minilm/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}
    device: CUDA
    replicas: {min: 0, max: 1}
    scheduling:
      tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      - {key: e2e.tandem.dev/maintenance, value: soon, effect: NoExecute, tolerationSeconds: 30}
"#;

#[test]
fn a_stage_s_scheduling_reaches_only_its_pods_and_an_unmatched_node_selector_is_named_in_degraded()
{
    let cluster = Cluster::connect();
    let (ns, op) = pipeline_in_own_namespace(&cluster, "op-scheduling", PLACED);
    let ns = ns.name();
    let p = wait_for_status(
        &cluster,
        ns,
        "placed",
        &op,
        "Degraded=True PodsUnschedulable naming the node selector",
        |p| {
            condition(p, "Degraded")["reason"] == "PodsUnschedulable"
                && condition(p, "Degraded")["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("node affinity/selector"))
        },
    );
    let message = condition(&p, "Degraded")["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("0/1 preprocess pods ready: ")
            && message.contains("didn't match Pod's node affinity/selector"),
        "{message}"
    );

    // Each Deployment carries its own stage's fields, as the API server stored the pipeline
    // (`operator: Equal` is the CRD's default).
    let pre = deployment(&cluster, ns, "placed-preprocess");
    let inf = deployment(&cluster, ns, "placed-inference-blue");
    let (pre_pod, inf_pod) = (
        &pre["spec"]["template"]["spec"],
        &inf["spec"]["template"]["spec"],
    );
    assert_eq!(
        pre_pod["nodeSelector"],
        json!({"e2e.tandem.dev/no-node-has-this": "true"})
    );
    assert!(pre_pod.get("tolerations").is_none(), "{pre_pod}");
    assert_eq!(
        inf_pod["tolerations"],
        json!([
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "e2e.tandem.dev/maintenance", "operator": "Equal", "value": "soon",
             "effect": "NoExecute", "tolerationSeconds": 30},
        ])
    );
    assert!(inf_pod.get("nodeSelector").is_none(), "{inf_pod}");
    assert_eq!(inf["spec"]["replicas"], 0);

    // Without the selector the template drops it, and the new template's pod is placed.
    cluster
        .kubectl_ok([
            "patch",
            "ipl",
            "placed",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"preprocess":{"scheduling":{"nodeSelector":null}}}}"#,
        ])
        .expect("patch");
    wait_until(
        "the preprocess pod template without a node selector",
        Duration::from_secs(60),
        || {
            let pre = deployment(&cluster, ns, "placed-preprocess");
            let pod = &pre["spec"]["template"]["spec"];
            Ok(
                (pod.get("nodeSelector").is_none() && pod.get("tolerations").is_none())
                    .then_some(()),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    wait_until(
        "a preprocess pod without the selector to be scheduled",
        Duration::from_secs(60),
        || {
            let pods = cluster.get_json(&[
                "pods",
                "-n",
                ns,
                "-l",
                "app.kubernetes.io/instance=placed,app.kubernetes.io/component=preprocess",
            ])?;
            Ok(pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|pod| {
                    pod["spec"].get("nodeSelector").is_none()
                        && pod["spec"]["nodeName"]
                            .as_str()
                            .is_some_and(|n| !n.is_empty())
                })
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
}

#[test]
fn an_object_the_api_server_refuses_degrades_the_pipeline_with_its_message_until_fixed() {
    // The CRD cannot see that a request exceeds its limit; the API server refuses the
    // preprocess Deployment.
    let refused = UNSCHEDULABLE.replace(
        "resources: {requests: {cpu: \"1000\", memory: 64Mi}}\n  inference:",
        "resources: {requests: {cpu: \"1000\", memory: 2Gi}, limits: {memory: 1Gi}}\n  inference:",
    );
    assert_ne!(refused, UNSCHEDULABLE);
    let cluster = Cluster::connect();
    let (ns, op) = pipeline_in_own_namespace(&cluster, "op-refused", &refused);
    let ns = ns.name();
    let p = wait_for_status(
        &cluster,
        ns,
        "parked",
        &op,
        "Degraded=True ApplyRejected",
        |p| condition(p, "Degraded")["reason"] == "ApplyRejected",
    );
    let message = condition(&p, "Degraded")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("the API server refused to apply Deployment parked-preprocess: ")
            && message.contains("must be less than or equal to memory limit"),
        "{message}"
    );
    assert_eq!(condition(&p, "Degraded")["status"], "True");
    assert_eq!(condition(&p, "Progressing")["reason"], "ApplyRejected");
    assert_eq!(p["status"]["phase"], "Degraded");
    assert_eq!(
        p["status"]["observedGeneration"],
        p["metadata"]["generation"]
    );
    cluster
        .wait_event(ns, "ApplyRejected", "Warning", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));

    // Fixed, the objects are applied and the status moves on to the real state.
    cluster
        .kubectl_ok([
            "patch",
            "ipl",
            "parked",
            "-n",
            ns,
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/preprocess/resources/limits"}]"#,
        ])
        .expect("patch");
    let p = wait_for_status(
        &cluster,
        ns,
        "parked",
        &op,
        "the scheduler's reason instead of the refusal",
        |p| condition(p, "Degraded")["reason"] == "PodsUnschedulable",
    );
    assert_ne!(condition(&p, "Progressing")["reason"], "ApplyRejected");
    assert_eq!(
        names(&get(&cluster, ns, "deployments")),
        ["parked-inference-blue", "parked-preprocess"]
    );
}

#[test]
fn an_existing_object_under_a_pipelines_name_is_left_alone_and_named_until_it_is_gone() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-name-in-use").expect("namespace");
    let ns = ns.name();
    // Someone else's ConfigMap under the name the pipeline's worker config takes. Its keys
    // differ from the operator's, so a server-side apply would not even conflict: before, the
    // operator added its key, labels and owner reference, and deleting the pipeline deleted it.
    cluster
        .kubectl_ok([
            "create",
            "configmap",
            "parked-config",
            "-n",
            ns,
            "--from-literal=owner=platform-team",
        ])
        .expect("create the ConfigMap");
    let before = cluster
        .get_json(&["configmap", "parked-config", "-n", ns])
        .expect("read it");
    let op = Operator::start(&cluster, ns, "a");
    cluster
        .kubectl_stdin(&["apply", "-n", ns], UNSCHEDULABLE)
        .expect("apply");
    let p = wait_for_status(
        &cluster,
        ns,
        "parked",
        &op,
        "Degraded=True NameInUse",
        |p| condition(p, "Degraded")["reason"] == "NameInUse",
    );
    assert_eq!(condition(&p, "Degraded")["status"], "True");
    assert_eq!(p["status"]["phase"], "Degraded");
    assert_eq!(
        condition(&p, "Degraded")["message"],
        "ConfigMap parked-config already exists and does not belong to this pipeline (it has no \
         controlling owner and was written by kubectl-create); the operator will not take it over"
    );
    cluster
        .wait_event(ns, "NameInUse", "Warning", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    // Nothing of the pipeline was applied, and the ConfigMap is as it was.
    assert!(names(&get(&cluster, ns, "deployments")).is_empty());
    assert!(names(&get(&cluster, ns, "services")).is_empty());
    assert_eq!(names(&get(&cluster, ns, "serviceaccounts")), ["default"]);
    let after = cluster
        .get_json(&["configmap", "parked-config", "-n", ns])
        .expect("read it");
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert_eq!(after["data"], json!({"owner": "platform-team"}));
    assert!(after["metadata"]["ownerReferences"].is_null(), "{after}");

    // Once it is gone, the next try (with backoff) creates the pipeline's own.
    cluster
        .kubectl_ok(["delete", "configmap", "parked-config", "-n", ns])
        .expect("delete the ConfigMap");
    let uid = p["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let owned_by_pipeline = |what: &str, name: &str| -> anyhow::Result<bool> {
        let out = cluster.kubectl([
            "get",
            what,
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.ownerReferences[0].uid}",
        ])?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout) == uid.as_str())
    };
    wait_until(
        "the pipeline's own ConfigMap and Deployments",
        Duration::from_secs(120),
        || {
            Ok((owned_by_pipeline("configmap", "parked-config")?
                && owned_by_pipeline("deployment", "parked-preprocess")?)
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    wait_for_status(&cluster, ns, "parked", &op, "NameInUse cleared", |p| {
        condition(p, "Degraded")["reason"] != "NameInUse"
    });

    // Deleted and created again under the same name: the earlier pipeline's objects are
    // refused until the garbage collector removes them, then the new one's are created.
    cluster
        .kubectl_ok(["delete", "ipl", "parked", "-n", ns])
        .expect("delete the pipeline");
    cluster
        .kubectl_stdin(&["apply", "-n", ns], UNSCHEDULABLE)
        .expect("apply again");
    let again = cluster
        .get_json(&["ipl", "parked", "-n", ns])
        .expect("the new pipeline");
    let new_uid = again["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(new_uid, uid);
    wait_until(
        "every object owned by the new pipeline",
        Duration::from_secs(120),
        || {
            let list = cluster.get_json(&[
                "deployments,services,configmaps,serviceaccounts,poddisruptionbudgets",
                "-n",
                ns,
                "-l",
                "app.kubernetes.io/instance=parked",
            ])?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            Ok((items.len() == 7
                && items
                    .iter()
                    .all(|i| i["metadata"]["ownerReferences"][0]["uid"] == new_uid.as_str()))
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
}

/// Runnable pods whose inference worker cannot load its model: the file does not exist.
const MISSING_MODEL: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {name: broken}
spec:
  preprocess:
    text: {tokenizer: "file:///nonexistent/tokenizer.json"}
    replicas: {min: 1, max: 1}
    resources: {requests: {cpu: 10m, memory: 64Mi}}
  inference:
    model: {name: minilm, version: "1", uri: "file:///nonexistent/minilm/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}
    device: CPU
    replicas: {min: 1, max: 1}
    resources: {requests: {cpu: 10m, memory: 64Mi}}
"#;

/// What the reconciler's first apply of an object its claim found absent relies on
/// (`CREATE_ONLY` in operator/src/controller.rs, `resourceVersion: "1"`): on this API server a
/// server-side apply with that resourceVersion creates an absent object, and refuses with a
/// conflict, even with `force`, to touch one someone created since, so the race between the
/// claim's read and the apply cannot hand the operator a foreign object.
#[test]
fn a_create_only_apply_creates_an_absent_object_and_conflicts_with_one_created_since_the_claim() {
    let cluster = Cluster::connect();
    let ns = cluster.namespace("op-create-only").expect("namespace");
    let ns = ns.name();
    let manifest = |name: &str| {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
            "data": {"config.json": "{}"},
        })
        .to_string()
    };
    let apply = |name: &str| {
        cluster
            .kubectl_stdin(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager=tandem-operator",
                ],
                &manifest(name),
            )
            .expect("running kubectl")
    };

    let created = apply("absent-config");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let cm = cluster
        .get_json(&["configmap", "absent-config", "-n", ns])
        .expect("created");
    assert_eq!(cm["data"]["config.json"], "{}");

    cluster
        .kubectl_ok([
            "create",
            "configmap",
            "raced-config",
            "-n",
            ns,
            "--from-literal=owner=platform-team",
        ])
        .expect("someone else's ConfigMap");
    let raced = apply("raced-config");
    assert!(!raced.status.success(), "the apply took the object over");
    let err = String::from_utf8_lossy(&raced.stderr);
    assert!(
        err.contains("the object has been modified"),
        "not a conflict: {err}"
    );
    let cm = cluster
        .get_json(&["configmap", "raced-config", "-n", ns])
        .expect("still there");
    assert_eq!(cm["data"], serde_json::json!({"owner": "platform-team"}));
    assert!(
        cm["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|f| f["manager"] != "tandem-operator"),
        "{cm}"
    );
}

#[test]
fn a_crashing_stage_is_degraded_with_the_reason_its_worker_gave() {
    let cluster = Cluster::connect();
    let (ns, op) = pipeline_in_own_namespace(&cluster, "op-crash", MISSING_MODEL);
    let ns = ns.name();
    // The worker writes why it failed to its termination log; the pod status carries it and
    // the pipeline's Degraded condition quotes it, also while the container runs again.
    let p = wait_for_status(
        &cluster,
        ns,
        "broken",
        &op,
        "Degraded=True PodsFailing quoting the missing model file",
        |p| {
            condition(p, "Degraded")["reason"] == "PodsFailing"
                && condition(p, "Degraded")["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("/nonexistent/"))
        },
    );
    let message = condition(&p, "Degraded")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("exited with code 1: ") && message.contains("/nonexistent/"),
        "{message}"
    );
    assert!(
        !message.contains("{\""),
        "the worker's own message, not a JSON log line: {message}"
    );
    assert_eq!(p["status"]["phase"], "Degraded");
}

#[test]
fn a_deleted_deployment_is_recreated_a_retired_color_is_removed_and_gc_cleans_up() {
    let cluster = Cluster::connect();
    let (ns, op) = pipeline_in_own_namespace(&cluster, "op-gc", UNSCHEDULABLE);
    let ns = ns.name();
    let first = wait_until("the preprocess Deployment", Duration::from_secs(60), || {
        let out = cluster.kubectl([
            "get",
            "deployment",
            "parked-preprocess",
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            .filter(|u| !u.is_empty()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));

    // Deleted by hand → recreated.
    cluster
        .kubectl_ok([
            "delete",
            "deployment",
            "parked-preprocess",
            "-n",
            ns,
            "--wait=false",
        ])
        .expect("delete");
    wait_until(
        "the Deployment to be recreated",
        Duration::from_secs(60),
        || {
            let out = cluster.kubectl([
                "get",
                "deployment",
                "parked-preprocess",
                "-n",
                ns,
                "-o",
                "jsonpath={.metadata.uid}",
            ])?;
            let uid = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok((out.status.success() && !uid.is_empty() && uid != first).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));

    // The supporting objects are not re-applied while unchanged, yet someone else's edit or
    // deletion of one is still undone: the watch drops the reconciler's record of it.
    let config = || {
        cluster.kubectl_ok([
            "get",
            "configmap",
            "parked-config",
            "-n",
            ns,
            "-o",
            "jsonpath={.data.pipeline\\.yaml}",
        ])
    };
    let original = config().expect("configmap");
    assert!(
        original.contains("preprocess"),
        "unexpected config: {original}"
    );
    cluster
        .kubectl_ok([
            "patch",
            "configmap",
            "parked-config",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"data":{"pipeline.yaml":"tampered"}}"#,
        ])
        .expect("patch configmap");
    cluster
        .kubectl_ok(["delete", "service", "parked", "-n", ns, "--wait=false"])
        .expect("delete service");
    wait_until(
        "the ConfigMap to be restored and the Service recreated",
        Duration::from_secs(60),
        || {
            let data = config()?;
            let svc = cluster.kubectl(["get", "service", "parked", "-n", ns])?;
            Ok((data == original && svc.status.success()).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));

    // A second color recorded in status gets its Deployment; clearing it retires the color.
    // (Here: a promotion's previous color, kept for scaleDownDelay, 5 min by default, from
    // now. The rollout machine itself is exercised by tests/rollout.rs.)
    wait_for_status(&cluster, ns, "parked", &op, "first status", |p| {
        p["status"]["activeColor"] == "blue"
    });
    let now = String::from_utf8_lossy(
        &std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .expect("date")
            .stdout,
    )
    .trim()
    .to_owned();
    let candidate = format!(
        r#"{{"status":{{"rollout":{{"phase":"Promoted","previousColor":"green","stepStartedAt":"{now}",
        "previousModel":{{"name":"minilm","version":"2","uri":"file:///m/model.safetensors",
        "sha256":"53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}}}}}}}}"#
    );
    let candidate = candidate.as_str();
    cluster
        .kubectl_ok([
            "patch",
            "ipl",
            "parked",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            candidate,
        ])
        .expect("patch status");
    wait_until("the green Deployment", Duration::from_secs(60), || {
        Ok(cluster
            .kubectl(["get", "deployment", "parked-inference-green", "-n", ns])?
            .status
            .success()
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    let green = deployment(&cluster, ns, "parked-inference-green");
    let args = container(&green)["args"].as_array().expect("args").clone();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--model-version" && w[1] == "2"),
        "{args:?}"
    );
    cluster
        .kubectl_ok([
            "patch",
            "ipl",
            "parked",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"rollout":null}}"#,
        ])
        .expect("patch status");
    wait_until(
        "the retired green Deployment and PDB to go",
        Duration::from_secs(60),
        || {
            let d = cluster.kubectl(["get", "deployment", "parked-inference-green", "-n", ns])?;
            let p = cluster.kubectl(["get", "pdb", "parked-inference-green", "-n", ns])?;
            Ok((!d.status.success() && !p.status.success()).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));
    assert!(
        cluster
            .kubectl(["get", "deployment", "parked-inference-blue", "-n", ns])
            .expect("kubectl")
            .status
            .success()
    );

    // Deleting the pipeline: the garbage collector removes everything it owned.
    cluster
        .kubectl_ok(["delete", "ipl", "parked", "-n", ns])
        .expect("delete ipl");
    wait_until(
        "the garbage collector to remove every owned object",
        Duration::from_secs(90),
        || {
            Ok(owned_versions(&cluster, ns, "parked")
                .is_empty()
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nleft: {:?}", owned_versions(&cluster, ns, "parked")));
}

#[test]
fn two_operators_elect_one_leader_and_the_other_takes_over_when_it_dies() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-leader").expect("namespace");
    let ns = ns.name();
    let a = Operator::start(&cluster, ns, "a");
    wait_until("a to lead", Duration::from_secs(30), || {
        Ok(a.is_leader().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", a.log_tail()));
    let b = Operator::start(&cluster, ns, "b");
    // b stands by: the Lease stays with a for several renewal periods.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            a.is_leader() && !b.is_leader(),
            "exactly one leader expected\n{}\n{}",
            a.log_tail(),
            b.log_tail()
        );
    }
    let holder = cluster
        .kubectl_ok([
            "get",
            "lease",
            "tandem-operator",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .expect("lease");
    assert_eq!(holder, "a");

    // Kill the leader hard (no lease release): b takes over once the Lease expires.
    a.kill();
    wait_until("b to take over", Duration::from_secs(30), || {
        Ok(b.is_leader().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", b.log_tail()));
    let holder = cluster
        .kubectl_ok([
            "get",
            "lease",
            "tandem-operator",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .expect("lease");
    assert_eq!(holder, "b");

    // ...and reconciles.
    cluster
        .kubectl_stdin(&["apply", "-n", ns], UNSCHEDULABLE)
        .expect("apply");
    wait_until(
        "b to create the pipeline's Deployments",
        Duration::from_secs(60),
        || {
            Ok((names(&get(&cluster, ns, "deployments"))
                == ["parked-inference-blue", "parked-preprocess"])
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", b.log_tail()));
}

#[test]
fn one_operator_watching_two_namespaces_reconciles_both_and_leaves_a_third_alone() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let first = cluster.namespace("op-multi-a").expect("namespace");
    let second = cluster.namespace("op-multi-b").expect("namespace");
    let unwatched = cluster.namespace("op-multi-c").expect("namespace");
    let (a, b, c) = (first.name(), second.name(), unwatched.name());
    let op = Operator::start_with(&cluster, a, "multi", &["--namespace".into(), b.into()]);
    wait_until(
        "the operator to lead with both namespaces' caches synced (/readyz)",
        Duration::from_secs(30),
        || Ok((op.is_leader() && op.is_ready()).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()));

    // The unwatched namespace first: by the time both watched pipelines are reconciled, a
    // watched third one would have been too.
    for ns in [c, a, b] {
        cluster
            .kubectl_stdin(&["apply", "-n", ns], UNSCHEDULABLE)
            .expect("apply");
    }
    for ns in [a, b] {
        let p = wait_for_status(
            &cluster,
            ns,
            "parked",
            &op,
            &format!("the pipeline in {ns} to get a status"),
            |p| p["status"]["observedGeneration"].as_i64() == Some(1),
        );
        assert_eq!(
            names(&get(&cluster, ns, "deployments")),
            ["parked-inference-blue", "parked-preprocess"],
            "objects in watched namespace {ns}; status: {}",
            p["status"]
        );
    }
    // One more debounce period and reconcile for good measure.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        names(&get(&cluster, c, "deployments")).is_empty(),
        "the operator created objects in unwatched namespace {c}"
    );
    let parked = cluster
        .get_json(&["ipl", "parked", "-n", c])
        .expect("the unwatched pipeline");
    assert!(
        parked["status"].is_null(),
        "the operator wrote status in unwatched namespace {c}: {}",
        parked["status"]
    );
}
