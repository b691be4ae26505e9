//! `render` on the examples users copy: valid YAML documents, no cluster needed.

use std::path::Path;

use serde_json::Value;

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kinds(yaml: &str) -> Vec<String> {
    yaml.split("\n---\n")
        .map(|doc| doc.trim_start_matches("---\n"))
        .filter(|doc| doc.contains("kind:"))
        .map(|doc| {
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
            v["kind"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn examples_render_to_their_children() {
    let tiny = sparsemoe_operator::render::render(&example("tiny-cpu.yaml"), false).unwrap();
    assert_eq!(
        kinds(&tiny),
        ["Deployment", "Service", "PodDisruptionBudget"]
    );
    let h200 =
        sparsemoe_operator::render::render(&example("deepseek-v3.2-h200.yaml"), false).unwrap();
    assert_eq!(
        kinds(&h200),
        ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    );
    // The H100 variant spans two nodes: without LWS it is reported, with LWS it renders.
    let mixed =
        sparsemoe_operator::render::render(&example("cost-aware-variants.yaml"), false).unwrap();
    assert!(
        mixed.starts_with("# Degraded (LeaderWorkerSetMissing)"),
        "{mixed}"
    );
    let mixed =
        sparsemoe_operator::render::render(&example("cost-aware-variants.yaml"), true).unwrap();
    assert_eq!(
        kinds(&mixed),
        [
            "ConfigMap",
            "Deployment",
            "LeaderWorkerSet",
            "Service",
            "PodDisruptionBudget"
        ]
    );
}

#[test]
fn invalid_manifests_are_errors_naming_the_field() {
    let err = sparsemoe_operator::render::render(&example("invalid/zero-experts.yaml"), false)
        .unwrap_err();
    assert!(err.contains("numExperts"), "{err}");
    let err = sparsemoe_operator::render::render("not: [yaml", false).unwrap_err();
    assert!(err.contains("invalid InferenceDeployment"), "{err}");
}
