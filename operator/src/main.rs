use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", sparsemoe_api::crd_yaml()),
    }
    Ok(())
}
