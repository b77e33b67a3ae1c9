//! `r1serve bench`: prompt-processing and decode speed, in the spirit of `llama-bench`, reported
//! against the machine's measured read bandwidth (the decode roofline).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use r1serve_kernels::cpu::bandwidth::ReadProbe;
use r1serve_kernels::PagedKvCache;
use r1serve_model::{load_model_with, Batch, CausalLm, LoadFormat, LogitsWanted, ModelDir, SeqInput};
use serde::Serialize;

const BLOCK_SIZE: usize = 16;
/// Context tokens filled per forward pass (`-d`): a server's prefill chunk, so a deep context
/// costs no more scratch memory than serving it would.
const DEPTH_CHUNK: usize = 512;
/// Large enough to defeat the caches of any CPU this runs on (held for the whole run, next to
/// the model, so that each sample costs only its reads).
const BANDWIDTH_BUFFER_BYTES: usize = 1 << 30;
/// Passes over the probe's buffer per bandwidth sample: one sample before and one after each
/// timed decode, or one of this many passes when nothing decodes.
const PASSES_PER_SAMPLE: usize = 2;
const PASSES_WITHOUT_DECODE: usize = 5;

#[derive(Clone, Copy, ValueEnum)]
pub enum LoadFormatArg {
    /// Read the weights from the model directory.
    Auto,
    /// Random weights of the right shapes and formats (no files needed).
    Dummy,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A config.json alone (use with `--load-format dummy`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LoadFormatArg::Auto)]
    load_format: LoadFormatArg,
    /// Convert the weights to this format at load (f32, bf16, f16, q8_0, q4_0, q4_k, q6_k).
    #[arg(long, value_parser = crate::parse_quant)]
    quant: Option<r1serve_kernels::WeightFormat>,
    /// Prompt tokens processed in one batch (pp); 0 skips the test, as in llama-bench.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 64)]
    n_prompt: usize,
    /// Tokens decoded one at a time (tg); 0 skips the test.
    #[arg(short = 'n', long = "n-gen", default_value_t = 32)]
    n_gen: usize,
    /// Tokens of context already in the KV cache when each test starts (llama-bench's `-d`):
    /// decode and prefill speed at a conversation's or a reasoning trace's length.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    n_depth: usize,
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Also decode this many sequences together in one batch per step (aggregate tokens/s).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    architecture: String,
    weight_format: String,
    kv_cache_dtype: &'static str,
    threads: usize,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    repetitions: usize,
    /// `null` for a test skipped with `-p 0` / `-n 0`.
    pp_tps: Option<f64>,
    pp_tps_min: Option<f64>,
    pp_tps_max: Option<f64>,
    tg_tps: Option<f64>,
    tg_tps_min: Option<f64>,
    tg_tps_max: Option<f64>,
    /// What one decoded token reads: the weights it multiplies by, and the KV cache entries its
    /// attention reads (the mean over the tg run's positions: `n_depth + (n_gen + 1) / 2`).
    bytes_per_token: u64,
    weight_bytes_per_token: u64,
    kv_cache_bytes_per_token: u64,
    /// The median of the bandwidth samples taken next to the timed decodes (the bandwidth left
    /// to this process moves on a shared machine), and their spread.
    read_bandwidth_gbs: f64,
    read_bandwidth_gbs_min: f64,
    read_bandwidth_gbs_max: f64,
    roofline_tps: f64,
    roofline_fraction: Option<f64>,
    /// With `--batch B`: sequences decoded together, their aggregate tokens/s, and the ratio to
    /// one sequence's tokens/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tg_batch_tps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_speedup: Option<f64>,
}

/// `(median, min, max)`, or `None` for a test not run.
fn median(mut xs: Vec<f64>) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let mid = if xs.len() % 2 == 1 {
        xs[xs.len() / 2]
    } else {
        (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0
    };
    Some((mid, xs[0], xs[xs.len() - 1]))
}

/// Deterministic token ids spread over the vocabulary (content does not change the cost).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// The KV cache the timed tests run in, `depth` tokens of context filled once (llama-bench's
/// `-d`): every test writes positions from `depth` on only, so each repetition finds the same
/// context. The context's full blocks are shared by the sequences (as a cached prefix is); each
/// sequence holds the rest of its positions in blocks of its own.
struct FilledContext {
    cache: PagedKvCache,
    depth: usize,
    /// Each sequence's block table.
    tables: Vec<Vec<u32>>,
    /// The last forward's logits, the buffer kept across passes.
    logits: Vec<f32>,
}

impl FilledContext {
    /// Room for `depth` tokens plus `tokens` more in each of `streams` sequences, the context
    /// filled.
    fn fill(model: &dyn CausalLm, depth: usize, tokens: usize, streams: usize) -> anyhow::Result<Self> {
        let full = depth / BLOCK_SIZE;
        let own_blocks = (depth % BLOCK_SIZE + tokens).div_ceil(BLOCK_SIZE).max(1);
        let mut context = FilledContext {
            cache: PagedKvCache::with_dtype(
                BLOCK_SIZE,
                full + streams * own_blocks,
                &model.kv_entry_widths(),
                crate::kv_cache_dtype(model),
            ),
            depth,
            tables: (0..streams)
                .map(|s| {
                    let own = (0..own_blocks).map(|b| full + s * own_blocks + b);
                    (0..full).chain(own).map(|b| b as u32).collect()
                })
                .collect(),
            logits: Vec::new(),
        };
        let ids = prompt_ids(depth, model.info().vocab_size);
        // The first sequence fills the whole context; the others only their own part of it.
        for stream in 0..streams {
            let from = if stream == 0 { 0 } else { full * BLOCK_SIZE };
            let mut start = from;
            while start < depth {
                let end = (start + DEPTH_CHUNK).min(depth);
                context.forward(model, stream, &ids[start..end], start, LogitsWanted::None)?;
                start = end;
            }
        }
        Ok(context)
    }

    fn forward(
        &mut self,
        model: &dyn CausalLm,
        stream: usize,
        tokens: &[u32],
        start_pos: usize,
        logits: LogitsWanted,
    ) -> anyhow::Result<()> {
        let seq = SeqInput {
            tokens,
            start_pos,
            block_table: &self.tables[stream],
            logits,
        };
        model.forward(&Batch::single(seq), &mut self.cache, &mut self.logits)?;
        Ok(())
    }
}

/// Processes `n` prompt tokens after the context in one batch; returns tokens/s.
fn time_prefill(model: &dyn CausalLm, context: &mut FilledContext, n: usize) -> anyhow::Result<f64> {
    let tokens = prompt_ids(n, model.info().vocab_size);
    let start = Instant::now();
    context.forward(model, 0, &tokens, context.depth, LogitsWanted::Last)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Decodes `n` tokens after the context in each of `streams` sequences, one token per sequence
/// per step, all in one batch; returns the aggregate tokens/s.
fn time_decode(model: &dyn CausalLm, context: &mut FilledContext, n: usize, streams: usize) -> anyhow::Result<f64> {
    let FilledContext {
        cache,
        depth,
        tables,
        logits,
    } = context;
    let tokens = prompt_ids(n + streams, model.info().vocab_size);
    let start = Instant::now();
    for pos in 0..n {
        let seqs = tables[..streams]
            .iter()
            .enumerate()
            .map(|(s, table)| SeqInput {
                tokens: std::slice::from_ref(&tokens[pos + s]),
                start_pos: *depth + pos,
                block_table: table,
                logits: LogitsWanted::Last,
            })
            .collect();
        model.forward(&Batch { seqs }, cache, logits)?;
    }
    Ok((n * streams) as f64 / start.elapsed().as_secs_f64())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (dir, name) = match (&args.model, &args.config) {
        (Some(model), _) => (ModelDir::open(crate::model_dir(model)?)?, model.display().to_string()),
        (None, Some(config)) => {
            if !matches!(args.load_format, LoadFormatArg::Dummy) {
                bail!("--config has no weights: add --load-format dummy");
            }
            (ModelDir::from_config_file(config)?, config.display().to_string())
        }
        (None, None) => bail!("give --model DIR or --config config.json --load-format dummy"),
    };
    if args.repetitions == 0 || args.batch == 0 {
        bail!("--repetitions and --batch must be at least 1");
    }
    if args.n_prompt == 0 && args.n_gen == 0 {
        bail!("nothing to measure: -p and -n are both 0");
    }
    if args.batch > 1 && args.n_gen == 0 {
        bail!(
            "--batch {} decodes sequences together: it needs -n of at least 1",
            args.batch
        );
    }
    let format = match args.load_format {
        LoadFormatArg::Auto => LoadFormat::Auto,
        LoadFormatArg::Dummy => LoadFormat::Dummy { seed: 0 },
    };
    let options = crate::load_options(format, args.quant);
    let load_start = Instant::now();
    let model = load_model_with(&dir, &options, crate::cpu_backend()).with_context(|| format!("cannot load {name}"))?;
    tracing::info!(seconds = load_start.elapsed().as_secs_f64(), "model loaded");
    let context_length = model.info().max_position_embeddings;
    let after_depth = args.n_prompt.max(args.n_gen).max(2);
    if args.n_depth.saturating_add(after_depth) > context_length {
        bail!(
            "-d {} with -p {} / -n {} exceeds the model's context of {context_length} tokens",
            args.n_depth,
            args.n_prompt,
            args.n_gen
        );
    }

    let probe = ReadProbe::new(BANDWIDTH_BUFFER_BYTES);
    let mut bandwidth = Vec::new();
    // One untimed pass of each warms the pages of a memory-mapped or freshly generated model
    // (and builds the kernels' packed weights, MoE experts included, as `serve` does at load).
    model.prepare_weights();
    let fill_start = Instant::now();
    let mut context = FilledContext::fill(model.as_ref(), args.n_depth, after_depth, args.batch)?;
    tracing::info!(
        tokens = args.n_depth,
        seconds = fill_start.elapsed().as_secs_f64(),
        "context filled"
    );
    time_prefill(model.as_ref(), &mut context, args.n_prompt.clamp(1, 8))?;
    time_decode(model.as_ref(), &mut context, 2, 1)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut tg_batch = Vec::new();
    for _ in 0..args.repetitions {
        if args.n_prompt > 0 {
            pp.push(time_prefill(model.as_ref(), &mut context, args.n_prompt)?);
        }
        if args.n_gen > 0 {
            bandwidth.push(probe.sample(PASSES_PER_SAMPLE));
            tg.push(time_decode(model.as_ref(), &mut context, args.n_gen, 1)?);
            bandwidth.push(probe.sample(PASSES_PER_SAMPLE));
        }
        if args.batch > 1 {
            tg_batch.push(time_decode(model.as_ref(), &mut context, args.n_gen, args.batch)?);
        }
    }
    if bandwidth.is_empty() {
        bandwidth.push(probe.sample(PASSES_WITHOUT_DECODE));
    }
    drop(probe);
    let (pp, tg, batched) = (median(pp), median(tg), median(tg_batch));
    let (read_bandwidth_gbs, read_bandwidth_gbs_min, read_bandwidth_gbs_max) =
        median(bandwidth).expect("at least one bandwidth sample");
    let weight_bytes_per_token = model.weight_bytes_per_token();
    // Token `depth + i` attends to `depth + i + 1` entries.
    let mean_entries = args.n_depth as f64 + (args.n_gen as f64 + 1.0) / 2.0;
    let kv_cache_bytes_per_token = (context.cache.bytes_per_token() as f64 * mean_entries).round() as u64;
    let bytes_per_token = weight_bytes_per_token + kv_cache_bytes_per_token;
    let roofline_tps = read_bandwidth_gbs * 1e9 / bytes_per_token as f64;
    let report = Report {
        model: name,
        architecture: model.info().architecture.clone(),
        weight_format: model.weight_format().to_owned(),
        kv_cache_dtype: context.cache.dtype().name(),
        threads: r1serve_kernels::cpu::pool::threads(),
        n_prompt: args.n_prompt,
        n_gen: args.n_gen,
        n_depth: args.n_depth,
        repetitions: args.repetitions,
        pp_tps: pp.map(|(m, _, _)| m),
        pp_tps_min: pp.map(|(_, lo, _)| lo),
        pp_tps_max: pp.map(|(_, _, hi)| hi),
        tg_tps: tg.map(|(m, _, _)| m),
        tg_tps_min: tg.map(|(_, lo, _)| lo),
        tg_tps_max: tg.map(|(_, _, hi)| hi),
        bytes_per_token,
        weight_bytes_per_token,
        kv_cache_bytes_per_token,
        read_bandwidth_gbs,
        read_bandwidth_gbs_min,
        read_bandwidth_gbs_max,
        roofline_tps,
        roofline_fraction: tg.map(|(m, _, _)| m / roofline_tps),
        batch: batched.map(|_| args.batch),
        tg_batch_tps: batched.map(|(m, _, _)| m),
        batch_speedup: batched.zip(tg).map(|((b, _, _), (one, _, _))| b / one),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("| model | format | threads | test | tokens/s (median) | min | max |\n|---|---|---|---|---|---|---|");
        let at_depth = match args.n_depth {
            0 => String::new(),
            d => format!(" @ d{d}"),
        };
        let rows = [
            (format!("pp{}{at_depth}", args.n_prompt), pp),
            (format!("tg{}{at_depth}", args.n_gen), tg),
            (
                format!("tg{}{at_depth} x{} (aggregate)", args.n_gen, args.batch),
                batched,
            ),
        ];
        for (test, (m, lo, hi)) in rows.into_iter().filter_map(|(test, r)| Some((test, r?))) {
            println!(
                "| {} | {} | {} | {test} | {m:.2} | {lo:.2} | {hi:.2} |",
                report.model, report.weight_format, report.threads
            );
        }
        print!(
            "\nread per decoded token: {:.1} MiB of weights + {:.1} MiB of {} KV cache; read bandwidth: {:.1} GB/s ({:.1}–{:.1}); roofline: {:.2} tokens/s",
            weight_bytes_per_token as f64 / (1 << 20) as f64,
            kv_cache_bytes_per_token as f64 / (1 << 20) as f64,
            report.kv_cache_dtype,
            read_bandwidth_gbs,
            read_bandwidth_gbs_min,
            read_bandwidth_gbs_max,
            roofline_tps,
        );
        match report.roofline_fraction {
            Some(fraction) => println!("; tg at {:.0}% of the roofline", 100.0 * fraction),
            None => println!(),
        }
    }
    Ok(())
}
