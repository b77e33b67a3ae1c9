//! `POST /v1/chat/completions`: render the conversation (off the async runtime), run `n`
//! sequences, answer in one body or as a stream of chunks.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use r1serve_chat::{prompt_opens_thinking, ChatTemplate, ParsedToolCall, RenderOptions};

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::generation::{Generation, SeqSpec};
use crate::logprobs::TokenNames;
use crate::params::{count_in, thinking_hook, thinking_limit, Plan, MAX_LOGPROBS};
use crate::protocol::chat::*;
use crate::protocol::{unix_now, CompletionTokensDetails, PromptTokensDetails, UsageInfo};
use crate::seq::{SeqDelta, SeqFinish, SeqOptions};
use crate::sse;
use crate::state::{AppState, ModelContext};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let ctx = state.ready()?;
    state.check_model(req.model.as_deref())?;
    let common = req.common();
    let plan = Plan::new(&common)?;
    let top_logprobs = count_in("top_logprobs", req.top_logprobs, 0, MAX_LOGPROBS)?;
    let logprobs = match (req.logprobs.unwrap_or(false), top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs needs `logprobs: true`",
            ))
        }
        (false, _) => None,
    };
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let budget = thinking_limit(
        [req.thinking_budget, req.thinking_token_budget],
        state.config.reasoning_budget,
    )?;
    if req.chat_template.is_some() && !state.config.trust_request_chat_template {
        return Err(ApiError::invalid_param(
            "chat_template",
            "a request's chat_template is refused: start the server with --trust-request-chat-template to allow it",
        ));
    }

    let (prompt, ids) = render(&ctx, &req).await?;
    let started_in_thinking = ctx.think.is_some() && prompt_opens_thinking(&prompt);
    let max_tokens = plan.max_tokens_for(&ctx, ids.len())?;
    if max_tokens == 0 {
        return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
    }
    let admission = state.admit(&ctx, plan.n)?;
    let specs = (0..plan.n)
        .map(|i| {
            let mut request = plan.request(ids.clone(), max_tokens, i);
            request.logprobs = logprobs;
            request.hook = thinking_hook(&ctx, budget, started_in_thinking);
            SeqSpec {
                index: i,
                request,
                options: SeqOptions {
                    reasoning: true,
                    started_in_thinking,
                    stop: plan.stop.clone(),
                    include_stop_str_in_output: plan.include_stop_str_in_output,
                    hidden_ids: plan.hidden_ids(&ctx),
                    tool_calls: req.wants_tool_calls(),
                },
            }
        })
        .collect();
    let id = state.request_id("chatcmpl");
    let generation = Generation::start(Arc::clone(&ctx), id.clone(), arrival, specs, admission)?;
    let out = Output {
        ctx,
        id,
        created: unix_now(),
        model: state.config.served_model_name.clone(),
        logprobs,
        as_ids: common.return_tokens_as_token_ids,
    };
    if common.stream {
        Ok(stream(out, generation, plan.n, common.include_usage))
    } else {
        collect(out, generation, plan.n)
            .await
            .map(|r| axum::Json(r).into_response())
    }
}

/// Renders and tokenizes on a blocking thread (templates can be slow; tokenizing is CPU work).
async fn render(ctx: &Arc<ModelContext>, req: &ChatCompletionRequest) -> Result<(String, Vec<u32>), ApiError> {
    let ctx = Arc::clone(ctx);
    let messages = req.messages.clone();
    let source = req.chat_template.clone();
    let opts = RenderOptions {
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        tools: req.tools.clone(),
        extra: req.chat_template_kwargs.clone().unwrap_or_default(),
    };
    tokio::task::spawn_blocking(move || {
        let own;
        let template = match source {
            Some(source) => {
                let base = &ctx.template;
                own = ChatTemplate::new(source, "request chat_template", base.bos_token(), base.eos_token())?
                    .with_reasoning(base.is_reasoning());
                &own
            }
            None => ctx.template.as_ref(),
        };
        let prompt = template.render(&messages, &opts)?;
        let ids = ctx.tokenizer.encode(&prompt, false)?;
        if ids.is_empty() {
            return Err(ApiError::invalid_param("messages", "the rendered prompt has no tokens"));
        }
        Ok((prompt, ids))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the template task failed: {e}")))?
}

/// What every response of one request shares.
struct Output {
    ctx: Arc<ModelContext>,
    id: String,
    created: u64,
    model: String,
    logprobs: Option<usize>,
    as_ids: bool,
}

impl Output {
    fn names(&self) -> TokenNames<'_> {
        TokenNames {
            tokenizer: &self.ctx.tokenizer,
            as_ids: self.as_ids,
        }
    }

    fn logprobs_of(&self, delta: &SeqDelta) -> Option<ChatLogprobs> {
        let k = self.logprobs?;
        let content = delta
            .tokens
            .iter()
            .filter_map(|t| t.logprob.as_ref())
            .map(|score| self.names().chat_entry(score, k))
            .collect();
        Some(ChatLogprobs { content })
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<UsageInfo>>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

fn tool_calls_out(calls: &[ParsedToolCall], request_id: &str, index: usize, streaming: bool) -> Vec<ToolCallOut> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| ToolCallOut {
            index: streaming.then_some(i),
            id: format!("call_{}_{index}_{i}", request_id.trim_start_matches("chatcmpl-")),
            kind: call.kind.clone(),
            function: FunctionOut {
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
        })
        .collect()
}

/// Usage over all choices: the prompt counted once.
fn usage(finishes: &[&SeqFinish]) -> UsageInfo {
    let prompt = finishes.first().map_or(0, |f| f.usage.prompt_tokens);
    let completion = finishes.iter().map(|f| f.usage.completion_tokens).sum::<usize>();
    UsageInfo {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: finishes.first().map_or(0, |f| f.usage.cached_tokens),
        },
        completion_tokens_details: Some(CompletionTokensDetails {
            reasoning_tokens: finishes.iter().map(|f| f.reasoning_tokens).sum(),
        }),
    }
}

#[derive(Default)]
struct Choice {
    reasoning: Option<String>,
    content: String,
    logprobs: Vec<ChatLogprob>,
    finish: Option<SeqFinish>,
}

async fn collect(out: Output, mut generation: Generation, n: usize) -> Result<ChatCompletionResponse, ApiError> {
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    while let Some((index, delta)) = generation.next().await {
        let choice = &mut choices[index];
        if let Some(lp) = out.logprobs_of(&delta) {
            choice.logprobs.extend(lp.content);
        }
        if let Some(r) = delta.reasoning {
            choice.reasoning.get_or_insert_with(String::new).push_str(&r);
        }
        if let Some(c) = delta.content {
            choice.content.push_str(&c);
        }
        if let Some(finish) = delta.finish {
            if let Some(error) = &finish.error {
                return Err(ApiError::Internal(error.clone()));
            }
            choice.finish = Some(finish);
        }
    }
    let finishes: Vec<&SeqFinish> = choices.iter().filter_map(|c| c.finish.as_ref()).collect();
    let usage = usage(&finishes);
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let finish = c.finish.as_ref();
            let content_is_none = finish.is_some_and(|f| f.content_is_none) && c.content.is_empty();
            ChatChoice {
                index,
                message: ResponseMessage {
                    role: "assistant",
                    content: (!content_is_none).then_some(c.content),
                    reasoning_content: c.reasoning,
                    tool_calls: finish.map_or_else(Vec::new, |f| tool_calls_out(&f.tool_calls, &out.id, index, false)),
                },
                logprobs: out.logprobs.map(|_| ChatLogprobs { content: c.logprobs }),
                finish_reason: finish.map(|f| f.reason.to_owned()),
            }
        })
        .collect();
    Ok(ChatCompletionResponse {
        id: out.id,
        object: "chat.completion",
        created: out.created,
        model: out.model,
        choices,
        usage,
    })
}

fn stream(out: Output, generation: Generation, n: usize, include_usage: bool) -> Response {
    // Each choice opens with the role (and an empty content), as OpenAI's streams do.
    let opening: Vec<_> = (0..n)
        .map(|index| {
            let choice = ChatChunkChoice {
                index,
                delta: DeltaMessage {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..DeltaMessage::default()
                },
                logprobs: None,
                finish_reason: None,
            };
            sse::json_event(&out.chunk(vec![choice], include_usage.then_some(None)))
        })
        .collect();
    let state = (out, generation, Vec::<SeqFinish>::new(), false);
    let body = stream::unfold(state, move |(out, mut generation, mut finishes, done)| async move {
        if done {
            return None;
        }
        let Some((index, delta)) = generation.next().await else {
            let mut events = Vec::new();
            if include_usage {
                let refs: Vec<&SeqFinish> = finishes.iter().collect();
                events.push(sse::json_event(&out.chunk(Vec::new(), Some(Some(usage(&refs))))));
            }
            events.push(sse::done_event());
            return Some((events, (out, generation, finishes, true)));
        };
        let mut events = Vec::new();
        let logprobs = out.logprobs_of(&delta).filter(|lp| !lp.content.is_empty());
        let finish = delta.finish;
        if let Some(error) = finish.as_ref().and_then(|f| f.error.clone()) {
            events.push(sse::error_event(&ApiError::Internal(error)));
        }
        let has_text = delta.reasoning.is_some() || delta.content.is_some();
        if has_text || logprobs.is_some() || finish.is_some() {
            let choice = ChatChunkChoice {
                index,
                delta: DeltaMessage {
                    role: None,
                    reasoning_content: delta.reasoning,
                    content: delta.content,
                    tool_calls: finish
                        .as_ref()
                        .map_or_else(Vec::new, |f| tool_calls_out(&f.tool_calls, &out.id, index, true)),
                },
                logprobs,
                finish_reason: finish.as_ref().map(|f| f.reason.to_owned()),
            };
            events.push(sse::json_event(&out.chunk(vec![choice], include_usage.then_some(None))));
        }
        finishes.extend(finish);
        Some((events, (out, generation, finishes, false)))
    });
    sse::response(stream::iter([opening]).chain(body))
}
