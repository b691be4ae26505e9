//! The Helm chart, checked without `helm` (not installable from the Debian archive): the CRD
//! copy equals the generated CRD, every file parses as YAML once template expressions are
//! replaced by placeholders, the values parse and every one is in values.schema.json, and the
//! RBAC grants exactly the verbs the operator uses (and users, through the aggregated roles).

use std::path::{Path, PathBuf};

use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sparsemoe-operator")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Drops whole-line control actions (`if`, `else`, `end`, `with`, `range`, comments), turns
/// any other whole-line action (an `include` of labels) into a placeholder key of its own, and
/// replaces every other `{{ ... }}` with `x`.
fn detemplate(text: &str) -> String {
    let mut out = String::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with("{{")
            && trimmed.ends_with("}}")
            && trimmed.matches("{{").count() == 1
        {
            let action = trimmed
                .trim_start_matches("{{")
                .trim_start_matches('-')
                .trim_start();
            let keyword = action.split_whitespace().next().unwrap_or_default();
            if action.starts_with("/*")
                || ["if", "else", "end", "end}}", "end-}}", "with", "range"].contains(&keyword)
            {
                continue;
            }
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}template-line-{n}: x\n"));
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
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    let deployment_text = read(&chart().join("templates/deployment.yaml"));
    let deployment = parse(&detemplate(&deployment_text), "deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "run");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    // The operator image's default tag is the appVersion, as it has always been.
    assert!(
        deployment_text.contains(".Values.image.tag | default .Chart.AppVersion }}"),
        "the operator image's default tag is not the appVersion"
    );
    // The chart's RUST_LOG is the operator's own default.
    let main = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs"));
    let level = values["logLevel"].as_str().unwrap();
    assert!(
        main.contains(&format!("EnvFilter::new(\"{level}\")")),
        "values.yaml logLevel {level:?} is not the operator's default filter in src/main.rs"
    );
}

/// Every value in values.yaml is in values.schema.json with its type, and every object the
/// schema lists the keys of refuses others (a misspelt key fails `helm install`).
#[test]
fn values_schema_covers_every_value() {
    fn walk(path: &str, value: &Value, schema: &Value, root: &Value) {
        let schema = match schema["$ref"].as_str() {
            Some(r) => {
                let name = r.strip_prefix("#/definitions/").unwrap();
                &root["definitions"][name]
            }
            None => schema,
        };
        let ty = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        if let Some(want) = schema["type"].as_str() {
            assert_eq!(
                want, ty,
                "{path}: values.yaml has a {ty}, the schema wants {want}"
            );
        } else {
            assert!(
                schema["anyOf"].is_array(),
                "{path}: the schema gives no type"
            );
        }
        if let Some(props) = schema["properties"].as_object() {
            assert_eq!(
                schema["additionalProperties"], false,
                "{path}: the schema lists its keys but allows others"
            );
            for (key, child) in value.as_object().unwrap() {
                let sub = props
                    .get(key)
                    .unwrap_or_else(|| panic!("{path}.{key} is not in values.schema.json"));
                walk(&format!("{path}.{key}"), child, sub, root);
            }
        }
    }
    let values = parse(&read(&chart().join("values.yaml")), "values.yaml");
    let schema: Value = serde_json::from_str(&read(&chart().join("values.schema.json")))
        .expect("values.schema.json parses");
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    walk("values", &values, &schema, &schema);
    assert_eq!(values["serviceAccount"]["create"], true);
    assert_eq!(values["rbac"]["aggregateToDefaultRoles"], true);
    assert_eq!(values["podDisruptionBudget"]["enabled"], true);
    let port = &schema["properties"]["metrics"]["properties"]["port"];
    assert_eq!(
        (&port["minimum"], &port["maximum"]),
        (&1.into(), &65535.into())
    );
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

/// The ClusterRoles for users, aggregated into the built-in admin, edit and view roles.
#[test]
fn user_roles_are_aggregated_into_the_built_in_roles() {
    let labels = |file: &str| {
        let doc = parse(
            &detemplate(&read(&chart().join("templates").join(file))),
            file,
        );
        doc["metadata"]["labels"].clone()
    };
    let edit = labels("clusterrole-edit.yaml");
    assert_eq!(edit["rbac.authorization.k8s.io/aggregate-to-edit"], "true");
    assert_eq!(edit["rbac.authorization.k8s.io/aggregate-to-admin"], "true");
    let view = labels("clusterrole-view.yaml");
    assert_eq!(view["rbac.authorization.k8s.io/aggregate-to-view"], "true");
    let all = [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ];
    let own = |v: &[(&str, &[&str])]| {
        let mut v: Vec<(String, String, Vec<String>)> = v
            .iter()
            .map(|(r, verbs)| {
                (
                    "sparsemoe.io".to_string(),
                    r.to_string(),
                    verbs.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let mut actual = rules("clusterrole-edit.yaml");
    actual.sort();
    assert_eq!(
        actual,
        own(&[
            ("inferencedeployments", &all),
            ("inferencedeployments/status", &["get"]),
            ("inferencedeployments/scale", &["get", "update", "patch"]),
        ])
    );
    let mut actual = rules("clusterrole-view.yaml");
    actual.sort();
    let read_only: &[&str] = &["get", "list", "watch"];
    assert_eq!(
        actual,
        own(&[
            ("inferencedeployments", read_only),
            ("inferencedeployments/status", read_only),
            ("inferencedeployments/scale", read_only),
        ])
    );
}

/// With more than one replica, a drain takes one operator pod at a time.
#[test]
fn operator_pdb_allows_one_pod_down() {
    let text = read(&chart().join("templates/poddisruptionbudget.yaml"));
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains("gt (int .Values.replicaCount) 1"),
        "the PDB is not limited to replicaCount > 1"
    );
    let pdb = parse(&detemplate(&text), "poddisruptionbudget.yaml");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"]["selector"]["matchLabels"].is_object());
}
