//! Harness for sparsemoe's end-to-end tests on a real local control plane.
//!
//! `e2e/cluster/up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
//! (fake H200/H100 GPU nodes) on 127.0.0.1 and prints a kubeconfig path; the tests run against it
//! when `SPARSEMOE_E2E_KUBECONFIG` holds that path, and otherwise print [`SKIP_MESSAGE`] and return.
//!
//! - [`Cluster`]: the kubeconfig, the cluster's own `kubectl` (the one `e2e/cluster/build` built),
//!   a [`kube::Client`], throwaway namespaces, the CRD, and the API server's audit log.
//! - [`operator`]: starts `target/debug/sparsemoe-operator run` against the cluster, for the
//!   operator tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod operator;

/// The environment variable that holds the kubeconfig of the cluster from `e2e/cluster/up`.
pub const KUBECONFIG_ENV: &str = "SPARSEMOE_E2E_KUBECONFIG";

/// What a test prints when it has no cluster to run against.
pub const SKIP_MESSAGE: &str =
    "skipped: no cluster (run e2e/cluster/up and set SPARSEMOE_E2E_KUBECONFIG)";

/// GPU product labels of the two fake node pools (`nvidia.com/gpu.product`), 4 nodes each with
/// `nvidia.com/gpu: 8`.
pub const H200: &str = "NVIDIA-H200";
pub const H100: &str = "NVIDIA-H100-80GB-HBM3";
/// Nodes per GPU pool and GPUs per node.
pub const NODES_PER_POOL: usize = 4;
pub const GPUS_PER_NODE: u32 = 8;

/// The repository root (the parent of `e2e/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The YAML files directly inside `dir`, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The result of one `kubectl` run.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A handle on the running local control plane.
#[derive(Debug, Clone)]
pub struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    state_dir: PathBuf,
}

impl Cluster {
    /// The cluster named by `SPARSEMOE_E2E_KUBECONFIG`, or `None` after printing [`SKIP_MESSAGE`].
    /// Every e2e test starts with `let Some(cluster) = Cluster::from_env() else { return };`.
    pub fn from_env() -> Option<Cluster> {
        match std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Some(Cluster::new(PathBuf::from(path))),
            None => {
                eprintln!("{SKIP_MESSAGE}");
                None
            }
        }
    }

    /// A cluster from `e2e/cluster/up`'s kubeconfig. Its state directory (the kubeconfig's) holds
    /// `bin/` (a link to the built binaries) and `logs/` (component logs, `audit.log`).
    pub fn new(kubeconfig: PathBuf) -> Cluster {
        assert!(
            kubeconfig.is_file(),
            "{KUBECONFIG_ENV}={} is not a file; run e2e/cluster/up",
            kubeconfig.display()
        );
        let state_dir = kubeconfig
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let built = state_dir.join("bin/kubectl");
        let kubectl = if built.is_file() {
            built
        } else {
            PathBuf::from("kubectl")
        };
        Cluster {
            kubeconfig,
            kubectl,
            state_dir,
        }
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory `e2e/cluster/up` keeps its state in.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The API server's audit log: one JSON event per line for every write (and for reads by
    /// clients other than the control plane's own components), with `user.username` and
    /// `userAgent`.
    pub fn audit_log(&self) -> PathBuf {
        self.state_dir.join("logs/audit.log")
    }

    /// The audit events logged so far.
    pub fn audit_events(&self) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.audit_log())
            .with_context(|| format!("reading {}", self.audit_log().display()))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// A mark in the audit log (its current number of events), for [`Cluster::writes_since`].
    pub fn audit_mark(&self) -> Result<usize> {
        Ok(self.audit_events()?.len())
    }

    /// The write requests (create, update, patch, delete, deletecollection) logged after `mark`
    /// whose user agent starts with `user_agent_prefix`.
    pub fn writes_since(
        &self,
        mark: usize,
        user_agent_prefix: &str,
    ) -> Result<Vec<serde_json::Value>> {
        const WRITES: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];
        Ok(self
            .audit_events()?
            .into_iter()
            .skip(mark)
            .filter(|e| e["stage"] == "ResponseComplete")
            .filter(|e| WRITES.contains(&e["verb"].as_str().unwrap_or_default()))
            .filter(|e| {
                e["userAgent"]
                    .as_str()
                    .is_some_and(|ua| ua.starts_with(user_agent_prefix))
            })
            .collect())
    }

    /// Runs the cluster's kubectl with `args`.
    pub fn kubectl(&self, args: &[&str]) -> KubectlOutput {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl.display()));
        KubectlOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs kubectl and returns its stdout, or an error with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        if out.success {
            Ok(out.stdout)
        } else {
            bail!("kubectl {}: {}", args.join(" "), out.stderr.trim())
        }
    }

    /// Runs helm (built by `e2e/cluster/build` next to kubectl) with `args`; its stdout, or an
    /// error with its stderr. Helm gets the cluster's kubeconfig but these tests use it only
    /// offline (`lint`, `template`).
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let helm = self.state_dir.join("bin/helm");
        if !helm.is_file() {
            bail!("{} not found: run e2e/cluster/build", helm.display());
        }
        let out = Command::new(&helm)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            // helm keeps a cache and config under $HOME by default; keep them in the state dir.
            .env("HELM_CACHE_HOME", self.state_dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.state_dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.state_dir.join("helm/data"))
            .output()
            .with_context(|| format!("running {}", helm.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!(
                "helm {}: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl_ok(&all)?)?)
    }

    /// `kubectl apply -f FILE -n NAMESPACE`, as a user would run it: `Ok(stdout)` when the API
    /// server accepted the object, `Err(stderr)` (the server's message) when it did not.
    pub fn apply_file(&self, file: &Path, namespace: &str) -> Result<String, String> {
        let file = file.to_string_lossy();
        let out = self.kubectl(&["apply", "-n", namespace, "-f", &file]);
        if out.success {
            Ok(out.stdout)
        } else {
            Err(out.stderr)
        }
    }

    /// `kubectl apply -n NAMESPACE -f -` with `yaml` on standard input: `Ok(stdout)` or
    /// `Err(stderr)`, as [`Cluster::apply_file`].
    pub fn apply_yaml(&self, yaml: &str, namespace: &str) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-n", namespace, "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl.display()));
        // stdin is closed (dropped) before waiting, so kubectl sees the end of the input.
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(yaml.as_bytes()));
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if let Some(Err(e)) = written {
            return Err(format!("writing to kubectl: {e}"));
        }
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The write requests after `mark` by user agents starting with `user_agent_prefix` on
    /// objects in `namespace`.
    pub fn writes_in(
        &self,
        mark: usize,
        user_agent_prefix: &str,
        namespace: &str,
    ) -> Result<Vec<serde_json::Value>> {
        Ok(self
            .writes_since(mark, user_agent_prefix)?
            .into_iter()
            .filter(|e| e["objectRef"]["namespace"] == namespace)
            .collect())
    }

    /// Installs (or updates) the InferenceDeployment CRD from `crds/` and waits until the API
    /// server serves it. Safe to call from every test.
    pub fn install_crd(&self) -> Result<()> {
        let crd = repo_root().join("crds/sparsemoe.io_inferencedeployments.yaml");
        self.kubectl_ok(&["apply", "--server-side", "-f", &crd.to_string_lossy()])?;
        // Polled rather than `kubectl wait --for=condition=Established`, which fails outright
        // (".status.conditions accessor error: <nil>") when it reads the CRD before the API
        // server has written its first condition, as happened on a loaded CI machine.
        wait_until(Duration::from_secs(60), || {
            let established = self.kubectl(&[
                "get",
                "crd/inferencedeployments.sparsemoe.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ]);
            Ok(established.success && established.stdout.trim() == "True")
        })
        .context("the InferenceDeployment CRD is not Established")?;
        // Established comes slightly before discovery serves the kind to kubectl.
        wait_until(Duration::from_secs(30), || {
            Ok(self.kubectl(&["get", "idep", "-A"]).success)
        })
        .context("the API server does not serve inferencedeployments")
    }

    /// A fresh namespace `PREFIX-N-PID`, deleted (without waiting) when the guard drops.
    pub fn namespace(&self, prefix: &str) -> Namespace {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        self.kubectl_ok(&["create", "namespace", &name])
            .expect("create namespace");
        // Pods need the namespace's default ServiceAccount, which the controller manager makes.
        wait_until(Duration::from_secs(30), || {
            Ok(self
                .kubectl(&["get", "serviceaccount", "default", "-n", &name])
                .success)
        })
        .expect("default ServiceAccount");
        Namespace {
            cluster: self.clone(),
            name,
        }
    }

    /// A kube client for the cluster (admin credentials).
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// A namespace that is deleted when dropped.
#[derive(Debug)]
pub struct Namespace {
    cluster: Cluster,
    name: String,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Polls `check` every 200 ms until it returns `Ok(true)`; an error after `timeout`.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?}; last error: {e:#}"),
                None => bail!("timed out after {timeout:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `# expect: ...` line of an invalid example: the message the API server must give.
pub fn expected_message(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .map(|m| m.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_message_reads_the_expect_line() {
        let text = "# expect: variants: names must be unique\napiVersion: v1\n";
        assert_eq!(
            expected_message(text).as_deref(),
            Some("variants: names must be unique")
        );
        assert_eq!(expected_message("apiVersion: v1\n"), None);
    }

    #[test]
    fn every_invalid_example_has_an_expect_line() {
        let files = yaml_files(&repo_root().join("examples/invalid"));
        assert!(!files.is_empty());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(expected_message(&text).is_some(), "{}", f.display());
        }
    }
}
