//! Tier 3: the InferencePipeline CRD on the real API server: every invalid example under
//! `docs/examples/invalid/` is rejected with the message its `# expect:` line names, the valid
//! examples are accepted (server-side dry run), and `kubectl explain` shows the field docs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_e2e::{Cluster, repo_root, wait_until};

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn invalid_examples_are_rejected_by_the_api_server_with_their_cel_message() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-cel").expect("namespace");
    let files = yaml_files(&repo_root().join("docs/examples/invalid"));
    assert!(
        files.len() >= 8,
        "expected the invalid examples, found {}",
        files.len()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read example");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect:' line", file.display()));
        let out = cluster
            .kubectl_stdin(&["apply", "-n", ns.name()], &text)
            .expect("running kubectl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", file.display());
        assert!(
            stderr.contains(expect),
            "{}: rejected, but without the expected message\n  expected: {expect}\n  got: {stderr}",
            file.display()
        );
        // A rule that errors (`index out of bounds`, `no such key`) instead of answering puts
        // CEL internals in front of the user, beside or instead of its message.
        assert!(
            !stderr.contains("evaluating rule"),
            "{}: a CEL rule failed to evaluate instead of answering\n  got: {stderr}",
            file.display()
        );
    }
}

#[test]
fn valid_examples_are_accepted_and_defaults_are_filled_in_by_the_api_server() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-valid").expect("namespace");
    for file in yaml_files(&repo_root().join("docs/examples")) {
        let text = std::fs::read_to_string(&file).expect("read example");
        let out = cluster
            .kubectl_stdin(
                &["apply", "--dry-run=server", "-o", "json", "-n", ns.name()],
                &text,
            )
            .expect("running kubectl");
        assert!(
            out.status.success(),
            "{} rejected: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let obj: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        // Defaults the examples leave out come back from the server.
        assert!(
            obj["spec"]["rollout"]["shadow"]["requests"].is_number(),
            "{}",
            file.display()
        );
        assert!(
            obj["spec"]["inference"]["maxQueueDepth"].is_number(),
            "{}",
            file.display()
        );
    }
}

#[test]
fn a_minimal_pipeline_gets_every_default() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-defaults").expect("namespace");
    let minimal = r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {name: minimal}
spec:
  preprocess:
    text: {tokenizer: "file:///m/tokenizer.json"}
  inference:
    model: {name: m, version: "1", uri: "https://example.invalid/m.safetensors",
            sha256: "0000000000000000000000000000000000000000000000000000000000000000"}
"#;
    let out = cluster
        .kubectl_stdin(
            &["create", "--dry-run=server", "-o", "json", "-n", ns.name()],
            minimal,
        )
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["spec"].clone();
    assert_eq!(
        spec["preprocess"]["replicas"],
        serde_json::json!({"min": 1, "max": 8})
    );
    assert_eq!(spec["preprocess"]["text"]["maxLength"], 256);
    assert_eq!(spec["inference"]["device"], "CUDA");
    assert_eq!(
        spec["inference"]["batching"],
        serde_json::json!({"maxBatchSize": 32, "maxDelay": "2ms"})
    );
    assert_eq!(spec["rollout"]["steps"], serde_json::json!([10, 50, 100]));
    assert_eq!(spec["rollout"]["scaleDownDelay"], "5m");
    assert_eq!(spec["rollout"]["autoRollback"], true);
}

#[test]
fn duration_bounds_are_enforced_by_the_api_server_at_the_edge_and_without_evaluation_errors() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-durations").expect("namespace");
    // (field under spec, value, accepted): at the bound in several spellings, just past it,
    // and past what CEL's duration() can hold without failing to evaluate.
    let cases = [
        ("rollout", "stepDuration", "24h", true),
        ("rollout", "stepDuration", "23h59m60s", true),
        ("rollout", "stepDuration", "86400000ms", true),
        ("rollout", "stepDuration", "86400001ms", false),
        ("rollout", "scaleDownDelay", "25h", false),
        (
            "rollout",
            "progressDeadline",
            "999999999s999999999s999999999s",
            false,
        ),
        (
            "rollout",
            "progressDeadline",
            "9999999999999999999999999999h",
            false,
        ),
        ("inference.batching", "maxDelay", "1s", true),
        ("inference.batching", "maxDelay", "0ms", true),
        ("inference.batching", "maxDelay", "1001ms", false),
        ("inference.batching", "maxDelay", "100000h", false),
    ];
    for (parent, field, value, accepted) in cases {
        let mut spec = serde_json::json!({
            "preprocess": {"text": {"tokenizer": "file:///m/tokenizer.json"}},
            "inference": {"model": {"name": "m", "version": "1",
                "uri": "https://example.invalid/m.safetensors", "sha256": "0".repeat(64)}},
        });
        let mut at = &mut spec;
        for key in parent.split('.') {
            at = &mut at[key];
        }
        at[field] = value.into();
        let obj = serde_json::json!({"apiVersion": "tandem.dev/v1alpha1",
            "kind": "InferencePipeline", "metadata": {"name": "durations"}, "spec": spec});
        let out = cluster
            .kubectl_stdin(
                &["create", "--dry-run=server", "-n", ns.name()],
                &obj.to_string(),
            )
            .expect("running kubectl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), accepted, "{field}: {value}: {stderr}");
        if !accepted {
            let bound = if field == "maxDelay" { "1s" } else { "24h" };
            assert!(
                stderr.contains(&format!("{parent}.{field} must be at most {bound}")),
                "{field}: {value}: {stderr}"
            );
            assert!(
                !stderr.contains("evaluating rule"),
                "{field}: {value}: {stderr}"
            );
        }
    }
}

#[test]
fn scheduling_bounds_and_rules_are_enforced_by_the_api_server_without_evaluation_errors() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    let ns = cluster.namespace("op-scheduling").expect("namespace");
    // The longest label key: a 253-character DNS subdomain, '/', a 63-character name.
    let prefix = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
    let longest = format!("{prefix}/{}", "c".repeat(63));
    assert_eq!(longest.len(), 317);
    let many: serde_json::Map<String, serde_json::Value> = (0..33)
        .map(|i| (format!("label-{i}"), "x".into()))
        .collect();
    let toleration = |t: serde_json::Value| serde_json::json!({"tolerations": [t]});
    // (scheduling, None when accepted or the message it is refused with)
    let cases = [
        (serde_json::json!({}), None),
        (
            serde_json::json!({"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": ""}}),
            None,
        ),
        (
            serde_json::json!({"nodeSelector": {longest.as_str(): "x"}}),
            None,
        ),
        (
            serde_json::json!({"nodeSelector": {format!("a{longest}"): "x"}}),
            Some("scheduling.nodeSelector keys must be label keys"),
        ),
        (
            serde_json::json!({"nodeSelector": {"has space": "x"}}),
            Some("scheduling.nodeSelector keys must be label keys"),
        ),
        (
            serde_json::json!({"nodeSelector": {"zone": "not/a/value"}}),
            Some("should match"),
        ),
        (
            serde_json::json!({"nodeSelector": many}),
            Some("must have at most 32 items"),
        ),
        (toleration(serde_json::json!({"operator": "Exists"})), None),
        (
            toleration(serde_json::json!({"key": "k", "operator": "Exists", "value": ""})),
            None,
        ),
        (
            toleration(
                serde_json::json!({"key": "k", "effect": "NoExecute", "tolerationSeconds": 0}),
            ),
            None,
        ),
        (
            toleration(serde_json::json!({"value": "v"})),
            Some("a toleration without a key must have operator: Exists"),
        ),
        (
            toleration(serde_json::json!({"key": "k", "operator": "Exists", "value": "v"})),
            Some("a toleration with operator: Exists must not set a value"),
        ),
        (
            toleration(serde_json::json!({"key": "k", "tolerationSeconds": 5})),
            Some("tolerationSeconds applies only to effect: NoExecute"),
        ),
        (
            toleration(serde_json::json!({"key": "k", "effect": "NoSchedul"})),
            Some("Unsupported value"),
        ),
        (
            serde_json::json!({"tolerations": vec![serde_json::json!({"operator": "Exists"}); 33]}),
            Some("must have at most 32 items"),
        ),
    ];
    for (scheduling, refused) in cases {
        for stage in ["preprocess", "inference"] {
            let mut spec = serde_json::json!({
                "preprocess": {"text": {"tokenizer": "file:///m/tokenizer.json"}},
                "inference": {"model": {"name": "m", "version": "1",
                    "uri": "https://example.invalid/m.safetensors", "sha256": "0".repeat(64)}},
            });
            spec[stage]["scheduling"] = scheduling.clone();
            let obj = serde_json::json!({"apiVersion": "tandem.dev/v1alpha1",
                "kind": "InferencePipeline", "metadata": {"name": "scheduling"}, "spec": spec});
            let out = cluster
                .kubectl_stdin(
                    &["create", "--dry-run=server", "-o", "json", "-n", ns.name()],
                    &obj.to_string(),
                )
                .expect("running kubectl");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let case = format!("{stage}: {scheduling}");
            match refused {
                None => {
                    assert!(out.status.success(), "{case}: {stderr}");
                    let stored: serde_json::Value =
                        serde_json::from_slice(&out.stdout).expect("json");
                    // Nothing pruned: the schema knows every field.
                    let mut expected = scheduling.clone();
                    for t in expected
                        .get_mut("tolerations")
                        .and_then(serde_json::Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        t.as_object_mut()
                            .expect("object")
                            .entry("operator")
                            .or_insert("Equal".into());
                    }
                    assert_eq!(stored["spec"][stage]["scheduling"], expected, "{case}");
                }
                Some(message) => {
                    assert!(!out.status.success(), "{case}: accepted");
                    assert!(
                        stderr.contains(&format!("spec.{stage}.scheduling"))
                            && stderr.contains(message),
                        "{case}: expected {message:?} in {stderr}"
                    );
                    assert!(!stderr.contains("evaluating rule"), "{case}: {stderr}");
                }
            }
        }
    }
}

#[test]
fn kubectl_explain_shows_the_field_documentation() {
    let cluster = Cluster::connect();
    cluster.ensure_crd().expect("the CRD is served");
    // Discovery can lag a freshly established CRD by a moment.
    let text = wait_until(
        "kubectl explain to know the CRD",
        Duration::from_secs(30),
        || {
            let out = cluster.kubectl(["explain", "ipl.spec.inference.model.sha256"])?;
            Ok(out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        },
    )
    .expect("explain");
    assert!(text.contains("SHA-256 of the weights file"), "{text}");
    let text = cluster
        .kubectl_ok(["explain", "ipl.spec.rollout.steps"])
        .expect("explain");
    // One paragraph per line: not the doc comment's 100-column wrapping (`strictly\n
    // ascending`); kubectl explain wraps it to the terminal itself.
    let description = text
        .split_once("DESCRIPTION:")
        .map_or(text.as_str(), |(_, d)| d);
    let joined = description.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        joined.contains("strictly ascending and ending at 100 (full promotion)"),
        "{text}"
    );
    assert!(
        !description.contains("strictly\n"),
        "the source's line break survived: {text}"
    );
    // kubectl explain prints no `default:`; the description names it.
    let text = cluster
        .kubectl_ok(["explain", "ipl.spec.inference.device"])
        .expect("explain");
    assert!(text.contains("Defaults to `CUDA`."), "{text}");
}

/// docs/examples/networkpolicy/worker-control.yaml, which docs/operations.md tells users to
/// apply (the operator's unit tests check what it selects; the local node agent does not
/// enforce NetworkPolicy, so only its acceptance is checked here).
#[test]
fn the_documented_worker_network_policy_is_accepted_by_the_api_server() {
    let cluster = Cluster::connect();
    let ns = cluster.namespace("op-netpol").expect("namespace");
    let text = std::fs::read_to_string(
        repo_root().join("docs/examples/networkpolicy/worker-control.yaml"),
    )
    .expect("read the policy");
    let out = cluster
        .kubectl_stdin(&["apply", "--dry-run=server", "-n", ns.name()], &text)
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
