//! `r1serve inspect`: a model's shape, size and cache cost, from its config alone if need be.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use r1serve_model::{summarize, ModelDir, ModelSummary};

#[derive(Args)]
pub struct InspectArgs {
    /// Model directory (config.json; weights add the dtype mix).
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A config.json alone.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let (dir, with_weights) = match (&args.model, &args.config) {
        (Some(model), _) => {
            let dir = ModelDir::open(crate::model_dir(model)?)?;
            let has_weights = dir.gguf_path().is_some()
                || ["model.safetensors", "model.safetensors.index.json"]
                    .iter()
                    .any(|f| dir.dir.join(f).exists());
            (dir, has_weights)
        }
        (None, Some(config)) => (ModelDir::from_config_file(config)?, false),
        (None, None) => bail!("give --model DIR or --config config.json"),
    };
    let summary = summarize(&dir, with_weights)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary));
    }
    Ok(())
}

pub(crate) fn billions(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else {
        format!("{:.2}M", n as f64 / 1e6)
    }
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn render(s: &ModelSummary) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22}{v}\n"));
    line("architecture", s.architecture.clone());
    line("layers", s.num_layers.to_string());
    line("hidden size", s.hidden_size.to_string());
    line("vocabulary", s.vocab_size.to_string());
    line("context", format!("{} tokens", s.max_position_embeddings));
    line("parameters", format!("{} total", billions(s.params_total)));
    line("active per token", billions(s.params_active));
    if s.params_mtp > 0 {
        line(
            "MTP layers",
            format!("{} (recognised, not run)", billions(s.params_mtp)),
        );
    }
    line("attention", s.attention.clone());
    let elements = s.kv_elements_per_token;
    line(
        "KV cache per token",
        format!(
            "{elements} values = {} in BF16, {} in F32",
            kib(elements * 2),
            kib(elements * 4)
        ),
    );
    if let Some(m) = &s.moe {
        line(
            "MoE",
            format!(
                "{} routed + {} shared experts, {} per token, expert intermediate {}",
                m.routed_experts, m.shared_experts, m.experts_per_token, m.expert_intermediate_size
            ),
        );
        line("MoE layers", format!("{} MoE + {} dense", m.moe_layers, m.dense_layers));
        line(
            "routing",
            format!(
                "{} scores, {} ({} groups, keep {})",
                m.scoring, m.topk_method, m.n_group, m.topk_group
            ),
        );
    }
    if !s.weight_dtypes.is_empty() {
        let total: usize = s.weight_dtypes.values().sum();
        let mix = s
            .weight_dtypes
            .iter()
            .map(|(dtype, n)| format!("{dtype} {:.1}%", 100.0 * *n as f64 / total.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ");
        line("weight dtypes", mix);
    }
    out
}
