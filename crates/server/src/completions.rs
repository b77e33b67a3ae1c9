//! `POST /v1/completions`: prompts as text or token ids, `echo`, legacy `logprobs` including the
//! prompt's (the lm-eval-harness loglikelihood path: `echo` with `max_tokens: 0`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use r1serve_engine::TokenLogprob;

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::generation::{Generation, SeqSpec};
use crate::logprobs::{CompletionLogprobsBuilder, TokenNames};
use crate::params::{count_in, Plan, MAX_LOGPROBS};
use crate::protocol::completions::*;
use crate::protocol::{unix_now, PromptTokensDetails, UsageInfo};
use crate::seq::{SeqDelta, SeqFinish, SeqOptions};
use crate::sse;
use crate::state::{AppState, ModelContext};

/// `max_tokens` when the request gives none (OpenAI's default for this endpoint).
const DEFAULT_MAX_TOKENS: usize = 16;

struct Prompt {
    text: String,
    ids: Vec<u32>,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let ctx = state.ready()?;
    state.check_model(req.model.as_deref())?;
    let common = req.common();
    let plan = Plan::new(&common)?;
    let logprobs = count_in("logprobs", req.logprobs, 0, MAX_LOGPROBS)?;
    let echo = req.echo.unwrap_or(false);
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    if req.best_of.is_some_and(|b| b != plan.n as i64) {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    let prompts = tokenize(&ctx, req.prompt.clone()).await?;
    let mut specs = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        let max_tokens = match plan.max_tokens {
            Some(max) => max,
            None => plan.max_tokens_for(&ctx, prompt.ids.len())?.min(DEFAULT_MAX_TOKENS),
        };
        if max_tokens == 0 && !echo {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1 (0 only scores the prompt, with echo)",
            ));
        }
        for i in 0..plan.n {
            let mut request = plan.request(prompt.ids.clone(), max_tokens, i);
            request.logprobs = logprobs;
            request.prompt_logprobs = if echo { logprobs } else { None };
            specs.push(SeqSpec {
                index: p * plan.n + i,
                request,
                options: SeqOptions {
                    stop: plan.stop.clone(),
                    include_stop_str_in_output: plan.include_stop_str_in_output,
                    hidden_ids: plan.hidden_ids(&ctx),
                    ..SeqOptions::default()
                },
            });
        }
    }
    let admission = state.admit(&ctx, specs.len())?;
    let id = state.request_id("cmpl");
    let generation = Generation::start(Arc::clone(&ctx), id.clone(), arrival, specs, admission)?;
    let choices = (0..prompts.len() * plan.n)
        .map(|_| ChoiceState::new(logprobs))
        .collect();
    let out = Output {
        ctx,
        id,
        created: unix_now(),
        model: state.config.served_model_name.clone(),
        as_ids: common.return_tokens_as_token_ids,
        echo,
        logprobs,
        n: plan.n,
        prompts,
        choices,
    };
    if common.stream {
        Ok(stream(out, generation, common.include_usage))
    } else {
        collect(out, generation).await.map(|r| axum::Json(r).into_response())
    }
}

async fn tokenize(ctx: &Arc<ModelContext>, input: PromptInput) -> Result<Vec<Prompt>, ApiError> {
    let ctx = Arc::clone(ctx);
    tokio::task::spawn_blocking(move || {
        let prompts = match input {
            PromptInput::Text(text) => vec![text_prompt(&ctx, text)?],
            PromptInput::Texts(texts) => texts
                .into_iter()
                .map(|t| text_prompt(&ctx, t))
                .collect::<Result<_, _>>()?,
            PromptInput::Ids(ids) => vec![ids_prompt(&ctx, ids)?],
            PromptInput::IdLists(lists) => lists
                .into_iter()
                .map(|ids| ids_prompt(&ctx, ids))
                .collect::<Result<_, _>>()?,
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid_param("prompt", "prompt must not be empty"));
        }
        Ok(prompts)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the tokenizer task failed: {e}")))?
}

fn text_prompt(ctx: &ModelContext, text: String) -> Result<Prompt, ApiError> {
    let ids = ctx.tokenizer.encode(&text, true)?;
    if ids.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt has no tokens"));
    }
    Ok(Prompt { text, ids })
}

fn ids_prompt(ctx: &ModelContext, ids: Vec<u32>) -> Result<Prompt, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt has no tokens"));
    }
    ctx.engine.limits().check_tokens(&ids)?;
    let text = ctx.tokenizer.decode(&ids, true)?;
    Ok(Prompt { text, ids })
}

struct ChoiceState {
    text: String,
    logprobs: Option<CompletionLogprobs>,
    builder: CompletionLogprobsBuilder,
    finish: Option<SeqFinish>,
}

impl ChoiceState {
    /// The logprobs entries of `tokens` (with their scores), when this choice asked for them.
    fn logprobs_for<'s>(
        &mut self,
        names: TokenNames<'_>,
        tokens: impl Iterator<Item = (u32, Option<&'s TokenLogprob>)>,
    ) -> Option<CompletionLogprobs> {
        self.logprobs.as_ref()?;
        let mut lp = CompletionLogprobs::default();
        for (id, score) in tokens {
            self.builder.push(names, id, score, &mut lp);
        }
        Some(lp)
    }

    fn new(k: Option<usize>) -> Self {
        Self {
            text: String::new(),
            logprobs: k.map(|_| CompletionLogprobs::default()),
            builder: CompletionLogprobsBuilder::new(k.unwrap_or(0)),
            finish: None,
        }
    }
}

struct Output {
    ctx: Arc<ModelContext>,
    id: String,
    created: u64,
    model: String,
    as_ids: bool,
    echo: bool,
    logprobs: Option<usize>,
    n: usize,
    prompts: Vec<Prompt>,
    choices: Vec<ChoiceState>,
}

/// What one update adds to a choice: its text and log-probabilities.
struct Piece {
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish: Option<SeqFinish>,
}

impl Output {
    /// The echoed prompt of choice `index` (with its scores when they came).
    fn echo_piece(&mut self, index: usize, scores: Option<&[Option<TokenLogprob>]>) -> Piece {
        let prompt = &self.prompts[index / self.n];
        let names = TokenNames {
            tokenizer: &self.ctx.tokenizer,
            as_ids: self.as_ids,
        };
        let scored = prompt.ids.iter().enumerate().map(|(i, &id)| {
            let score = scores.and_then(|s| s.get(i)).and_then(Option::as_ref);
            (id, score)
        });
        let logprobs = self.choices[index].logprobs_for(names, scored);
        Piece {
            text: prompt.text.clone(),
            logprobs,
            finish: None,
        }
    }

    fn piece(&mut self, index: usize, delta: SeqDelta) -> Piece {
        let names = TokenNames {
            tokenizer: &self.ctx.tokenizer,
            as_ids: self.as_ids,
        };
        let logprobs = self.choices[index].logprobs_for(names, delta.tokens.iter().map(|t| (t.id, t.logprob.as_ref())));
        Piece {
            text: delta.content.unwrap_or_default(),
            logprobs,
            finish: delta.finish,
        }
    }

    fn apply(&mut self, index: usize, piece: &Piece) {
        let choice = &mut self.choices[index];
        choice.text.push_str(&piece.text);
        if let (Some(all), Some(lp)) = (&mut choice.logprobs, &piece.logprobs) {
            all.extend(lp.clone());
        }
        if let Some(finish) = &piece.finish {
            choice.finish = Some(finish.clone());
        }
    }

    /// One update as pieces: the echo first when the prompt's scores arrive (or, without
    /// log-probabilities, with the first update).
    fn pieces(&mut self, index: usize, mut delta: SeqDelta, echo_sent: &mut [bool]) -> Vec<Piece> {
        let mut pieces = Vec::new();
        if self.echo && !echo_sent[index] && (delta.prompt_logprobs.is_some() || self.logprobs.is_none()) {
            echo_sent[index] = true;
            let scores = delta.prompt_logprobs.take();
            pieces.push(self.echo_piece(index, scores.as_deref()));
        }
        pieces.push(self.piece(index, delta));
        pieces
    }

    fn usage(&self) -> UsageInfo {
        let prompt: usize = self.prompts.iter().map(|p| p.ids.len()).sum();
        let finishes = self.choices.iter().filter_map(|c| c.finish.as_ref());
        let completion = finishes.clone().map(|f| f.usage.completion_tokens).sum::<usize>();
        let cached = self
            .choices
            .iter()
            .step_by(self.n)
            .filter_map(|c| c.finish.as_ref())
            .map(|f| f.usage.cached_tokens)
            .sum();
        UsageInfo {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: cached },
            completion_tokens_details: None,
        }
    }

    fn response(&self, choices: Vec<CompletionChoice>, usage: Option<Option<UsageInfo>>) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

async fn collect(mut out: Output, mut generation: Generation) -> Result<CompletionResponse, ApiError> {
    let mut echo_sent = vec![false; out.choices.len()];
    while let Some((index, delta)) = generation.next().await {
        for piece in out.pieces(index, delta, &mut echo_sent) {
            if let Some(error) = piece.finish.as_ref().and_then(|f| f.error.clone()) {
                return Err(ApiError::Internal(error));
            }
            out.apply(index, &piece);
        }
    }
    let usage = out.usage();
    let choices = out
        .choices
        .iter()
        .enumerate()
        .map(|(index, c)| CompletionChoice {
            index,
            text: c.text.clone(),
            logprobs: c.logprobs.clone(),
            finish_reason: c.finish.as_ref().map(|f| f.reason.to_owned()),
        })
        .collect();
    Ok(out.response(choices, Some(Some(usage))))
}

fn stream(out: Output, generation: Generation, include_usage: bool) -> Response {
    let echo_sent = vec![false; out.choices.len()];
    let state = (out, generation, echo_sent, false);
    let body = stream::unfold(
        state,
        move |(mut out, mut generation, mut echo_sent, done)| async move {
            if done {
                return None;
            }
            let Some((index, delta)) = generation.next().await else {
                let mut events = Vec::new();
                if include_usage {
                    events.push(sse::json_event(&out.response(Vec::new(), Some(Some(out.usage())))));
                }
                events.push(sse::done_event());
                return Some((events, (out, generation, echo_sent, true)));
            };
            let mut events = Vec::new();
            for piece in out.pieces(index, delta, &mut echo_sent) {
                out.apply(index, &piece);
                if let Some(error) = piece.finish.as_ref().and_then(|f| f.error.clone()) {
                    events.push(sse::error_event(&ApiError::Internal(error)));
                }
                let has_logprobs = piece.logprobs.as_ref().is_some_and(|lp| !lp.tokens.is_empty());
                if piece.text.is_empty() && !has_logprobs && piece.finish.is_none() {
                    continue;
                }
                let choice = CompletionChoice {
                    index,
                    text: piece.text,
                    logprobs: piece.logprobs,
                    finish_reason: piece.finish.as_ref().map(|f| f.reason.to_owned()),
                };
                events.push(sse::json_event(
                    &out.response(vec![choice], include_usage.then_some(None)),
                ));
            }
            Some((events, (out, generation, echo_sent, false)))
        },
    );
    sse::response(body)
}
