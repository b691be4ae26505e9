//! The operator under test: starts `sparsemoe-operator run` against the e2e cluster.
//!
//! The operator tests of issue 7 (Ready, children on the right GPU pool, rollouts, SIGKILL
//! mid-reconcile, two replicas and the Lease, garbage collection, zero writes at steady state)
//! go in `e2e/tests/operator.rs` and use [`Operator`]:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use sparsemoe_e2e::{Cluster, operator::Operator};
//! let Some(cluster) = Cluster::from_env() else { return Ok(()) };
//! cluster.install_crd()?;
//! let mut op = Operator::start(&cluster, "a", &[])?;
//! let mark = cluster.audit_mark()?;
//! // ... kubectl apply an InferenceDeployment, wait for Ready ...
//! op.kill(); // SIGKILL
//! let writes = cluster.writes_since(mark, Operator::USER_AGENT_PREFIX)?;
//! # let _ = writes; Ok(()) }
//! ```

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{Cluster, repo_root};

/// A running operator process; SIGKILLed when dropped.
#[derive(Debug)]
pub struct Operator {
    child: Child,
    log: PathBuf,
    http_port: Option<u16>,
}

impl Operator {
    /// What the operator's requests carry as their user agent, to tell its writes apart in the
    /// audit log: the operator sends `sparsemoe-operator/<version> (<identity>)` (kube-rs sends
    /// no User-Agent of its own).
    pub const USER_AGENT_PREFIX: &str = "sparsemoe-operator/";

    /// The operator's fault-injection variable (`reconcile::FAULT_PAUSE_ENV`): milliseconds to
    /// pause after every child apply.
    pub const FAULT_PAUSE_ENV: &str = "SPARSEMOE_OPERATOR_FAULT_PAUSE_AFTER_APPLY_MS";

    /// The user agent of the replica started with identity `id`, as a suffix to match.
    pub fn user_agent_suffix(id: &str) -> String {
        format!(" ({id})")
    }

    /// The operator binary: `$SPARSEMOE_OPERATOR_BIN`, else `sparsemoe-operator` in
    /// `$CARGO_TARGET_DIR/debug` or `target/debug` (built by `cargo build -p sparsemoe-operator`).
    pub fn binary() -> PathBuf {
        if let Some(bin) = std::env::var_os("SPARSEMOE_OPERATOR_BIN") {
            return PathBuf::from(bin);
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        target.join("debug/sparsemoe-operator")
    }

    /// Starts `sparsemoe-operator run ARGS...` with the cluster's kubeconfig (`KUBECONFIG`).
    /// `id` names its log, `<state dir>/logs/operator-<id>.log` (use distinct ids for replicas).
    pub fn start(cluster: &Cluster, id: &str, args: &[&str]) -> Result<Operator> {
        Self::start_with_env(cluster, id, args, &[])
    }

    /// [`Operator::start`] with extra environment variables (e.g. fault injection).
    pub fn start_with_env(
        cluster: &Cluster,
        id: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Operator> {
        let bin = Self::binary();
        if !bin.is_file() {
            bail!(
                "{} not found: run `cargo build -p sparsemoe-operator` first",
                bin.display()
            );
        }
        let log = cluster.state_dir().join(format!("logs/operator-{id}.log"));
        let out = File::create(&log).with_context(|| log.display().to_string())?;
        let child = Command::new(&bin)
            .arg("run")
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Operator {
            child,
            log,
            http_port: None,
        })
    }

    /// Starts a replica that watches only `namespace`, with identity `id` (its user agent ends
    /// in ` (id)`), /metrics on a free loopback port, and, with `leader_election`, the Lease
    /// `sparsemoe-operator` in `namespace`. Tests running side by side each use their own.
    pub fn start_in(
        cluster: &Cluster,
        id: &str,
        namespace: &str,
        leader_election: bool,
    ) -> Result<Operator> {
        Self::start_in_with_env(cluster, id, namespace, leader_election, &[])
    }

    /// [`Operator::start_in`] with extra environment variables (e.g. fault injection).
    pub fn start_in_with_env(
        cluster: &Cluster,
        id: &str,
        namespace: &str,
        leader_election: bool,
        env: &[(&str, &str)],
    ) -> Result<Operator> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let election = leader_election.to_string();
        let mut op = Operator::start_with_env(
            cluster,
            &format!("{namespace}-{id}"),
            &[
                "--identity",
                id,
                "--http-addr",
                &addr,
                "--watch-namespace",
                namespace,
                "--lease-namespace",
                namespace,
                "--leader-election",
                &election,
            ],
            env,
        )?;
        op.http_port = Some(port);
        Ok(op)
    }

    /// The operator's /metrics text (replicas from [`Operator::start_in`] only).
    pub fn metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        let port = self
            .http_port
            .context("this operator was not started with start_in")?;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    /// One sample of a metric without labels from /metrics (0 when absent).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then reap: no shutdown code runs (a crash mid-reconcile).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful stop); does not wait.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The operator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}
