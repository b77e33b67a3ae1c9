//! `r1serve serve`: the OpenAI-compatible server. Listens first (`/health` answers 503 while the
//! model loads), loads the model on a blocking thread, then serves until SIGINT/SIGTERM: stop
//! accepting, let running requests finish for `--drain-timeout` seconds, abort the rest, exit 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use r1serve_engine::{Engine, EngineConfig, KvCacheSize};
use r1serve_server::{ModelContext, Server, ServerConfig};
use tracing::{error, info, warn};

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Model directory (config.json + safetensors + tokenizer.json) or a .gguf file next to a
    /// tokenizer.json (default: the embedded r1-tiny).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (logged at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The name clients pass as `model` (default: the --model argument, or r1-tiny).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/* (also read from R1SERVE_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences run together at most.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Tokens per engine step at most (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Prompt + output tokens per request at most (default: the model's context).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// KV cache size in MiB (default: 1024), holding entries of `--kv-cache-dtype`.
    #[arg(long)]
    kv_cache_mib: Option<u64>,
    /// Reasoning tokens at most before `</think>` is forced (requests may set `thinking_budget`).
    #[arg(long)]
    reasoning_budget: Option<u32>,
    /// Sequences that may wait for a slot beyond --max-num-seqs; past that, 429.
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// Accept `chat_template` in requests.
    #[arg(long)]
    trust_request_chat_template: bool,
    /// Convert the weights to this format at load (f32, bf16, f16, q8_0, q4_0, q4_k, q6_k).
    #[arg(long, value_parser = crate::parse_quant)]
    quant: Option<r1serve_kernels::WeightFormat>,
    /// Seconds running requests get to finish at shutdown before they are aborted.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("r1serve-http")
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(args));
    // A model still loading on a blocking thread must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig {
        addr: format!("{}:{}", bracket_v6(&args.host), args.port),
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| crate::default_model::display_name(args.model.as_deref())),
        api_key: args
            .api_key
            .clone()
            .or_else(|| std::env::var("R1SERVE_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        max_waiting: args.max_waiting,
        trust_request_chat_template: args.trust_request_chat_template,
        reasoning_budget: args.reasoning_budget,
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await?;
    info!("listening on http://{}", server.local_addr());
    let load_args = args.clone();
    let loading = tokio::task::spawn_blocking(move || load(&load_args));
    let mut signal = std::pin::pin!(shutdown_signal());
    tokio::select! {
        loaded = loading => {
            match loaded.context("the loading thread failed")? {
                Ok(model) => server.set_ready(model)?,
                Err(e) => {
                    error!("cannot load the model: {e:#}");
                    server.shutdown(Duration::ZERO).await?;
                    return Err(e);
                }
            }
        }
        _ = &mut signal => {
            info!("signal received while loading: exiting");
            server.shutdown(Duration::ZERO).await?;
            return Ok(());
        }
    }
    signal.await;
    info!(
        in_flight = server.in_flight(),
        drain_timeout_s = args.drain_timeout,
        "shutting down: no new requests, draining"
    );
    tokio::spawn(async {
        shutdown_signal().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
    server.shutdown(Duration::from_secs(args.drain_timeout)).await?;
    Ok(())
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Resolves the model (`--model` or the embedded one) and loads it with the server's limits.
fn load(args: &ServeArgs) -> anyhow::Result<ModelContext> {
    let path = crate::default_model::resolve(args.model.as_deref())?;
    let mut config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len,
        ..EngineConfig::default()
    };
    if let Some(mib) = args.kv_cache_mib {
        config.kv_cache = KvCacheSize::Bytes(mib.saturating_mul(1 << 20));
    }
    load_context(&path, args.quant, config)
}

/// Loads the weights, tokenizer and template, and starts the engine: what `serve`, `chat` and
/// `eval` all run on.
pub(crate) fn load_context(
    path: &Path,
    quant: Option<r1serve_kernels::WeightFormat>,
    mut config: EngineConfig,
) -> anyhow::Result<ModelContext> {
    let model_dir =
        r1serve_model::ModelDir::open(path).with_context(|| format!("cannot open the model {}", path.display()))?;
    let (tokenizer, template) = r1serve_server::load_text(path)?;
    let Some(tokenizer) = tokenizer else {
        bail!(
            "{} has no tokenizer.json and no tokenizer metadata: chat templates need one",
            path.display()
        );
    };
    let options = crate::load_options(r1serve_model::LoadFormat::Auto, quant);
    let backend = crate::cpu_backend();
    let model = r1serve_model::load_model_with(&model_dir, &options, backend.clone())
        .with_context(|| format!("cannot load the model in {}", path.display()))?;
    config.kv_cache_dtype = crate::kv_cache_dtype(model.as_ref());
    info!(
        weights = model.weight_format(),
        bf16_weight_activations = backend.precision().name(),
        kv_cache = config.kv_cache_dtype.name(),
        threads = r1serve_kernels::cpu::pool::threads(),
        "model loaded"
    );
    if r1serve_kernels::cpu::weight_repacking() {
        let started = std::time::Instant::now();
        match r1serve_engine::warm_up(model.as_ref()) {
            Ok(()) => info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "weights packed for the kernels"
            ),
            Err(e) => warn!(error = %e, "warm-up skipped: the first request packs the weights"),
        }
    }
    let max_num_seqs = config.max_num_seqs;
    let engine = Engine::start(Arc::from(model), config)?;
    info!(
        template = template.name(),
        reasoning = tokenizer.is_reasoning_model(),
        "tokenizer and chat template loaded"
    );
    Ok(ModelContext::new(engine, tokenizer, template, max_num_seqs)?.with_root(path))
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
