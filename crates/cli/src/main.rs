//! `r1serve`: run DeepSeek-R1-family models.

mod bench;
mod chat;
mod default_model;
mod eval;
mod eval_input;
mod generate;
mod inspect;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use r1serve_kernels::{CpuBackend, KvCacheDtype, MatmulPrecision};

#[derive(Parser)]
#[command(name = "r1serve", version, about = "Inference engine for the DeepSeek-R1 family")]
struct Cli {
    /// Worker threads for the kernels (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    /// Do not keep a packed copy of the quantised and BF16 weights for the GEMMs (the copy is
    /// about as large as the weights): less memory, slower batched decode and BF16 decode.
    #[arg(long = "no-repack", global = true)]
    no_repack: bool,
    /// Read weight files into memory instead of mapping them (slower start, memory not shared
    /// with the page cache; huge pages where the kernel allows, for faster `Q4_K`/`Q6_K` decode).
    #[arg(long = "no-mmap", global = true)]
    no_mmap: bool,
    /// Precision of the products with BF16 and FP8 weights: `auto` (or `bfloat16`) rounds the
    /// activations to BF16 as llama.cpp and PyTorch's bf16 inference do (BF16 instructions, about
    /// twice the speed); `float32` keeps them f32, so every product is exact.
    #[arg(long, global = true, value_enum, default_value_t = Dtype::Auto)]
    dtype: Dtype,
    /// How the KV cache stores keys and values: `auto` is `float16` (llama.cpp's default: half
    /// the memory, and half the cache bytes each decoded token reads) except for float32
    /// models, which keep `float32` (every value exactly as computed).
    #[arg(long = "kv-cache-dtype", global = true, value_enum, default_value_t = KvDtype::Auto)]
    kv_cache_dtype: KvDtype,
    #[command(subcommand)]
    command: Command,
}

/// `--dtype`: vLLM's flag name; the weights keep their stored format either way.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Dtype {
    Auto,
    Bfloat16,
    #[value(alias = "float")]
    Float32,
}

/// `--kv-cache-dtype` (vLLM's flag name).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum KvDtype {
    Auto,
    #[value(alias = "fp16", alias = "f16", alias = "half")]
    Float16,
    #[value(alias = "fp32", alias = "f32")]
    Float32,
}

static MATMUL_PRECISION: std::sync::OnceLock<MatmulPrecision> = std::sync::OnceLock::new();
static KV_CACHE_DTYPE: std::sync::OnceLock<KvDtype> = std::sync::OnceLock::new();

/// The KV cache dtype `--kv-cache-dtype` chose for `model`.
pub(crate) fn kv_cache_dtype(model: &dyn r1serve_model::CausalLm) -> KvCacheDtype {
    match KV_CACHE_DTYPE.get().copied().unwrap_or(KvDtype::Auto) {
        KvDtype::Float16 => KvCacheDtype::F16,
        KvDtype::Float32 => KvCacheDtype::F32,
        KvDtype::Auto if model.weight_format() == "F32" => KvCacheDtype::F32,
        KvDtype::Auto => KvCacheDtype::F16,
    }
}

/// The CPU backend with the precision `--dtype` chose.
pub(crate) fn cpu_backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new(MATMUL_PRECISION.get().copied().unwrap_or_default()))
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// Describe a model from its config (and weights, if given).
    Inspect(inspect::InspectArgs),
    /// Measure prompt-processing and decode speed against the memory roofline.
    Bench(bench::BenchArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Chat with a model in the terminal.
    Chat(chat::ChatArgs),
    /// Score a model on a JSONL file of arithmetic problems (and against reference replies).
    Eval(eval::EvalArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The server logs a line per request by default; the one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,r1serve=info,r1serve_server=info,r1serve_engine=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        // colour codes only on a terminal: redirected logs stay plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(threads) = cli.threads {
        r1serve_kernels::cpu::pool::set_threads(threads);
    }
    r1serve_kernels::cpu::set_weight_repacking(!cli.no_repack);
    r1serve_model::set_memory_mapping(!cli.no_mmap);
    let precision = match cli.dtype {
        Dtype::Auto | Dtype::Bfloat16 => MatmulPrecision::Bf16,
        Dtype::Float32 => MatmulPrecision::F32,
    };
    MATMUL_PRECISION.get_or_init(|| precision);
    KV_CACHE_DTYPE.get_or_init(|| cli.kv_cache_dtype);
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Eval(args) => eval::run(args),
    }
}

/// `--quant NAME` → a weight format, naming the accepted ones on error.
pub(crate) fn parse_quant(name: &str) -> Result<r1serve_kernels::WeightFormat, String> {
    r1serve_model::parse_weight_format(name).ok_or_else(|| {
        format!(
            "unknown format `{name}` (supported: {})",
            r1serve_model::WEIGHT_FORMAT_NAMES
        )
    })
}

/// Load options with in-situ conversion to `quant` and a progress spinner on stderr.
pub(crate) fn load_options(
    format: r1serve_model::LoadFormat,
    quant: Option<r1serve_kernels::WeightFormat>,
) -> r1serve_model::LoadOptions {
    let progress = quant.map(|format| {
        let bar =
            indicatif::ProgressBar::new_spinner().with_message(format!("converting weights to {}", format.name()));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} matrices [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        let callback: r1serve_model::weights::ProgressFn =
            std::sync::Arc::new(move |done| bar.set_position(done as u64));
        callback
    });
    r1serve_model::LoadOptions {
        format,
        quant,
        progress,
    }
}

/// `--model` argument shared by subcommands: a model directory or a `.gguf` file.
pub(crate) fn model_dir(path: &Path) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        path.is_dir() || (path.is_file() && r1serve_model::gguf::is_gguf_path(path)),
        "model {} does not exist (give a model directory or a .gguf file)",
        path.display()
    );
    Ok(path.to_path_buf())
}
