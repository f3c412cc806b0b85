//! The committed CRD YAML (and the chart's copy) equal what the Rust types generate, and the
//! examples under `docs/examples/` parse and validate as their names promise.

use std::path::{Path, PathBuf};

use tandem_operator::crd::{InferencePipeline, crd_yaml};
use tandem_operator::reference::crd_reference;
use tandem_operator::validate::validate;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const REGENERATE: &str = "regenerate with: cargo run -p tandem-operator -- crd > crds/inferencepipelines.tandem.dev.yaml";

#[test]
fn the_committed_crd_equals_the_generated_one() {
    let generated = crd_yaml().unwrap();
    let committed = read(&repo_root().join("crds/inferencepipelines.tandem.dev.yaml"));
    assert!(
        committed == generated,
        "crds/inferencepipelines.tandem.dev.yaml is stale; {REGENERATE}"
    );
}

#[test]
fn the_charts_crd_equals_the_generated_one_when_the_chart_exists() {
    let chart = repo_root().join("helm/tandem");
    if !chart.join("Chart.yaml").exists() {
        return;
    }
    let copy = chart.join("crds/inferencepipelines.tandem.dev.yaml");
    assert!(
        read(&copy) == crd_yaml().unwrap(),
        "{} is stale; copy crds/inferencepipelines.tandem.dev.yaml there",
        copy.display()
    );
}

#[test]
fn the_committed_crd_reference_equals_the_generated_one() {
    let committed = read(&repo_root().join("docs/crd-reference.md"));
    assert!(
        committed == crd_reference().unwrap(),
        "docs/crd-reference.md is stale; regenerate with: cargo run -p tandem-operator -- crd-reference > docs/crd-reference.md"
    );
}

fn examples(dir: &str) -> Vec<(PathBuf, String)> {
    let mut out: Vec<_> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let text = read(&p);
            (p, text)
        })
        .collect();
    out.sort();
    out
}

fn parse(path: &Path, text: &str) -> InferencePipeline {
    let mut p: InferencePipeline =
        serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    p.metadata.namespace = Some("test".into());
    p.metadata.uid = Some("00000000-0000-4000-8000-000000000000".into());
    p
}

#[test]
fn the_valid_examples_parse_and_validate() {
    let valid = examples("docs/examples");
    assert!(valid.len() >= 2);
    for (path, text) in valid {
        let p = parse(&path, &text);
        validate(&p).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn every_invalid_example_names_its_expected_message_and_fails_validation() {
    let invalid = examples("docs/examples/invalid");
    assert!(invalid.len() >= 8);
    for (path, text) in invalid {
        assert!(
            text.lines().any(|l| l.starts_with("# expect: ")),
            "{} lacks an '# expect: <message>' line",
            path.display()
        );
        // Some rules (e.g. bounds) only the API server checks; the operator must reject at
        // least what would break its builders, and must never panic.
        let p = parse(&path, &text);
        let outcome = validate(&p);
        assert!(outcome.is_err(), "{} validated", path.display());
    }
}
