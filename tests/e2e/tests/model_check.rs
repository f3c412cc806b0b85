//! Tier 4: a pipeline whose preprocess settings do not fit its model, with real workers and
//! the real EfficientNet-Lite0 on the local cluster. Every pod is ready, yet every request
//! would fail: the preprocess pod finds it in the model's metadata, the operator's autoscaler
//! writes it to status, and the pipeline is Degraded (reason `ModelMismatch`) and not Ready,
//! with a Warning Event, until the spec is fixed, after which it is Ready again.

use std::time::Duration;

use serde_json::Value;
use tandem_e2e::{Cluster, Operator, WorkerTest, condition, wait_until};

const PIPELINE: &str = "misfit";

fn manifest(ns: &str, side: u32, base: &str, sha: &str) -> String {
    format!(
        r#"
apiVersion: tandem.dev/v1alpha1
kind: InferencePipeline
metadata: {{name: {PIPELINE}, namespace: {ns}}}
spec:
  preprocess:
    image:
      resize: {{width: {side}, height: {side}}}
    replicas: {{min: 1, max: 1}}
    resources: {{requests: {{cpu: 10m, memory: 64Mi}}}}
  inference:
    model:
      name: efficientnet-lite0
      version: "1"
      uri: "{base}/efficientnet-lite0/model.safetensors"
      sha256: {sha}
    device: CPU
    replicas: {{min: 1, max: 1}}
    resources: {{requests: {{cpu: 10m, memory: 64Mi}}}}
"#
    )
}

/// The pipeline, once `done` holds for it.
fn wait_for(
    cluster: &Cluster,
    ns: &str,
    op: &Operator,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, Duration::from_secs(180), || {
        let p = cluster.get_json(&["ipl", PIPELINE, "-n", ns])?;
        Ok(done(&p).then_some(p))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log_tail()))
}

#[test]
fn a_model_that_does_not_take_what_preprocess_sends_degrades_the_pipeline_until_the_spec_fits()
-> anyhow::Result<()> {
    // The namespace is deleted (with everything in it) when `t` drops.
    let t = WorkerTest::start("model-check")?;
    let (cluster, ns) = (&t.cluster, t.namespace.name().to_owned());
    let (base, sha) = (&t.models.base, &t.models.efficientnet_sha256);
    let op = Operator::start(cluster, &ns, "model-check-e2e");

    // EfficientNet-Lite0 takes 224×224; this pipeline sends 320×320.
    cluster.apply(&manifest(&ns, 320, base, sha))?;
    let expected = "efficientnet-lite0:1 on blue does not take what preprocess sends, so every \
                    request fails: input \"input\": sent as [N, 3, 320, 320], the model takes \
                    [-1, 3, 224, 224]";
    let p = wait_for(cluster, &ns, &op, "Degraded=True ModelMismatch", |p| {
        condition(p, "Degraded")["reason"] == "ModelMismatch"
    });
    assert_eq!(condition(&p, "Degraded")["status"], "True");
    assert_eq!(condition(&p, "Degraded")["message"], expected);
    assert_eq!(condition(&p, "Ready")["status"], "False");
    assert_eq!(condition(&p, "Ready")["reason"], "ModelMismatch");
    assert_eq!(p["status"]["phase"], "Degraded");
    assert_eq!(
        p["status"]["preprocess"]["modelMismatch"],
        "input \"input\": sent as [N, 3, 320, 320], the model takes [-1, 3, 224, 224]"
    );
    // All of it while every pod is ready: nothing else would have said so.
    assert_eq!(p["status"]["summary"]["preprocess"], "1/1");
    assert_eq!(p["status"]["summary"]["inference"], "1/1");

    let events = cluster.get_json(&["events.events.k8s.io", "-n", &ns])?;
    let warned = events["items"].as_array().into_iter().flatten().any(|e| {
        e["reason"] == "ModelMismatch"
            && e["type"] == "Warning"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("[N, 3, 320, 320]"))
    });
    assert!(warned, "a Warning Event ModelMismatch: {events:#}");

    // Fixed: the new preprocess pods find that the model fits; the field is cleared.
    cluster.apply(&manifest(&ns, 224, base, sha))?;
    let p = wait_for(cluster, &ns, &op, "Ready=True after the fix", |p| {
        condition(p, "Ready")["status"] == "True"
    });
    assert_eq!(condition(&p, "Degraded")["status"], "False");
    assert_eq!(p["status"]["preprocess"]["modelMismatch"], Value::Null);
    assert_eq!(p["status"]["phase"], "Ready");
    Ok(())
}
