//! Renders `docs/crd-reference.md` from the generated CRD schema, so the reference can never
//! disagree with what the API server enforces (a test compares the committed file).

use std::fmt::Write as _;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::crd::InferencePipeline;

/// Why the reference could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The CRD did not serialize.
    #[error("serializing the CRD")]
    Serialize(#[source] serde_json::Error),
    /// The CRD has no schema to document.
    #[error("the CRD has no openAPIV3Schema")]
    NoSchema,
}

/// The Markdown reference for the `InferencePipeline` CRD.
pub fn crd_reference() -> Result<String, ReferenceError> {
    let crd = serde_json::to_value(InferencePipeline::crd()).map_err(ReferenceError::Serialize)?;
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    if schema.is_null() {
        return Err(ReferenceError::NoSchema);
    }
    let mut out = String::new();
    let names = &crd["spec"]["names"];
    let _ = writeln!(out, "# InferencePipeline reference\n");
    let _ = writeln!(
        out,
        "<!-- Generated from the Rust types by `tandem-operator crd-reference`; do not edit. \
         A test fails when this file drifts. -->\n"
    );
    let _ = writeln!(
        out,
        "`{}/{}`, kind `{}`, plural `{}`, short name `{}`, namespaced, with a `status` subresource.\n",
        crd["spec"]["group"].as_str().unwrap_or_default(),
        version["name"].as_str().unwrap_or_default(),
        names["kind"].as_str().unwrap_or_default(),
        names["plural"].as_str().unwrap_or_default(),
        names["shortNames"][0].as_str().unwrap_or_default(),
    );
    let _ = writeln!(
        out,
        "{}\n",
        one_line(schema["description"].as_str().unwrap_or_default())
    );
    for rule in rules(schema) {
        let _ = writeln!(out, "- Object rule: {rule}");
    }
    let _ = writeln!(out, "\n## `kubectl get ipl` columns\n");
    let _ = writeln!(
        out,
        "| Column | Type | Source | Description |\n|---|---|---|---|"
    );
    for col in version["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(
            out,
            "| {} | {} | `{}` | {} |",
            col["name"].as_str().unwrap_or_default(),
            col["type"].as_str().unwrap_or_default(),
            col["jsonPath"].as_str().unwrap_or_default(),
            col["description"].as_str().unwrap_or_default(),
        );
    }
    for section in ["spec", "status"] {
        let _ = writeln!(out, "\n## `{section}`\n");
        let _ = writeln!(
            out,
            "| Field | Type | Default | Description |\n|---|---|---|---|"
        );
        let required = schema["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|f| f == section));
        walk(&mut out, section, &schema["properties"][section], required);
    }
    Ok(out)
}

fn walk(out: &mut String, path: &str, schema: &Value, required: bool) {
    let mut desc = one_line(schema["description"].as_str().unwrap_or_default());
    if required {
        desc = format!("**Required.** {desc}");
    }
    desc.push_str(&constraints(schema));
    // What each element must be: rules on a list's items (a toleration's operator and value),
    // a map's value pattern (a node selector's label values, resource quantities).
    if schema["type"] == "array" {
        let each = constraints(&schema["items"]);
        if !each.is_empty() {
            let _ = write!(desc, " Each item:{each}");
        }
    }
    if schema["additionalProperties"].is_object() {
        let each = constraints(&schema["additionalProperties"]);
        if !each.is_empty() {
            let _ = write!(desc, " Each value:{each}");
        }
    }
    let default = if schema["default"].is_null() {
        String::new()
    } else {
        format!("`{}`", schema["default"])
    };
    let _ = writeln!(
        out,
        "| `{path}` | {} | {default} | {} |",
        type_of(schema),
        desc.trim().replace('|', "\\|")
    );
    let required_fields: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            walk(
                out,
                &format!("{path}.{name}"),
                sub,
                required_fields.contains(&name.as_str()),
            );
        }
    }
    if schema["type"] == "array" && schema["items"]["properties"].is_object() {
        let items = &schema["items"];
        let required_items: Vec<&str> = items["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for (name, sub) in items["properties"].as_object().into_iter().flatten() {
            walk(
                out,
                &format!("{path}[].{name}"),
                sub,
                required_items.contains(&name.as_str()),
            );
        }
    }
}

/// A schema's own constraints as sentences, each starting with a space: CEL rules with their
/// messages, allowed values, length, count and entry bounds, and the pattern.
fn constraints(schema: &Value) -> String {
    let mut out = String::new();
    for rule in rules(schema) {
        let _ = write!(out, " Rule: {rule}.");
    }
    if let Some(values) = schema["enum"].as_array() {
        let v: Vec<String> = values
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or_default()))
            .collect();
        let _ = write!(out, " One of {}.", v.join(", "));
    }
    let bounds: Vec<String> = [
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min entries"),
        ("maxProperties", "max entries"),
    ]
    .iter()
    .filter_map(|(k, label)| schema[*k].as_u64().map(|n| format!("{label} {n}")))
    .collect();
    if !bounds.is_empty() {
        let _ = write!(out, " ({}).", bounds.join(", "));
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        let _ = write!(out, " Pattern `{pattern}`.");
    }
    out
}

fn type_of(schema: &Value) -> String {
    if schema["x-kubernetes-int-or-string"] == true {
        return "int or string".to_owned();
    }
    match schema["type"].as_str() {
        Some("array") => format!("array of {}", type_of(&schema["items"])),
        Some("object") if schema["additionalProperties"].is_object() => {
            format!("map of {}", type_of(&schema["additionalProperties"]))
        }
        Some(t) => t.to_owned(),
        None => "any".to_owned(),
    }
}

fn rules(schema: &Value) -> Vec<String> {
    schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let message = r["message"].as_str().unwrap_or_default();
            format!(
                "`{}` — \"{message}\"",
                r["rule"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_documents_fields_rules_defaults_and_columns() {
        let md = crd_reference().unwrap();
        assert!(
            md.contains("| `spec.inference.model.sha256` | string |"),
            "{md}"
        );
        assert!(md.contains("inference.model.sha256 must be exactly 64 hexadecimal characters"));
        assert!(md.contains("| `spec.rollout.steps` | array of integer | `[10,50,100]` |"));
        assert!(md.contains("| Model | string | `.status.summary.model` |"));
        assert!(md.contains("`status.conditions[].reason`"));
        assert!(md.contains("One of `CUDA`, `CPU`."));
    }

    #[test]
    fn list_item_rules_map_value_patterns_and_entry_bounds_are_documented() {
        let md = crd_reference().unwrap();
        let row = |field: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| `{field}` |")))
                .unwrap_or_else(|| panic!("no row for {field}"))
                .to_owned()
        };
        let tolerations = row("spec.inference.scheduling.tolerations");
        assert!(tolerations.contains("Each item: Rule:"), "{tolerations}");
        let selector = row("spec.inference.scheduling.nodeSelector");
        assert!(selector.contains("(max entries 32)."), "{selector}");
        assert!(
            selector.contains("Each value: (max length 63). Pattern `"),
            "{selector}"
        );
        let key = row("spec.preprocess.scheduling.tolerations[].key");
        assert!(key.contains("Pattern `^("), "{key}");
        let limits = row("spec.inference.resources.limits");
        assert!(limits.contains("Each value: Pattern `"), "{limits}");
    }

    #[test]
    fn an_optional_enum_field_keeps_its_own_description() {
        let md = crd_reference().unwrap();
        for (field, own) in [
            ("status.activeColor", "serve live traffic"),
            ("status.phase", "the conditions say why"),
            ("status.rollout.phase", "Where the rollout stands"),
            (
                "spec.inference.scheduling.tolerations[].effect",
                "unset matches every effect",
            ),
        ] {
            let row = md
                .lines()
                .find(|l| l.starts_with(&format!("| `{field}` |")))
                .unwrap_or_else(|| panic!("no row for {field}"));
            assert!(row.contains(own), "{row}");
        }
    }
}
