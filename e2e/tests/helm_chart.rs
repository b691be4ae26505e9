//! The Helm chart on the real API server: `helm lint --strict` passes, every object that
//! `helm template` renders is accepted by the API server (server-side dry run), and the operator
//! does its whole job under the chart's RBAC alone, authenticated as the chart's ServiceAccount:
//! not one request of it is forbidden.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use sparsemoe_e2e::operator::Operator;
use sparsemoe_e2e::{Cluster, repo_root, wait_until};

/// Deletes the release's cluster-scoped objects (the namespace guard takes the rest).
struct ClusterScoped<'a> {
    cluster: &'a Cluster,
    release: String,
}

impl Drop for ClusterScoped<'_> {
    fn drop(&mut self) {
        let selector = format!("app.kubernetes.io/instance={}", self.release);
        let _ = self.cluster.kubectl(&[
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            &selector,
            "--wait=false",
        ]);
    }
}

fn idep(variant: &str) -> String {
    format!(
        r#"apiVersion: sparsemoe.io/v1alpha1
kind: InferenceDeployment
metadata:
  name: rbac
spec:
  model: {{name: sparsemoe-demo, source: {{demo: {{}}}}}}
  engine: {{resources: {{requests: {{cpu: 100m, memory: 64Mi}}}}}}
  parallelism: {{gpusPerReplica: 0}}
  variants: [{{name: {variant}, costPerHour: "0.05", nodeSelector: {{sparsemoe.io/e2e-pool: cpu}}}}]
  scaling: {{policy: fixed, replicas: 1}}
"#
    )
}

fn wait_ready(cluster: &Cluster, ns: &str, op: &Operator) -> Result<()> {
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Ready",
            "--timeout=90s",
            "-n",
            ns,
            "inferencedeployment/rbac",
        ])
        .map(drop)
        .with_context(|| format!("operator log:\n{}", op.log()))
}

/// A kubeconfig for the cluster's API server that authenticates with `token`.
fn token_kubeconfig(cluster: &Cluster, token: &str) -> Result<String> {
    let view: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--flatten",
        "--minify",
        "-o",
        "json",
    ])?)?;
    let c = &view["clusters"][0]["cluster"];
    let server = c["server"].as_str().context("kubeconfig: no server")?;
    let ca = c["certificate-authority-data"]
        .as_str()
        .context("kubeconfig: no certificate-authority-data")?;
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster: {{server: \"{server}\", certificate-authority-data: \"{ca}\"}}\nusers:\n- name: operator\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: operator\n  context: {{cluster: e2e, user: operator}}\ncurrent-context: operator\n"
    ))
}

#[test]
fn chart_lints_renders_and_its_rbac_is_all_the_operator_needs() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    cluster.install_crd().unwrap();
    let ns = cluster.namespace("chart");
    let ns = ns.name();
    let chart = repo_root().join("charts/sparsemoe-operator");
    let chart = chart.to_string_lossy();

    let lint = cluster.helm(&["lint", "--strict", &chart]).unwrap();
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    // Everything the chart renders is valid for the real API server.
    let release = format!("op-{ns}");
    let _cleanup = ClusterScoped {
        cluster: &cluster,
        release: release.clone(),
    };
    let watch = format!("watchNamespace={ns}");
    let template = [
        "template",
        &release,
        &chart,
        "--namespace",
        ns,
        "--set",
        &watch,
    ];
    let all = cluster.helm(&template).unwrap();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(
            all.contains(&format!("\nkind: {kind}\n")),
            "no {kind}:\n{all}"
        );
    }
    // The Lease the chart's pod elects its leader on (`leaseName`), which the operator here
    // takes as that pod would.
    let lease = all
        .split("name: SPARSEMOE_LEASE_NAME")
        .nth(1)
        .and_then(|rest| rest.lines().nth(1))
        .and_then(|line| line.trim().strip_prefix("value: "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("the chart's Deployment sets SPARSEMOE_LEASE_NAME");
    assert_eq!(lease, "sparsemoe-operator");
    let dir = cluster.state_dir().join(format!("chart-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let all_file = dir.join("all.yaml");
    std::fs::write(&all_file, &all).unwrap();
    cluster
        .kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-n",
            ns,
            "-f",
            &all_file.to_string_lossy(),
        ])
        .unwrap();

    // The RBAC for real (the chart's Deployment would only become a fake kwok pod; the
    // operator binary runs here instead, configured as that pod's env configures it).
    let shown: Vec<String> = [
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "role",
        "rolebinding",
    ]
    .iter()
    .map(|t| format!("templates/{t}.yaml"))
    .collect();
    let mut rbac_only = template.to_vec();
    for t in &shown {
        rbac_only.extend(["--show-only", t.as_str()]);
    }
    cluster
        .apply_yaml(&cluster.helm(&rbac_only).unwrap(), ns)
        .unwrap();
    let selector = format!("app.kubernetes.io/instance={release}");
    let sa = cluster
        .kubectl_ok(&[
            "get",
            "serviceaccount",
            "-n",
            ns,
            "-l",
            &selector,
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .unwrap();
    assert!(!sa.is_empty(), "the chart made no ServiceAccount");
    let token = cluster
        .kubectl_ok(&["create", "token", &sa, "-n", ns, "--duration=1h"])
        .unwrap();
    let kubeconfig = dir.join("operator.kubeconfig");
    std::fs::write(
        &kubeconfig,
        token_kubeconfig(&cluster, token.trim()).unwrap(),
    )
    .unwrap();

    let mark = cluster.audit_mark().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let kubeconfig = kubeconfig.to_string_lossy();
    let op = Operator::start_with_env(
        &cluster,
        &format!("{ns}-chart"),
        &["--http-addr", &addr],
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAME", "operator-0"),
            ("POD_NAMESPACE", ns),
            ("SPARSEMOE_WATCH_NAMESPACE", ns),
            ("SPARSEMOE_LEASE_NAME", &lease),
        ],
    )
    .unwrap();

    // Create, reach Ready, then rename the variant: a new Deployment, the old one deleted.
    cluster.apply_yaml(&idep("cpu"), ns).unwrap();
    wait_ready(&cluster, ns, &op).unwrap();
    cluster.apply_yaml(&idep("cpu-b"), ns).unwrap();
    wait_until(Duration::from_secs(60), || {
        let names = cluster.kubectl_ok(&[
            "get",
            "deployments",
            "-n",
            ns,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        Ok(names.trim() == "rbac-cpu-b")
    })
    .with_context(|| op.log())
    .unwrap();
    wait_ready(&cluster, ns, &op).unwrap();

    // Who did it: the chart's ServiceAccount, never forbidden.
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let events: Vec<Value> = cluster
        .audit_events()
        .unwrap()
        .into_iter()
        .skip(mark)
        .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user.as_str())
        .collect();
    let forbidden: Vec<String> = events
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect();
    let verb_of = |verb: &str, resource: &str| {
        events
            .iter()
            .any(|e| e["verb"] == verb && e["objectRef"]["resource"] == resource)
    };
    assert!(
        verb_of("patch", "deployments") && verb_of("delete", "deployments"),
        "the operator's writes were not made as {user}"
    );
    assert!(
        verb_of("patch", "inferencedeployments"),
        "no status patch as {user}"
    );
    assert!(
        forbidden.is_empty(),
        "requests the chart's RBAC forbids: {forbidden:?}\n{}",
        op.log()
    );
    assert!(
        !op.log().contains("forbidden"),
        "the operator logged a forbidden request:\n{}",
        op.log()
    );
    eprintln!(
        "chart: lint ok, {} objects accepted, {} requests as {user}, none forbidden",
        all.matches("\nkind: ").count(),
        events.len()
    );
}
