//! `r1serve chat`: a conversation in the terminal. Each line read is a user turn; the reply is
//! streamed as it is generated, thinking dimmed (or between `<think>` lines when colour is off, so
//! a piped transcript stays readable) and the answer plain.
//!
//! It runs the server's own pipeline on one sequence: the model's chat template, the engine (with
//! the thinking-budget hook), and `SeqProcessor` for detokenizing and splitting the reasoning, so
//! a chat here reads exactly as `/v1/chat/completions` would answer it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use r1serve_chat::{prompt_opens_thinking, ChatMessage, RenderOptions};
use r1serve_engine::{EngineConfig, Request, SamplingParams};
use r1serve_server::params::thinking_hook;
use r1serve_server::seq::{SeqDelta, SeqOptions, SeqProcessor};
use r1serve_server::ModelContext;
use serde_json::Value;

#[derive(Clone, Copy, ValueEnum)]
pub enum ColorChoice {
    /// When stdout is a terminal and `NO_COLOR` is unset.
    Auto,
    Always,
    Never,
}

#[derive(Args)]
pub struct ChatArgs {
    /// Model directory or .gguf file (default: the embedded r1-tiny).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most (fewer when the conversation nears the context).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Default: the model's generation_config.json, else greedy.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Nucleus cut (default: the model's generation_config.json, else 1, no cut).
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// 0 disables the top-k cut.
    #[arg(long)]
    top_k: Option<usize>,
    /// Makes sampled replies reproducible.
    #[arg(long)]
    seed: Option<u64>,
    /// Reasoning tokens at most before `</think>` is forced.
    #[arg(long)]
    thinking_budget: Option<u32>,
    /// Print only the answers.
    #[arg(long)]
    hide_thinking: bool,
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
}

/// What stays the same for every turn.
struct Session {
    ctx: ModelContext,
    sampling: SamplingParams,
    max_tokens: usize,
    thinking_budget: Option<u32>,
    style: Style,
}

#[derive(Clone, Copy)]
struct Style {
    color: bool,
    hide_thinking: bool,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let path = crate::default_model::resolve(args.model.as_deref())?;
    let model_dir =
        r1serve_model::ModelDir::open(&path).with_context(|| format!("cannot open the model {}", path.display()))?;
    let sampling = sampling(&args, model_dir.generation_config.as_ref());
    sampling.validate()?;
    let summary = r1serve_model::summarize(&model_dir, false)?;
    let config = EngineConfig {
        max_num_seqs: 1,
        ..EngineConfig::default()
    };
    let ctx = crate::serve::load_context(&path, None, config)?;
    let color = match args.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    // Writes go through `?`, not `println!`: a closed pipe (`| head`) ends the chat, not a panic.
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} · {} · {} parameters · context {} tokens",
        crate::default_model::display_name(args.model.as_deref()),
        summary.architecture,
        crate::inspect::billions(summary.params_total),
        ctx.engine().limits().max_model_len,
    )?;
    writeln!(out, "type /exit to quit, /clear to start a new conversation")?;
    let session = Session {
        ctx,
        sampling,
        max_tokens: args.max_tokens,
        thinking_budget: args.thinking_budget,
        style: Style {
            color,
            hide_thinking: args.hide_thinking,
        },
    };
    repl(&session, args.system.as_deref(), &mut out)
}

/// Sampling from the flags over the model's defaults.
fn sampling(args: &ChatArgs, generation_config: Option<&Value>) -> SamplingParams {
    let defaults = generation_defaults(generation_config);
    SamplingParams {
        temperature: args.temperature.unwrap_or(defaults.temperature),
        top_p: args.top_p.unwrap_or(defaults.top_p),
        top_k: args.top_k.unwrap_or(defaults.top_k),
        seed: args.seed,
        ..defaults
    }
}

/// The sampling a model's generation_config.json asks for, with transformers' reading of
/// `do_sample` (false: greedy whatever the temperature); greedy when the file says nothing.
fn generation_defaults(generation_config: Option<&Value>) -> SamplingParams {
    let file = |key: &str| generation_config.and_then(|g| g.get(key));
    let float = |key: &str| file(key).and_then(Value::as_f64).map(|v| v as f32);
    let temperature = match file("do_sample").and_then(Value::as_bool) {
        Some(false) => Some(0.0),
        Some(true) => Some(float("temperature").unwrap_or(1.0)),
        None => float("temperature"),
    };
    let defaults = SamplingParams::default();
    SamplingParams {
        temperature: temperature.unwrap_or(defaults.temperature),
        top_p: float("top_p").unwrap_or(defaults.top_p),
        top_k: file("top_k")
            .and_then(Value::as_u64)
            .map_or(defaults.top_k, |k| k as usize),
        min_p: float("min_p").unwrap_or(defaults.min_p),
        repetition_penalty: float("repetition_penalty").unwrap_or(defaults.repetition_penalty),
        ..defaults
    }
}

/// Reads turns until `/exit` or end of input.
fn repl(session: &Session, system: Option<&str>, out: &mut impl Write) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let opening: Vec<ChatMessage> = system.map(|s| ChatMessage::new("system", s)).into_iter().collect();
    let mut history = opening.clone();
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        if interactive {
            write!(out, "> ")?;
            out.flush()?;
        }
        line.clear();
        if stdin.read_until(b'\n', &mut line).context("cannot read stdin")? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                history.clone_from(&opening);
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", text));
        match reply(session, &history, out) {
            Ok(content) => history.push(ChatMessage::new("assistant", content)),
            // Stdout is gone: nobody reads the rest.
            Err(e) if e.is::<std::io::Error>() => return Err(e.context("cannot write the reply")),
            Err(e) => {
                // The turn is forgotten, so the user can rephrase or /clear.
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    if interactive {
        writeln!(out)?;
    }
    Ok(())
}

/// Generates and prints one reply; returns its answer (what the next turn's history holds).
fn reply(session: &Session, history: &[ChatMessage], out: &mut impl Write) -> anyhow::Result<String> {
    let ctx = &session.ctx;
    let options = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    let prompt = ctx.template().render(history, &options)?;
    let started_in_thinking = prompt_opens_thinking(&prompt);
    let ids = ctx.tokenizer().encode(&prompt, false)?;
    let limits = ctx.engine().limits();
    let kv_tokens = limits.num_blocks.saturating_mul(limits.block_size).saturating_add(1);
    let room = limits.max_model_len.min(kv_tokens).saturating_sub(ids.len());
    anyhow::ensure!(
        room > 0,
        "the conversation is {} tokens, which fills the model's context of {} tokens: /clear to start again",
        ids.len(),
        limits.max_model_len
    );
    let max_tokens = session.max_tokens.min(room);
    let mut request = Request::new(ids, max_tokens);
    request.sampling = session.sampling.clone();
    request.hook = thinking_hook(ctx, session.thinking_budget, started_in_thinking);
    let (_, mut events) = ctx.engine().submit(request)?;
    let mut processor = SeqProcessor::new(
        Arc::clone(ctx.tokenizer()),
        SeqOptions {
            reasoning: true,
            started_in_thinking,
            hidden_ids: ctx.engine().model_info().eos_token_ids.clone(),
            ..SeqOptions::default()
        },
    )?;
    let mut printer = Printer::new(session.style);
    let mut answer = String::new();
    loop {
        let delta = match events.blocking_recv() {
            Some(event) => processor.on_event(event),
            None => processor.on_closed(),
        };
        printer.show(&delta, out)?;
        answer.push_str(delta.content.as_deref().unwrap_or_default());
        if let Some(finish) = delta.finish {
            printer.end(out)?;
            if let Some(error) = finish.error {
                anyhow::bail!("generation failed: {error}");
            }
            if finish.reason == "length" {
                eprintln!("(reply cut at {max_tokens} tokens: --max-tokens sets the limit)");
            }
            return Ok(answer);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    Nothing,
    Thinking,
    Answer,
}

/// Lays a streamed reply out: thinking first (dimmed, or fenced by `<think>` lines), then the
/// answer, ending on a newline.
struct Printer {
    style: Style,
    shown: Shown,
    /// The last text written ended a line.
    at_line_start: bool,
}

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Printer {
    fn new(style: Style) -> Self {
        Self {
            style,
            shown: Shown::Nothing,
            at_line_start: true,
        }
    }

    fn show(&mut self, delta: &SeqDelta, out: &mut impl Write) -> std::io::Result<()> {
        if let Some(text) = delta.reasoning.as_deref().filter(|_| !self.style.hide_thinking) {
            if self.shown == Shown::Nothing {
                out.write_all(if self.style.color { DIM } else { "<think>\n" }.as_bytes())?;
                self.shown = Shown::Thinking;
            }
            self.write(text, out)?;
        }
        if let Some(text) = &delta.content {
            self.close_thinking(out)?;
            self.shown = Shown::Answer;
            self.write(text, out)?;
        }
        out.flush()
    }

    fn end(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        self.close_thinking(out)?;
        if !self.at_line_start {
            out.write_all(b"\n")?;
        }
        out.flush()
    }

    fn close_thinking(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.shown != Shown::Thinking {
            return Ok(());
        }
        if !self.at_line_start {
            out.write_all(b"\n")?;
        }
        if self.style.color {
            writeln!(out, "{RESET}")?;
        } else {
            out.write_all(b"</think>\n")?;
        }
        self.at_line_start = true;
        self.shown = Shown::Nothing;
        Ok(())
    }

    fn write(&mut self, text: &str, out: &mut impl Write) -> std::io::Result<()> {
        if !text.is_empty() {
            out.write_all(text.as_bytes())?;
            self.at_line_start = text.ends_with('\n');
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(style: Style, deltas: &[(Option<&str>, Option<&str>)]) -> String {
        let mut out = Vec::new();
        let mut printer = Printer::new(style);
        for (reasoning, content) in deltas {
            let delta = SeqDelta {
                reasoning: reasoning.map(str::to_owned),
                content: content.map(str::to_owned),
                ..SeqDelta::default()
            };
            printer.show(&delta, &mut out).unwrap();
        }
        printer.end(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    const PLAIN: Style = Style {
        color: false,
        hide_thinking: false,
    };

    #[test]
    fn plain_transcript_fences_the_thinking() {
        let deltas = [(Some("add "), None), (Some("them.\n"), None), (None, Some("1 + 2 = 3"))];
        assert_eq!(render(PLAIN, &deltas), "<think>\nadd them.\n</think>\n1 + 2 = 3\n");
        let color = Style { color: true, ..PLAIN };
        assert_eq!(render(color, &deltas), format!("{DIM}add them.\n{RESET}\n1 + 2 = 3\n"));
        let hidden = Style {
            hide_thinking: true,
            ..PLAIN
        };
        assert_eq!(render(hidden, &deltas), "1 + 2 = 3\n");
    }

    #[test]
    fn generation_config_sets_the_defaults() {
        let greedy = generation_defaults(Some(&serde_json::json!({"do_sample": false, "temperature": 0.6})));
        assert_eq!(greedy, SamplingParams::default());
        assert_eq!(generation_defaults(None), SamplingParams::default());
        let r1 = generation_defaults(Some(
            &serde_json::json!({"do_sample": true, "temperature": 0.6, "top_p": 0.95}),
        ));
        assert_eq!((r1.temperature, r1.top_p, r1.top_k), (0.6, 0.95, 0));
        let bare = generation_defaults(Some(&serde_json::json!({"do_sample": true})));
        assert_eq!(bare.temperature, 1.0);
    }

    #[test]
    fn a_reply_cut_inside_thinking_still_closes_it() {
        assert_eq!(render(PLAIN, &[(Some("hmm"), None)]), "<think>\nhmm\n</think>\n");
        assert_eq!(render(PLAIN, &[]), "");
    }
}
