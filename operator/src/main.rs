use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sparsemoe_operator::placement::{LoadsFile, plan_from_file};
use sparsemoe_operator::run::{RunConfig, run};

/// sparsemoe-operator: serves sparse-attention MoE models on Kubernetes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the InferenceDeployment CRD as YAML (`kubectl apply -f -` installs it).
    Crd,
    /// Run the controller (leader election, /metrics, /healthz, /readyz).
    Run {
        /// Address of the /metrics, /healthz and /readyz endpoints.
        #[arg(long, env = "SPARSEMOE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
        http_addr: SocketAddr,
        /// Elect a leader on a coordination.k8s.io Lease (needed when more than one replica runs).
        #[arg(long, env = "SPARSEMOE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Name of the Lease.
        #[arg(
            long,
            env = "SPARSEMOE_LEASE_NAME",
            default_value = "sparsemoe-operator"
        )]
        lease_name: String,
        /// Namespace of the Lease (default: the operator's own namespace).
        #[arg(long, env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// This replica's identity in the Lease (default: the pod name, else the host name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "SPARSEMOE_WATCH_NAMESPACE")]
        watch_namespace: Option<String>,
        /// Log as JSON lines.
        #[arg(long, env = "SPARSEMOE_LOG_JSON")]
        log_json: bool,
    },
    /// Print the children one InferenceDeployment becomes, as YAML, with no cluster.
    Render {
        /// The InferenceDeployment manifest (YAML); `-` reads standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Render multi-node variants as LeaderWorkerSets, as on a cluster with LWS installed.
        #[arg(long)]
        leader_worker_set: bool,
    },
    /// Print a balanced expert placement plan (JSON) from measured per-expert loads.
    PlanExperts {
        /// JSON: a list of loads (one per expert), a list of such lists (one per decoder
        /// layer, `[]` for a dense one), or {"layers": {"<layer>": [...]}}.
        #[arg(long)]
        loads: PathBuf,
        /// GPUs in one replica.
        #[arg(long)]
        gpus: u32,
        /// Nodes one replica spans.
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        /// Extra expert slots for copies of hot experts.
        #[arg(long, default_value_t = 0)]
        redundant: u32,
    },
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    match execute(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => print!("{}", sparsemoe_api::crd_yaml()),
        Command::Render {
            file,
            leader_worker_set,
        } => {
            let manifest = read(&file)?;
            let yaml = sparsemoe_operator::render::render(&manifest, leader_worker_set)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            print!("{yaml}");
        }
        Command::PlanExperts {
            loads,
            gpus,
            nodes,
            redundant,
        } => {
            let text = read(&loads)?;
            let file: LoadsFile = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: expected a JSON list of per-expert loads, a list of such lists, or {{\"layers\": {{...}}}}: {e}",
                    loads.display()
                )
            })?;
            let plan = plan_from_file(file, gpus, nodes, redundant)?;
            println!("{}", serde_json::to_string_pretty(&plan)?);
        }
        Command::Run {
            http_addr,
            leader_election,
            lease_name,
            lease_namespace,
            identity,
            watch_namespace,
            log_json,
        } => {
            init_tracing(log_json);
            let identity = identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("sparsemoe-operator-{}", std::process::id()));
            let config = RunConfig {
                http_addr,
                leader_election,
                lease_name,
                lease_namespace,
                identity,
                // The chart passes an empty value for "all namespaces".
                watch_namespace: watch_namespace.filter(|ns| !ns.is_empty()),
            };
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")?
                .block_on(run(config))?;
        }
    }
    Ok(())
}
