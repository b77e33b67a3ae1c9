//! `r1serve`: run DeepSeek-R1-family models.

mod bench;
mod generate;
mod inspect;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "r1serve", version, about = "Inference engine for the DeepSeek-R1 family")]
struct Cli {
    /// Worker threads for the kernels (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// Describe a model from its config (and weights, if given).
    Inspect(inspect::InspectArgs),
    /// Measure prompt-processing and decode speed against the memory roofline.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Model directory argument shared by subcommands.
pub(crate) fn model_dir(path: &Path) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(path.is_dir(), "model directory {} does not exist", path.display());
    Ok(path.to_path_buf())
}
