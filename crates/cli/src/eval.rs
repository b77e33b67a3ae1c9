//! `r1serve eval`: accuracy on a JSONL file of arithmetic problems, and agreement with the
//! reference implementation's greedy replies where the file records them. This is the check that
//! the engine runs a model the way `transformers` does, end to end through the chat template,
//! tokenizer and detokenizer, on the model's own task.
//!
//! Every problem is submitted to the batched engine at once (greedy, so batching changes no
//! token); replies are decoded with special tokens kept, as the reference decodes them, and the
//! answer is read after the last `</think>`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use r1serve_chat::{ChatMessage, RenderOptions};
use r1serve_engine::{EngineConfig, FinishReason, Request, TokenEvent};
use r1serve_server::ModelContext;
use serde_json::{json, Value};

use crate::eval_input::{read_problems, Problem};

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory or .gguf file (default: the embedded r1-tiny).
    #[arg(long)]
    model: Option<PathBuf>,
    /// JSONL, one problem per line: `prompt` (the user message), `answer` (an integer), and
    /// optionally `kind`, `reply_token_ids` and `parsed` (the reference's reply and answer).
    #[arg(long)]
    problems: PathBuf,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// Tokens per reply at most.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Exit non-zero when the accuracy is below this fraction.
    #[arg(long)]
    min_accuracy: Option<f64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Sequences decoded together at most.
const MAX_BATCH: usize = 256;

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let problems = read_problems(&args.problems, args.limit)?;
    let path = crate::default_model::resolve(args.model.as_deref())?;
    let ctx = crate::serve::load_context(
        &path,
        None,
        EngineConfig {
            max_num_seqs: problems.len().clamp(1, MAX_BATCH),
            ..EngineConfig::default()
        },
    )?;
    let started = Instant::now();
    let replies = generate_all(&ctx, &problems, args.max_tokens, &args.problems)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut total = Tally::default();
    let mut per_kind: BTreeMap<String, Tally> = BTreeMap::new();
    for (problem, ids) in problems.iter().zip(&replies) {
        let text = ctx.tokenizer().decode(ids, false)?;
        let outcome = Outcome::of(problem, ids, &text);
        total.add(&outcome);
        if let Some(kind) = &problem.kind {
            per_kind.entry(kind.clone()).or_default().add(&outcome);
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let kinds: serde_json::Map<String, Value> = per_kind.iter().map(|(k, t)| (k.clone(), t.json())).collect();
        let mut report = total.json();
        report["per_kind"] = Value::Object(kinds);
        writeln!(out, "{report}")?;
    } else {
        write!(out, "{}", table(&total, &per_kind))?;
        let tokens: usize = replies.iter().map(Vec::len).sum();
        writeln!(
            out,
            "{} problems in {seconds:.1} s ({:.0} generated tokens/s)",
            total.problems,
            tokens as f64 / seconds.max(1e-9)
        )?;
    }
    if let Some(min) = args.min_accuracy {
        let accuracy = total.accuracy();
        if accuracy < min {
            bail!(
                "accuracy {accuracy:.4} ({} of {}) is below --min-accuracy {min}",
                total.correct,
                total.problems
            );
        }
    }
    Ok(())
}

/// Greedy replies to every problem (token ids, without the final end-of-sequence token).
fn generate_all(
    ctx: &ModelContext,
    problems: &[Problem],
    max_tokens: usize,
    file: &Path,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let options = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    let engine = ctx.engine();
    let mut running = Vec::with_capacity(problems.len());
    for problem in problems {
        let at = || format!("{}:{}", file.display(), problem.line);
        let prompt = ctx
            .template()
            .render(&[ChatMessage::new("user", problem.prompt.as_str())], &options)
            .with_context(at)?;
        let ids = ctx.tokenizer().encode(&prompt, false).with_context(at)?;
        let (_, events) = engine.submit(Request::new(ids, max_tokens)).with_context(at)?;
        running.push(events);
    }
    let progress = indicatif::ProgressBar::new(problems.len() as u64);
    let eos = &engine.model_info().eos_token_ids;
    let mut replies = Vec::with_capacity(problems.len());
    for (problem, mut events) in problems.iter().zip(running) {
        let mut ids = Vec::new();
        loop {
            match events.blocking_recv() {
                Some(TokenEvent::Token(token)) => ids.push(token.id),
                Some(TokenEvent::PromptLogprobs(_)) => {}
                Some(TokenEvent::Finished { reason, error, .. }) => {
                    if reason == FinishReason::Stop && ids.last().is_some_and(|id| eos.contains(id)) {
                        ids.pop();
                    }
                    if let Some(error) = error {
                        bail!("{}:{}: generation failed: {error}", file.display(), problem.line);
                    }
                    break;
                }
                None => bail!("{}:{}: the engine stopped", file.display(), problem.line),
            }
        }
        replies.push(ids);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(replies)
}

/// How one reply compares with the answer and the reference.
struct Outcome {
    correct: bool,
    /// `None` when the file has no reference for it.
    same_tokens: Option<bool>,
    same_answer: Option<bool>,
}

impl Outcome {
    fn of(problem: &Problem, ids: &[u32], text: &str) -> Self {
        let parsed = answer_of(text);
        Self {
            correct: parsed == Some(problem.answer),
            same_tokens: problem
                .reply_token_ids
                .as_ref()
                .map(|reference| reference.as_slice() == ids),
            same_answer: problem.parsed.map(|reference| reference == parsed),
        }
    }
}

#[derive(Default)]
struct Tally {
    problems: usize,
    correct: usize,
    /// (agreeing, with a reference)
    tokens: (usize, usize),
    answers: (usize, usize),
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        self.problems += 1;
        self.correct += usize::from(outcome.correct);
        for (slot, same) in [
            (&mut self.tokens, outcome.same_tokens),
            (&mut self.answers, outcome.same_answer),
        ] {
            if let Some(same) = same {
                slot.0 += usize::from(same);
                slot.1 += 1;
            }
        }
    }

    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.problems.max(1) as f64
    }

    /// `None` when no problem had a reference.
    fn rate((agree, of): (usize, usize)) -> Option<f64> {
        (of > 0).then(|| agree as f64 / of as f64)
    }

    fn json(&self) -> Value {
        json!({
            "problems": self.problems,
            "accuracy": self.accuracy(),
            "token_agreement": Self::rate(self.tokens),
            "answer_agreement": Self::rate(self.answers),
        })
    }
}

fn table(total: &Tally, per_kind: &BTreeMap<String, Tally>) -> String {
    let percent = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0));
    let mut out = format!(
        "{:<10}{:>9}{:>10}{:>15}{:>15}\n",
        "kind", "problems", "accuracy", "same tokens", "same answer"
    );
    for (kind, tally) in per_kind.iter().map(|(k, t)| (k.as_str(), t)).chain([("all", total)]) {
        out.push_str(&format!(
            "{kind:<10}{:>9}{:>10}{:>15}{:>15}\n",
            tally.problems,
            percent(Some(tally.accuracy())),
            percent(Tally::rate(tally.tokens)),
            percent(Tally::rate(tally.answers)),
        ));
    }
    out
}

/// The answer of a decoded reply: the text after the last `</think>` read as the reference does,
/// `re.search(r"=\s*(-?\d+)\s*$", text.strip())`; `None` without a `</think>`.
///
/// Only the last `=` can start a match (the anchored rest may hold no other `=`), so this takes
/// what follows it. Digits are ASCII, and a number beyond `i64` counts as no answer (Python
/// would accept both; no reply of an arithmetic model holds either).
pub fn answer_of(reply: &str) -> Option<i64> {
    let (_, after_thinking) = reply.rsplit_once("</think>")?;
    let (_, after_equals) = after_thinking.trim_matches(is_py_space).rsplit_once('=')?;
    let number = after_equals.trim_start_matches(is_py_space);
    let digits = number.strip_prefix('-').unwrap_or(number);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

/// Python's `str.isspace` / `\s`: Unicode white space plus the four ASCII separators 0x1C–0x1F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::answer_of;

    #[test]
    fn reads_the_answer_like_the_reference() {
        assert_eq!(answer_of("work\n</think>\n\n347 + 589 = 936"), Some(936));
        assert_eq!(answer_of("</think>\n\n5 - 9 = -4\n"), Some(-4));
        assert_eq!(answer_of("a = 1 </think> b =  -0 \u{1f}"), Some(0));
        assert_eq!(answer_of("= 3 </think> x = 3 ="), None);
        assert_eq!(answer_of("</think> 7 = 7 cats"), None);
        assert_eq!(answer_of("</think> = +5"), None);
        assert_eq!(answer_of("</think> = - 5"), None);
        assert_eq!(answer_of("</think> = 1 2"), None);
        assert_eq!(answer_of("1 + 1 = 2"), None, "no </think>: no answer");
        assert_eq!(
            answer_of("</think> a </think> x=12"),
            Some(12),
            "after the last </think>"
        );
        assert_eq!(answer_of("</think> x = 99999999999999999999"), None);
    }
}
