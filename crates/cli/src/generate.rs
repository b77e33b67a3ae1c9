//! `r1serve generate`: one prompt, one continuation, as text or JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use r1serve_chat::IncrementalDecoder;
use r1serve_engine::{generate, GenerateRequest, SamplingParams};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// HuggingFace model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text, tokenized with the model's tokenizer.json (special tokens such as BOS added).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given (no BOS added).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    max_tokens: usize,
    /// 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// 0 disables the top-k cut.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Report this many most likely tokens at each generated position.
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Also report each prompt token's log-probability given the ones before it.
    #[arg(long)]
    echo: bool,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    format: OutputFormat,
    /// Convert the weights to this format at load (f32, bf16, f16, q8_0, q4_0, q4_k, q6_k).
    #[arg(long, value_parser = crate::parse_quant)]
    quant: Option<r1serve_kernels::WeightFormat>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let dir = crate::model_dir(&args.model)?;
    let tokenizer = r1serve_server::load_tokenizer(&dir)?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let Some(tokenizer) = &tokenizer else {
                bail!(
                    "{} has no tokenizer.json: pass --prompt-ids instead of --prompt",
                    dir.display()
                );
            };
            tokenizer.encode(text, true)?
        }
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let options = crate::load_options(r1serve_model::LoadFormat::Auto, args.quant);
    let model = r1serve_model::load_model_with(&r1serve_model::ModelDir::open(&dir)?, &options, crate::cpu_backend())
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    let request = GenerateRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_token_ids: if args.ignore_eos {
            Vec::new()
        } else {
            model.info().eos_token_ids.clone()
        },
        top_logprobs: args.top_logprobs,
        echo: args.echo,
        kv_cache_dtype: crate::kv_cache_dtype(model.as_ref()),
    };

    let stream_text = matches!(args.format, OutputFormat::Text);
    let mut decoder = tokenizer.as_ref().map(|t| IncrementalDecoder::new(t, false));
    let mut stdout = std::io::stdout().lock();
    let mut stream_error = None;
    let output = generate(model.as_ref(), &request, |token| {
        if !stream_text {
            return;
        }
        let piece = match decoder.as_mut() {
            Some(d) => d.push(token).map_err(anyhow::Error::from),
            None => Ok(format!("{token} ")),
        };
        match piece.and_then(|p| write!(stdout, "{p}").and_then(|_| stdout.flush()).map_err(Into::into)) {
            Ok(()) => {}
            Err(e) => stream_error = stream_error.take().or(Some(e)),
        }
    })?;
    if let Some(e) = stream_error {
        return Err(e);
    }

    match args.format {
        OutputFormat::Text => {
            if let Some(d) = decoder.as_mut() {
                write!(stdout, "{}", d.finish()?)?;
            }
            writeln!(stdout)?;
        }
        OutputFormat::Json => {
            let text = match &tokenizer {
                Some(t) => Some(t.decode(&output.tokens, false)?),
                None => None,
            };
            let mut object = json!({
                "tokens": output.tokens,
                "text": text,
                "finish_reason": output.finish_reason.as_str(),
                "logprobs": output.token_logprobs,
            });
            if let Some(prompt_logprobs) = &output.prompt_logprobs {
                object["prompt_logprobs"] = json!(prompt_logprobs);
            }
            if args.top_logprobs > 0 {
                object["top_logprobs"] = json!(output
                    .top_logprobs
                    .iter()
                    .map(|alts| alts.iter().map(|&(id, lp)| json!([id, lp])).collect::<Vec<_>>())
                    .collect::<Vec<_>>());
            }
            writeln!(stdout, "{object}")?;
        }
    }
    Ok(())
}
