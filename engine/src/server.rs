//! The OpenAI-compatible HTTP API (axum): completions and chat (plain and server-sent events),
//! models, health, readiness, metrics, optional bearer key, and graceful drain. Requests are
//! validated here ([`crate::api`]) and run on the engine thread ([`crate::scheduler`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::api::{self, ApiError, Endpoint, PromptInput, TextStream, Validated};
use crate::generate::FinishReason;
use crate::metrics::Metrics;
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::scheduler::{EngineHandle, Event, GenerationRequest, SubmitError};
use crate::tokenizer::{DecodeState, Tokenizer};
use crate::tool_calls::{CallStream, Piece, ToolCall, ToolCallParser};

/// A thinking block's tags: a prompt that ends in the first starts its output in reasoning,
/// which the second's token ends.
const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// Everything a handler needs.
#[derive(Debug)]
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    /// The model's revision (`--model-revision`), shown in `/v1/models`.
    pub model_revision: Option<String>,
    /// Longest prompt + output, in tokens.
    pub max_context: usize,
    pub vocab_size: usize,
    pub bos_token: Option<u32>,
    pub stop_tokens: Vec<u32>,
    pub api_key: Option<String>,
    /// How tool calls are read out of a chat output (`--tool-call-parser`); `None`: requests
    /// that offer tools are refused.
    pub tool_parser: Option<ToolCallParser>,
    /// Split a thinking output's reasoning from its answer (`--reasoning-parser`): a chat
    /// prompt that ends in `<think>` starts its output in reasoning, which ends at the
    /// `</think>` token.
    pub reasoning_parser: bool,
    /// The model's sampling defaults (`--generation-config`), for fields a request leaves out.
    pub sampling_defaults: api::SamplingDefaults,
    pub draining: AtomicBool,
    /// Requests between their arrival and their submission to the engine (parsing, the chat
    /// template, tokenization: the engine does not count them yet): a drain waits for them as
    /// for the running ones.
    pub preparing: AtomicUsize,
    pub created: u64,
}

/// Request bodies above this get 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

impl AppState {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        metrics: Arc<Metrics>,
        model_name: String,
        max_context: usize,
        vocab_size: usize,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            metrics,
            model_name,
            model_revision: None,
            max_context,
            vocab_size,
            bos_token: None,
            stop_tokens: Vec::new(),
            api_key: None,
            tool_parser: None,
            reasoning_parser: false,
            sampling_defaults: api::SamplingDefaults::default(),
            draining: AtomicBool::new(false),
            preparing: AtomicUsize::new(0),
            created: unix_now(),
        }
    }
}

/// One request counted in [`AppState::preparing`] while it lives.
struct Preparing(Arc<AppState>);

impl Preparing {
    fn enter(state: &Arc<AppState>) -> Self {
        state.preparing.fetch_add(1, Ordering::SeqCst);
        Self(state.clone())
    }
}

impl Drop for Preparing {
    fn drop(&mut self) {
        self.0.preparing.fetch_sub(1, Ordering::SeqCst);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{:x}{n:06x}", nanos)
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error_response(&ApiError::new(404, "not_found_error", "no such route"))
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            error_response(&ApiError::new(
                405,
                "invalid_request_error",
                format!("this route does not take {method}"),
            ))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then drains: `/ready` turns false and new requests get
/// 503 at once; requests already accepted run to completion, for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let (force_tx, force_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_state = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        drain_state.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        // Until the running requests finish, or nothing will finish them (the engine thread
        // stopped), or the grace period ends.
        let stats = &drain_state.engine.stats;
        // `preparing` before `active`: a handler counts itself in `active` before it leaves
        // `preparing`, so a request between the two is seen in one or the other.
        while (drain_state.preparing.load(Ordering::SeqCst) > 0
            || stats.active.load(Ordering::SeqCst) > 0)
            && !stats.stopped.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = drained_tx.send(());
        // Responses still being written (a slow reader of a finished stream) have the rest of
        // the grace period, and at least 2 s; a connection open after that (a stuck client)
        // does not hold the exit.
        let force_at = deadline.max(Instant::now() + Duration::from_secs(2));
        tokio::time::sleep(force_at.saturating_duration_since(Instant::now())).await;
        let _ = force_tx.send(());
    });
    // Small SSE writes must leave at once (Nagle + delayed ACK adds ~40 ms per token otherwise).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = drained_rx.await;
        })
        .into_future();
    tokio::select! {
        result = server => result,
        Ok(()) = force_rx => Ok(()),
    }
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (status, axum::Json(e.body())).into_response();
    if e.status == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn json_response(value: Value) -> Response {
    axum::Json(value).into_response()
}

/// Alive unless the engine thread failed (then 503 with why, so the liveness probe restarts
/// the server).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.stats.failure() {
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the engine failed: {why}"),
        )
            .into_response(),
        None => "ok".into_response(),
    }
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if let Some(why) = state.engine.stats.failure() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the engine failed: {why}"),
        )
            .into_response()
    } else if state.draining.load(Ordering::SeqCst)
        || state.engine.stats.stopped.load(Ordering::SeqCst)
    {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ready".into_response()
    }
}

/// What a request hears when the engine thread ended before it did.
fn engine_stopped(state: &AppState) -> String {
    match state.engine.stats.failure() {
        Some(why) => format!("the engine failed: {why}"),
        None => "the engine stopped".into(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        state.metrics.error(e.status);
        return error_response(&e);
    }
    let mut model = json!({
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "sparsemoe",
        "max_model_len": state.max_context,
    });
    if let Some(revision) = &state.model_revision {
        model["revision"] = json!(revision);
    }
    json_response(json!({ "object": "list", "data": [model] }))
}

/// Constant-time comparison (the key's length is not secret).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same_key(given.trim().as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(
            ApiError::new(401, "authentication_error", "invalid or missing API key")
                .with_code("invalid_api_key"),
        )
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, headers, body, Endpoint::Completions).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, headers, body, Endpoint::Chat).await
}

/// Counts a request's outcome once; a request dropped before it finished (client gone)
/// counts as `abort`.
struct Outcome {
    metrics: Arc<Metrics>,
    recorded: bool,
}

impl Outcome {
    fn finish(&mut self, reason: &str) {
        if !self.recorded {
            self.recorded = true;
            self.metrics.finished(reason);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.finish("abort");
    }
}

/// A request ready to run.
struct Prepared {
    validated: Validated,
    prompt: Vec<u32>,
    max_tokens: usize,
    /// The output starts in reasoning (see `AppState::reasoning_parser`).
    starts_in_reasoning: bool,
}

fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Prepared, ApiError> {
    authorize(state, headers)?;
    if state.draining.load(Ordering::SeqCst) {
        return Err(
            ApiError::new(503, "service_unavailable", "the server is shutting down")
                .with_code("draining"),
        );
    }
    let bytes = body.map_err(|rejection| {
        let status = rejection.status().as_u16();
        if status == 413 {
            ApiError::new(
                413,
                "invalid_request_error",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::invalid(None, rejection.body_text())
        }
    })?;
    let mut body = api::parse_body(&bytes)?;
    state.sampling_defaults.fill(&mut body);
    // A request for another model is answered as such before its fields are judged (vLLM).
    if let Some(model) = &body.model
        && model != &state.model_name
    {
        return Err(ApiError {
            status: 404,
            message: format!(
                "the model `{model}` does not exist; this server serves `{}`",
                state.model_name
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    let validated = api::validate(&body, endpoint)?;
    let tokenize_error = |e: crate::EngineError| ApiError::invalid(None, e.to_string());
    let mut starts_in_reasoning = false;
    let prompt = match &validated.prompt {
        PromptInput::Tokens(ids) => ids.clone(),
        PromptInput::Text(text) => {
            with_bos(state, state.tokenizer.encode(text).map_err(tokenize_error)?)
        }
        PromptInput::Chat {
            messages,
            template_kwargs,
            tools,
        } => {
            if !tools.is_empty() && state.tool_parser.is_none() {
                return Err(ApiError::invalid(
                    Some("tools"),
                    "this server reads no tool calls: start it with --tool-call-parser \
                     deepseek_v32, deepseek_v31 or deepseek_v3 (the model's format) to offer \
                     tools (or send tool_choice \"none\")",
                ));
            }
            let text = state
                .tokenizer
                .apply_chat_template(messages, true, template_kwargs, tools)
                .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            starts_in_reasoning = state.reasoning_parser && text.trim_end().ends_with(THINK_START);
            with_bos(
                state,
                state.tokenizer.encode(&text).map_err(tokenize_error)?,
            )
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "the prompt encodes to no tokens",
        ));
    }
    let params = &validated.params;
    let named = [
        ("prompt", prompt.clone()),
        ("stop_token_ids", validated.stop_token_ids.clone()),
        (
            "logit_bias",
            params.logit_bias.iter().map(|b| b.0).collect(),
        ),
    ];
    for (param, ids) in named {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= state.vocab_size) {
            return Err(ApiError::invalid(
                Some(param),
                format!(
                    "token id {bad} is out of range: the vocabulary has {} tokens (ids 0..{})",
                    state.vocab_size,
                    state.vocab_size - 1
                ),
            ));
        }
    }
    if prompt.len() >= state.max_context {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "this model's maximum context length is {} tokens, but the prompt has {} tokens \
                 (it must leave room for at least one generated token)",
                state.max_context,
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = state.max_context - prompt.len();
    let max_tokens = match (validated.max_tokens, validated.max_tokens_param) {
        (Some(asked), Some(param)) if asked > room => {
            return Err(ApiError::invalid(
                Some(param),
                format!(
                    "{param} ({asked}) is too large: this model's maximum context length is {} \
                     tokens and the prompt has {} tokens, which leaves room for {room}",
                    state.max_context,
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        // A default (completions' 16, or none) is cut to the room the prompt leaves.
        (asked, _) => asked.unwrap_or(room).min(room),
    };
    if validated.min_tokens > max_tokens {
        return Err(ApiError::invalid(
            Some("min_tokens"),
            format!(
                "min_tokens ({}) is more than this request may generate: {max_tokens} tokens \
                 (the model's maximum context length is {} tokens and the prompt has {})",
                validated.min_tokens,
                state.max_context,
                prompt.len()
            ),
        ));
    }
    Ok(Prepared {
        validated,
        prompt,
        max_tokens,
        starts_in_reasoning,
    })
}

fn with_bos(state: &AppState, mut ids: Vec<u32>) -> Vec<u32> {
    if let Some(bos) = state.bos_token
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    ids
}

async fn handle(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    // Counted before `prepare` looks at `draining` (both SeqCst): a drain that begins first
    // has this request refused, one that begins after waits for it.
    let preparing = Preparing::enter(&state);
    // Parsing, the chat template and tokenization are CPU work on a body of up to
    // MAX_BODY_BYTES: off the async workers, so that other streams and the probes go on.
    let prepared = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || prepare(&state, &headers, body, endpoint)).await
    };
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            state.metrics.error(e.status);
            return error_response(&e);
        }
        Err(join) => {
            let e = ApiError::new(
                500,
                "server_error",
                format!("preparing the request failed: {join}"),
            );
            state.metrics.error(e.status);
            return error_response(&e);
        }
    };
    let validated = &prepared.validated;
    let (n, capacity) = (validated.n, state.engine.queue_capacity());
    if n > capacity {
        let e = ApiError::invalid(
            Some("n"),
            format!(
                "n ({n}) is more than this server queues at once ({capacity} requests, \
                 --max-queue)"
            ),
        );
        state.metrics.error(e.status);
        return error_response(&e);
    }
    let stop_tokens = if validated.ignore_eos {
        validated.stop_token_ids.clone()
    } else {
        let mut stops = state.stop_tokens.clone();
        stops.extend(&validated.stop_token_ids);
        stops
    };
    // Each choice is a sequence of its own; under a seed, choice i draws from seed + i, so the
    // choices differ and the request still reproduces.
    let requests = (0..n)
        .map(|i| GenerationRequest {
            prompt: prepared.prompt.clone(),
            max_tokens: prepared.max_tokens,
            params: SamplingParams {
                seed: validated.params.seed.map(|s| s.wrapping_add(i as u64)),
                ..validated.params.clone()
            },
            stop_tokens: stop_tokens.clone(),
            min_tokens: validated.min_tokens,
            logprobs: validated.logprobs,
        })
        .collect();
    let submitted_at = Instant::now();
    let submitted = state.engine.submit_all(requests);
    // The engine counts the request from here (or it was refused).
    drop(preparing);
    let receivers = match submitted {
        Ok(receivers) => receivers,
        Err(SubmitError::QueueFull) => {
            let e = ApiError::new(
                429,
                "rate_limit_error",
                "the server's waiting queue is full; retry later",
            )
            .with_code("queue_full");
            state.metrics.error(429);
            return error_response(&e);
        }
        Err(SubmitError::Unavailable) => {
            let e = ApiError::new(503, "service_unavailable", "the engine is not running")
                .with_code("unavailable");
            state.metrics.error(503);
            return error_response(&e);
        }
    };
    let run = Arc::new(Run {
        id: request_id(match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }),
        created: unix_now(),
        endpoint,
        prompt_tokens: prepared.prompt.len(),
        logprobs: validated.logprobs.is_some(),
        min_tokens: validated.min_tokens,
        reasoned: prepared.starts_in_reasoning,
        submitted: submitted_at,
        state,
        failed: AtomicBool::new(false),
    });
    // Calls are read from a chat output only when the request offered tools.
    let tools = ToolReading {
        parser: run
            .state
            .tool_parser
            .filter(|_| !validated.tools().is_empty()),
        parallel: validated.parallel_tool_calls,
    };
    let steps = spawn_choices(&run, receivers, &validated.stop, tools);
    if validated.stream {
        stream_response(run, steps, n, validated.include_usage)
    } else {
        complete_response(run, steps, n).await
    }
}

/// How a request's choices read tool calls.
#[derive(Clone, Copy)]
struct ToolReading {
    parser: Option<ToolCallParser>,
    /// `parallel_tool_calls`: false keeps a choice's first call only.
    parallel: bool,
}

/// What a request's choices share.
struct Run {
    id: String,
    created: u64,
    endpoint: Endpoint,
    prompt_tokens: usize,
    logprobs: bool,
    /// No stop string ends in the text of a choice's first `min_tokens` tokens.
    min_tokens: usize,
    /// Its outputs begin in reasoning (a chat prompt that ends in `<think>`): each response
    /// message has `reasoning_content`.
    reasoned: bool,
    /// When its choices went to the engine: where their end-to-end latencies begin.
    submitted: Instant,
    state: Arc<AppState>,
    /// Set when the request failed: its choices still running are ended as part of that
    /// failure, not counted as aborted.
    failed: AtomicBool,
}

impl Run {
    /// A choice ended (the engine ended it, or a stop string did, which the engine sees as a
    /// cancellation): its end-to-end latency, from its submission.
    fn observe_latency(&self) {
        self.state
            .metrics
            .e2e_latency
            .observe(self.submitted.elapsed().as_secs_f64());
    }
}

/// One choice's progress (its own sequence on the engine), on a task of its own.
struct Choice {
    index: usize,
    /// Where the incremental decoding of the output stands.
    decoding: DecodeState,
    text: TextStream,
    /// Characters of output text the tokens so far decoded to: where the next token's text
    /// begins (its completions logprobs `text_offset`).
    decoded_chars: usize,
    /// Tokens generated so far.
    generated: usize,
    /// Counted once per choice in `sparsemoe_request_success_total`.
    outcome: Outcome,
    /// Reads the output's tool calls, when the request offered tools.
    tools: Option<CallStream>,
    /// Keep calls after the first (`parallel_tool_calls`).
    parallel: bool,
    /// While the output is reasoning: how it ends, and what is held back.
    reasoning: Option<Reasoning>,
}

/// An output's reasoning while it lasts: it ends at the `</think>` token, or at that text where
/// the model writes it otherwise.
struct Reasoning {
    end_token: Option<u32>,
    /// Its end, which may be the start of `</think>`: held back until the next piece says.
    held: String,
}

/// What one step adds to a choice's output.
#[derive(Default)]
struct Output {
    text: String,
    /// Reasoning text (a thinking output's, before its answer).
    reasoning: String,
    logprob: Option<Value>,
    calls: Vec<ToolCall>,
}

impl Output {
    fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.reasoning.is_empty()
            && self.logprob.is_none()
            && self.calls.is_empty()
    }
}

/// What one engine event means to the client.
enum Step {
    Delta(Output),
    Done {
        /// With the last token's logprob, when a stop string ends the output at that token.
        out: Output,
        reason: FinishReason,
        completion_tokens: usize,
    },
    Failed(String),
}

impl Run {
    fn token_text(&self, id: u32) -> String {
        self.state.tokenizer.token_text(id)
    }

    /// A token's logprobs entry; `offset`: where its text begins in the output, in characters.
    fn logprob_entry(&self, lp: &TokenLogprob, offset: usize) -> Value {
        let token = self.token_text(lp.token);
        match self.endpoint {
            Endpoint::Chat => json!({
                "token": token,
                "logprob": lp.logprob,
                "bytes": token.as_bytes(),
                "top_logprobs": lp.top.iter().map(|&(t, l)| {
                    let s = self.token_text(t);
                    json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
                }).collect::<Vec<_>>(),
            }),
            Endpoint::Completions => {
                // The legacy shape holds the sampled token too (up to `logprobs` + 1 entries,
                // as OpenAI's and vLLM's do), so `top_logprobs[i][tokens[i]]` always reads.
                let mut top = serde_json::Map::new();
                for &(t, l) in &lp.top {
                    top.insert(self.token_text(t), json!(l));
                }
                top.entry(token.clone()).or_insert(json!(lp.logprob));
                json!({"token": token, "logprob": lp.logprob, "top": top, "offset": offset})
            }
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A stream chunk's choice `index` carrying `out`, its tool calls numbered from
    /// `first_call`.
    fn choice_delta(
        &self,
        index: usize,
        out: Output,
        first_call: usize,
        finish: Option<&str>,
    ) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if !out.reasoning.is_empty() {
                    delta["reasoning_content"] = json!(out.reasoning);
                }
                if !out.text.is_empty() {
                    delta["content"] = json!(out.text);
                }
                if !out.calls.is_empty() {
                    delta["tool_calls"] = out
                        .calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| c.to_delta(first_call + i))
                        .collect();
                }
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": out.logprob.map(|l| json!({"content": [l]})),
                    "finish_reason": finish,
                })
            }
            Endpoint::Completions => json!({
                "index": index,
                "text": out.text,
                "logprobs": out.logprob.map(|entry| completion_logprobs(&[entry])),
                "finish_reason": finish,
            }),
        }
    }

    /// A whole response's choice `index`.
    fn choice(&self, index: usize, whole: Whole) -> Value {
        let reason = whole.reason.unwrap_or("stop");
        match self.endpoint {
            Endpoint::Chat => {
                // As OpenAI's: a message of calls alone has null content, and so (as vLLM's)
                // does one of reasoning alone.
                let text = whole.text;
                let no_answer = text.is_empty() && (!whole.calls.is_empty() || self.reasoned);
                let mut message = json!({
                    "role": "assistant",
                    "content": (!no_answer).then_some(text),
                });
                if self.reasoned {
                    message["reasoning_content"] = json!(whole.reasoning);
                }
                if !whole.calls.is_empty() {
                    message["tool_calls"] = whole.calls.iter().map(ToolCall::to_json).collect();
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": self.logprobs.then(|| json!({"content": whole.logprobs})),
                    "finish_reason": reason,
                })
            }
            Endpoint::Completions => json!({
                "index": index,
                "text": whole.text,
                "logprobs": self.logprobs.then(|| completion_logprobs(&whole.logprobs)),
                "finish_reason": reason,
            }),
        }
    }

    /// Fails the request: counted once, whatever its choices.
    fn failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.state.metrics.error(500);
    }
}

impl Choice {
    /// Applies one engine event.
    fn apply(&mut self, run: &Run, event: Event) -> Step {
        let tokenizer = &run.state.tokenizer;
        match event {
            Event::Token { id, logprob } => {
                self.generated += 1;
                let piece = tokenizer.decode_next(&mut self.decoding, id);
                let logprob = logprob
                    .filter(|_| run.logprobs)
                    .map(|lp| run.logprob_entry(&lp, self.decoded_chars));
                self.decoded_chars += piece.chars().count();
                // Reasoning is neither stop-string text nor read for calls.
                let was_reasoning = self.reasoning.is_some();
                let (reasoning, piece) = self.split_reasoning(id, piece);
                if was_reasoning && piece.is_empty() {
                    return Step::Delta(Output {
                        reasoning,
                        logprob,
                        ..Output::default()
                    });
                }
                let (text, stopped) = match self.generated <= run.min_tokens {
                    true => (self.text.push_within_min_tokens(&piece), false),
                    false => self.text.push(&piece),
                };
                let (text, calls) = self.read_calls(text, stopped);
                let out = Output {
                    text,
                    reasoning,
                    logprob,
                    calls,
                };
                if stopped {
                    run.observe_latency();
                    Step::Done {
                        out,
                        reason: FinishReason::Stop,
                        completion_tokens: self.generated,
                    }
                } else {
                    Step::Delta(out)
                }
            }
            Event::Finished {
                reason,
                completion_tokens,
                stop_logprob,
                ..
            } => {
                // The end of a character no token finished, as the whole output's decode shows it.
                let rest = tokenizer.decode_rest(&mut self.decoding);
                self.decoded_chars += rest.chars().count();
                // An output that ends in its reasoning has no answer.
                let (reasoning, rest) = match self.reasoning.take() {
                    Some(r) => (r.held + &rest, String::new()),
                    None => (String::new(), rest),
                };
                let (mut text, stopped) = self.text.push(&rest);
                if !stopped {
                    text.push_str(&self.text.flush());
                }
                let logprob = stop_logprob
                    .filter(|_| run.logprobs)
                    .map(|lp| run.logprob_entry(&lp, self.decoded_chars));
                let (text, calls) = self.read_calls(text, true);
                run.observe_latency();
                Step::Done {
                    out: Output {
                        text,
                        reasoning,
                        logprob,
                        calls,
                    },
                    reason: if stopped { FinishReason::Stop } else { reason },
                    completion_tokens,
                }
            }
            Event::Error(message) => Step::Failed(message),
        }
    }

    /// Token `id`'s text `piece` as (reasoning, answer) while the output is reasoning: all
    /// reasoning but for an end that may begin `</think>`, until the end token or that text,
    /// where the answer begins (the tag itself is neither; what a decoder puts before the end
    /// token, such as a character left unfinished, stays reasoning).
    fn split_reasoning(&mut self, id: u32, piece: String) -> (String, String) {
        let Some(r) = self.reasoning.as_mut() else {
            return (String::new(), piece);
        };
        if r.end_token == Some(id) {
            let mut reasoning = std::mem::take(&mut r.held);
            reasoning.push_str(piece.strip_suffix(THINK_END).map_or("", str::trim_end));
            self.reasoning = None;
            return (reasoning, String::new());
        }
        r.held.push_str(&piece);
        if let Some(at) = r.held.find(THINK_END) {
            let answer = r.held[at + THINK_END.len()..].to_string();
            r.held.truncate(at);
            let reasoning = std::mem::take(&mut r.held);
            self.reasoning = None;
            return (reasoning, answer);
        }
        let keep = crate::tool_calls::partial_start(&r.held, THINK_END);
        let held = r.held.split_off(r.held.len() - keep);
        (std::mem::replace(&mut r.held, held), String::new())
    }

    /// Output `text` (after stop strings) as content and tool calls, when the request offered
    /// tools; `last`: the output ends with it.
    fn read_calls(&mut self, text: String, last: bool) -> (String, Vec<ToolCall>) {
        let Some(reader) = self.tools.as_mut() else {
            return (text, Vec::new());
        };
        let before = reader.calls();
        let mut pieces = reader.push(&text);
        if last {
            pieces.extend(reader.finish());
        }
        let (mut content, mut calls) = (String::new(), Vec::new());
        let mut made = before;
        for piece in pieces {
            match piece {
                Piece::Content(t) => content.push_str(&t),
                Piece::Call(c) => {
                    // parallel_tool_calls false: the first call only.
                    if self.parallel || made == 0 {
                        calls.push(c);
                    }
                    made += 1;
                }
            }
        }
        (content, calls)
    }
}

/// A choice's finish reason as the response gives it: `tool_calls` for an output that ended
/// itself after making calls (its first call is always kept, so it made some when it gave
/// some).
fn finish_text(reason: FinishReason, made_calls: bool) -> &'static str {
    match (reason, made_calls) {
        (FinishReason::Stop, true) => "tool_calls",
        (reason, _) => reason.as_str(),
    }
}

/// Runs each choice on a task of its own, which turns its sequence's events into [`Step`]s
/// (decoding, stop strings, logprobs) and sends them, with its index, on the returned channel.
/// A choice's task ends after its last step, dropping its events, which cancels its sequence
/// (a stop string ends it early), and ends at once, cancelling it, when the channel's receiver
/// is dropped (the client left, or another choice failed the request).
fn spawn_choices(
    run: &Arc<Run>,
    receivers: Vec<UnboundedReceiver<Event>>,
    stop: &[String],
    tools: ToolReading,
) -> mpsc::Receiver<(usize, Step)> {
    // The token that ends reasoning, where the tokenizer has it as one (DeepSeek's do).
    let end_token = run.state.tokenizer.token_id(THINK_END);
    let (tx, rx) = mpsc::channel(64);
    for (index, mut events) in receivers.into_iter().enumerate() {
        let (run, tx) = (run.clone(), tx.clone());
        let mut choice = Choice {
            index,
            decoding: DecodeState::default(),
            text: TextStream::new(stop.to_vec()),
            decoded_chars: 0,
            generated: 0,
            outcome: Outcome {
                metrics: run.state.metrics.clone(),
                recorded: false,
            },
            // Call ids: the request's id, the choice and the call's place in it.
            tools: tools
                .parser
                .map(|p| p.stream(format!("call-{}-{index}", run.id))),
            parallel: tools.parallel,
            reasoning: run.reasoned.then(|| Reasoning {
                end_token,
                held: String::new(),
            }),
        };
        tokio::spawn(async move {
            // Ended by the response's end rather than its own: the client left (an abort), or
            // another choice failed the request (counted there).
            let cut_short = |choice: &mut Choice| {
                if run.failed.load(Ordering::SeqCst) {
                    choice.outcome.recorded = true;
                }
            };
            loop {
                let step = tokio::select! {
                    event = events.recv() => match event {
                        Some(event) => choice.apply(&run, event),
                        None => Step::Failed(engine_stopped(&run.state)),
                    },
                    () = tx.closed() => {
                        cut_short(&mut choice);
                        return;
                    }
                };
                let last = match &step {
                    Step::Delta(_) => false,
                    Step::Done { reason, .. } => {
                        choice.outcome.finish(reason.as_str());
                        true
                    }
                    Step::Failed(_) => {
                        choice.outcome.recorded = true;
                        true
                    }
                };
                if last {
                    events.close();
                }
                if tx.send((choice.index, step)).await.is_err() {
                    cut_short(&mut choice);
                    return;
                }
                if last {
                    return;
                }
            }
        });
    }
    rx
}

/// The legacy completions logprobs shape from per-token entries. A token's `text_offset` is
/// where its text begins in the output, in characters (a token that ends inside a character
/// begins where that character does), so it indexes the returned text, in a stream too.
fn completion_logprobs(entries: &[Value]) -> Value {
    json!({
        "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| e["top"].clone()).collect::<Vec<_>>(),
        "text_offset": entries.iter().map(|e| e["offset"].clone()).collect::<Vec<_>>(),
    })
}

/// A choice's whole output, for a response that is not a stream.
#[derive(Default)]
struct Whole {
    text: String,
    reasoning: String,
    logprobs: Vec<Value>,
    calls: Vec<ToolCall>,
    /// Set when the choice is done.
    reason: Option<&'static str>,
}

impl Whole {
    fn add(&mut self, out: Output) {
        self.text.push_str(&out.text);
        self.reasoning.push_str(&out.reasoning);
        self.logprobs.extend(out.logprob);
        self.calls.extend(out.calls);
    }
}

/// The whole response once every choice is done: the choices in index order, the prompt's
/// tokens counted once and every choice's output tokens.
async fn complete_response(
    run: Arc<Run>,
    mut steps: mpsc::Receiver<(usize, Step)>,
    n: usize,
) -> Response {
    let mut wholes: Vec<Whole> = (0..n).map(|_| Whole::default()).collect();
    let mut completion_tokens = 0;
    while wholes.iter().any(|w| w.reason.is_none()) {
        // Every choice's task sends its last step before it ends.
        let Some((index, step)) = steps.recv().await else {
            run.failed();
            return error_response(&ApiError::new(
                500,
                "server_error",
                engine_stopped(&run.state),
            ));
        };
        match step {
            Step::Delta(out) => wholes[index].add(out),
            Step::Done {
                out,
                reason,
                completion_tokens: tokens,
            } => {
                let whole = &mut wholes[index];
                whole.add(out);
                whole.reason = Some(finish_text(reason, !whole.calls.is_empty()));
                completion_tokens += tokens;
            }
            Step::Failed(message) => {
                run.failed();
                return error_response(&ApiError::new(500, "server_error", message));
            }
        }
    }
    let choices: Vec<Value> = wholes
        .into_iter()
        .enumerate()
        .map(|(index, whole)| run.choice(index, whole))
        .collect();
    json_response(json!({
        "id": run.id,
        "object": run.object(false),
        "created": run.created,
        "model": run.state.model_name,
        "choices": choices,
        "usage": run.usage(completion_tokens),
    }))
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The choices' steps as server-sent events, each chunk with its choice's index (a chat
/// stream first sends each choice's role), as they come; once every choice is done, the usage
/// (when asked for) and `[DONE]`.
fn stream_response(
    run: Arc<Run>,
    mut steps: mpsc::Receiver<(usize, Step)>,
    n: usize,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if run.endpoint == Endpoint::Chat {
            for index in 0..n {
                let first = run.chunk(
                    json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": null, "finish_reason": null}]),
                    None,
                );
                if tx.send(sse(&first)).await.is_err() {
                    return;
                }
            }
        }
        let (mut open, mut completion_tokens) = (n, 0);
        // Each choice's calls sent so far: the next one's index.
        let mut calls_sent = vec![0; n];
        while open > 0 {
            // Client gone: stop at once, which drops `steps` and cancels every choice.
            let step = tokio::select! {
                s = steps.recv() => s,
                () = tx.closed() => return,
            };
            let failure = match step {
                None => Some(engine_stopped(&run.state)),
                Some((_, Step::Failed(message))) => Some(message),
                Some((index, Step::Delta(out))) => {
                    if out.is_empty() {
                        continue;
                    }
                    let first_call = calls_sent[index];
                    calls_sent[index] += out.calls.len();
                    let chunk = run.chunk(
                        json!([run.choice_delta(index, out, first_call, None)]),
                        None,
                    );
                    if tx.send(sse(&chunk)).await.is_err() {
                        return;
                    }
                    None
                }
                Some((
                    index,
                    Step::Done {
                        out,
                        reason,
                        completion_tokens: tokens,
                    },
                )) => {
                    open -= 1;
                    completion_tokens += tokens;
                    let first_call = calls_sent[index];
                    calls_sent[index] += out.calls.len();
                    let reason = finish_text(reason, calls_sent[index] > 0);
                    let delta = run.choice_delta(index, out, first_call, Some(reason));
                    let last = run.chunk(json!([delta]), None);
                    if tx.send(sse(&last)).await.is_err() {
                        return;
                    }
                    None
                }
            };
            if let Some(message) = failure {
                run.failed();
                drop(steps); // ends the other choices now, not when the client has read this
                let _ = tx
                    .send(sse(&json!({"error": {"message": message,
                        "type": "server_error", "param": null, "code": null}})))
                    .await;
                // As vLLM ends a failed stream: clients wait for [DONE].
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                return;
            }
        }
        if include_usage {
            let usage = run.chunk(json!([]), Some(run.usage(completion_tokens)));
            let _ = tx.send(sse(&usage)).await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasoning_choice(end_token: Option<u32>) -> Choice {
        Choice {
            index: 0,
            decoding: DecodeState::default(),
            text: TextStream::new(Vec::new()),
            decoded_chars: 0,
            generated: 0,
            outcome: Outcome {
                metrics: Arc::new(Metrics::new()),
                recorded: true,
            },
            tools: None,
            parallel: true,
            reasoning: Some(Reasoning {
                end_token,
                held: String::new(),
            }),
        }
    }

    /// Reads `pieces` (token 7 each, or `end` where given) as one output: (reasoning, answer).
    fn split(end_token: Option<u32>, pieces: &[(u32, &str)]) -> (String, String) {
        let mut choice = reasoning_choice(end_token);
        let (mut reasoning, mut answer) = (String::new(), String::new());
        for &(id, piece) in pieces {
            let (r, a) = choice.split_reasoning(id, piece.to_string());
            reasoning.push_str(&r);
            answer.push_str(&a);
        }
        if let Some(r) = choice.reasoning.take() {
            reasoning.push_str(&r.held);
        }
        (reasoning, answer)
    }

    #[test]
    fn reasoning_ends_at_its_token_or_its_text_however_the_text_is_split() {
        let whole = ("think hard".to_string(), "answer</b>".to_string());
        let text = "think hard</think>answer</b>";
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(split(None, &[(7, a), (7, b)]), whole, "split at {cut}");
        }
        // The end token: its text is neither part, what comes before it stays reasoning.
        assert_eq!(
            split(
                Some(9),
                &[(7, "think hard"), (9, " </think>"), (7, "answer</b>")]
            ),
            whole
        );
        assert_eq!(
            split(Some(9), &[(7, "a</"), (9, ""), (7, "b")]),
            ("a</".to_string(), "b".to_string())
        );
        // No end: it is all reasoning, held back text included.
        assert_eq!(
            split(None, &[(7, "still </thi")]),
            ("still </thi".to_string(), String::new())
        );
    }
}
