//! The checked-in CRD, the examples users copy, and every schema rule's message.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sparsemoe_api::{CRD_PATH, crd_yaml, parse_and_validate};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The `# expect: ...` line at the top of an invalid example.
fn expected_message(text: &str, path: &Path) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{} has no `# expect:` line", path.display()))
        .trim()
        .to_string()
}

#[test]
fn checked_in_crd_matches_the_generator() {
    let path = repo_root().join(CRD_PATH);
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == crd_yaml(),
        "{} is stale; regenerate it with `cargo run -p sparsemoe-operator -- crd > {CRD_PATH}`",
        path.display()
    );
}

/// Every unsigned integer of the spec has a `maximum` its Rust type holds: the API server
/// ignores `format: uint32`, so without one it would store a value the operator cannot read,
/// and one such object fails the operator's whole list (kube-rs gives no item of a list that
/// does not deserialize), so nothing in the cluster would be reconciled.
#[test]
fn every_unsigned_spec_integer_has_a_maximum_its_type_holds() {
    use kube::CustomResourceExt;
    fn walk(path: &str, node: &serde_json::Value, found: &mut Vec<String>) {
        match node {
            serde_json::Value::Object(map) => {
                if let Some(format) = map.get("format").and_then(|f| f.as_str())
                    && let Some(bits) = format.strip_prefix("uint")
                {
                    let bits: u32 = bits.parse().unwrap();
                    let max = map.get("maximum").and_then(|m| m.as_f64());
                    let holds = max.is_some_and(|m| m <= (2f64.powi(bits as i32) - 1.0));
                    assert!(holds, "{path}: {format} with maximum {max:?}");
                    found.push(path.to_string());
                }
                for (key, child) in map {
                    walk(&format!("{path}/{key}"), child, found);
                }
            }
            serde_json::Value::Array(items) => {
                for child in items {
                    walk(&format!("{path}[]"), child, found);
                }
            }
            _ => {}
        }
    }
    let crd = serde_json::to_value(sparsemoe_api::InferenceDeployment::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut found = Vec::new();
    walk("spec", schema, &mut found);
    // The walk reached the spec's integers (minReplicas among them).
    assert!(found.len() >= 15, "{found:?}");
    assert!(
        found.iter().any(|p| p.ends_with("minReplicas")),
        "{found:?}"
    );
}

#[test]
fn crd_has_subresources_short_name_and_printer_columns() {
    use kube::CustomResourceExt;
    let crd = sparsemoe_api::InferenceDeployment::crd();
    assert_eq!(crd.spec.group, "sparsemoe.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["idep".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let subresources = version.subresources.as_ref().unwrap();
    assert!(subresources.status.is_some());
    let scale = subresources.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.scaling.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Replicas", "Variants", "Tokens/s", "$/Mtok", "Age"]
    );
    // Conditions are a map list keyed by type, whose key every item must carry.
    let schema = version.schema.as_ref().unwrap().open_api_v3_schema.as_ref();
    let status = &schema.unwrap().properties.as_ref().unwrap()["status"];
    let conditions = &status.properties.as_ref().unwrap()["conditions"];
    assert_eq!(conditions.x_kubernetes_list_type.as_deref(), Some("map"));
    assert_eq!(
        conditions.x_kubernetes_list_map_keys,
        Some(vec!["type".to_string()])
    );
    let item = match conditions.items.as_ref().unwrap() {
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => s,
        other => panic!("conditions items: {other:?}"),
    };
    assert!(
        item.required
            .as_ref()
            .unwrap()
            .contains(&"type".to_string())
    );
}

#[test]
fn every_example_parses_and_passes_the_schema_rules() {
    let files = yaml_files(&repo_root().join("examples"));
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in [
        "tiny-cpu.yaml",
        "deepseek-v3.2-h200.yaml",
        "cost-aware-variants.yaml",
    ] {
        assert!(names.contains(required), "examples/{required} is missing");
    }
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = parse_and_validate(&text) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn every_invalid_example_fails_with_its_message() {
    let files = yaml_files(&repo_root().join("examples/invalid"));
    assert!(files.len() >= 10, "too few invalid examples");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = expected_message(&text, &path);
        match parse_and_validate(&text) {
            Ok(_) => panic!("{} was accepted; expected {expected:?}", path.display()),
            Err(e) => assert!(
                e.contains(&expected),
                "{}: expected {expected:?}, got {e}",
                path.display()
            ),
        }
    }
}

/// Every CEL rule in the schema is exercised by some invalid example, so a rule that the API
/// server would reject (or that never fires) cannot hide.
#[test]
fn every_schema_rule_has_an_invalid_example() {
    let crd: serde_json::Value = serde_json::to_value(
        <sparsemoe_api::InferenceDeployment as kube::CustomResourceExt>::crd(),
    )
    .unwrap();
    let mut messages = Vec::new();
    collect_messages(&crd, &mut messages);
    assert!(messages.len() >= 20, "found only {} rules", messages.len());
    let expectations: Vec<String> = yaml_files(&repo_root().join("examples/invalid"))
        .iter()
        .map(|p| expected_message(&std::fs::read_to_string(p).unwrap(), p))
        .collect();
    for message in messages {
        assert!(
            expectations.iter().any(|e| message.contains(e.as_str())),
            "no example in examples/invalid/ expects the rule message {message:?}"
        );
    }
}

fn collect_messages(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(rules)) = map.get("x-kubernetes-validations") {
                for rule in rules {
                    out.push(rule["message"].as_str().unwrap().to_string());
                }
            }
            map.values().for_each(|v| collect_messages(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_messages(v, out)),
        _ => {}
    }
}

#[test]
fn spec_defaults_fill_in_what_a_minimal_manifest_leaves_out() {
    let idep = parse_and_validate(
        "apiVersion: sparsemoe.io/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: m}\nspec:\n  model: {name: m, source: {demo: {}}}\n  variants: [{name: cpu, costPerHour: 2}]\n",
    )
    .unwrap();
    let spec = &idep.spec;
    assert_eq!(spec.scaling.replicas, 1);
    assert_eq!(spec.parallelism.nodes_per_replica, 1);
    assert_eq!(spec.variants[0].cost_per_hour.value(), 2.0);
    assert_eq!(
        spec.engine.image,
        sparsemoe_api::v1alpha1::DEFAULT_ENGINE_IMAGE
    );
    assert_eq!(spec.scaling.scale_down_stabilization_seconds, 300);
}

#[test]
fn unknown_or_mistyped_fields_name_the_problem() {
    let err = parse_and_validate(
        "apiVersion: sparsemoe.io/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: m}\nspec:\n  model: {name: m, source: {demo: {}}}\n  variants: [{name: cpu, costPerHour: 31.5}]\n",
    )
    .unwrap_err();
    assert!(err.contains("costPerHour"), "{err}");
    let err = parse_and_validate(
        "apiVersion: sparsemoe.io/v1alpha1\nkind: InferenceDeployment\nmetadata: {name: m}\nspec:\n  model: {name: m, source: {demo: {}}}\n  variants: [{name: cpu, costPerHour: 3}]\n  scaling: {replicas: many}\n",
    )
    .unwrap_err();
    assert!(err.contains("replicas"), "{err}");
}

/// `engine.args` may not repeat a flag the operator passes on the engine's command line (clap
/// exits on a flag given twice), in either form; flags that merely share a prefix pass.
#[test]
fn engine_args_may_not_repeat_the_operators_flags() {
    let manifest = |args: &str| {
        format!(
            "apiVersion: sparsemoe.io/v1alpha1\nkind: InferenceDeployment\nmetadata: {{name: m}}\nspec:\n  model: {{name: m, source: {{demo: {{}}}}}}\n  engine: {{args: {args}}}\n  variants: [{{name: cpu, costPerHour: 2}}]\n"
        )
    };
    for flag in ["--model", "--device", "--host", "--port"] {
        for args in [
            format!("[\"{flag}\", \"x\"]"),
            format!("[\"--max-running\", \"8\", \"{flag}=x\"]"),
        ] {
            let err = parse_and_validate(&manifest(&args))
                .expect_err(&format!("engine.args {args} was accepted"));
            assert!(
                err.contains("engine.args must not set --model, --device, --host or --port"),
                "{args}: {err}"
            );
        }
    }
    parse_and_validate(&manifest(
        "[\"--model-revision=abc\", \"--max-running\", \"8\", \"--api-key-file\", \"/k\"]",
    ))
    .unwrap();
}
