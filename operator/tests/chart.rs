//! The Helm chart, checked without `helm` (not installable from the Debian archive): the CRD
//! copy equals the generated CRD, every file parses as YAML once template expressions are
//! replaced by placeholders, and the RBAC grants exactly the verbs the operator uses.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sparsemoe-operator")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Drops whole-line control actions and replaces every `{{ ... }}` with `x`.
fn detemplate(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("{{-")
            && (trimmed.contains(" if ") || trimmed.contains(" end ") || trimmed.contains(" end}}"))
        {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .map(|e| start + e + 2)
                .unwrap_or(rest.len());
            out.push('x');
            rest = &rest[end..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

fn parse(text: &str, what: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let copy = read(&chart().join("crds/sparsemoe.io_inferencedeployments.yaml"));
    assert!(
        copy == sparsemoe_api::crd_yaml(),
        "charts/sparsemoe-operator/crds/ is stale; run `cargo run -p sparsemoe-operator -- crd > charts/sparsemoe-operator/crds/sparsemoe.io_inferencedeployments.yaml`"
    );
}

#[test]
fn chart_files_parse() {
    let meta = parse(&read(&chart().join("Chart.yaml")), "Chart.yaml");
    assert_eq!(meta["name"], "sparsemoe-operator");
    assert_eq!(meta["apiVersion"], "v2");
    let values = parse(&read(&chart().join("values.yaml")), "values.yaml");
    assert_eq!(values["replicaCount"], 2);
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let doc = parse(&detemplate(&read(&path)), &path.display().to_string());
            kinds.push(doc["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    let deployment = parse(
        &detemplate(&read(&chart().join("templates/deployment.yaml"))),
        "deployment",
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "run");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
}

fn rules(file: &str) -> Vec<(String, String, Vec<String>)> {
    let doc = parse(
        &detemplate(&read(&chart().join("templates").join(file))),
        file,
    );
    let strings = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    doc["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let verbs = strings(&r["verbs"]);
            let groups = strings(&r["apiGroups"]);
            strings(&r["resources"]).into_iter().flat_map(move |res| {
                let verbs = verbs.clone();
                groups
                    .clone()
                    .into_iter()
                    .map(move |g| (g, res.clone(), verbs.clone()))
            })
        })
        .collect()
}

#[test]
fn rbac_grants_exactly_what_the_operator_uses() {
    let expected: Vec<(&str, &str, &[&str])> = vec![
        // The controller's watch of InferenceDeployments; status by server-side apply.
        ("sparsemoe.io", "inferencedeployments", &["list", "watch"]),
        ("sparsemoe.io", "inferencedeployments/status", &["patch"]),
        // Children: watched caches, server-side apply, deletion of dropped children; a new
        // ConfigMap or Service is looked up (get) first, since its apply would merge into a
        // user's object of its name rather than conflict.
        (
            "apps",
            "deployments",
            &["list", "watch", "create", "patch", "delete"],
        ),
        (
            "",
            "configmaps",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        ("", "services", &["get", "list", "watch", "create", "patch"]),
        (
            "policy",
            "poddisruptionbudgets",
            &["list", "watch", "create", "patch"],
        ),
        // Image pull and crash-loop detection for the Degraded condition.
        ("", "pods", &["list", "watch"]),
        (
            "leaderworkerset.x-k8s.io",
            "leaderworkersets",
            &["list", "watch", "create", "patch", "delete"],
        ),
        // kube's event recorder creates events and patches repeats into series.
        ("events.k8s.io", "events", &["create", "patch"]),
    ];
    let own = |v: Vec<(&str, &str, &[&str])>| {
        let mut v: Vec<(String, String, Vec<String>)> = v
            .into_iter()
            .map(|(g, r, verbs)| {
                (
                    g.to_string(),
                    r.to_string(),
                    verbs.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let mut actual = rules("clusterrole.yaml");
    actual.sort();
    assert_eq!(actual, own(expected));
    let lease: Vec<(&str, &str, &[&str])> =
        vec![("coordination.k8s.io", "leases", &["get", "create", "patch"])];
    assert_eq!(rules("role.yaml"), own(lease));
}
