//! The OpenAI-compatible HTTP API (axum): completions and chat (plain and server-sent events),
//! models, health, readiness, metrics, optional bearer key, and graceful drain. Requests are
//! validated here ([`crate::api`]) and run on the engine thread ([`crate::scheduler`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::sampling::TokenLogprob;
use crate::scheduler::{EngineHandle, Event, GenerationRequest, SubmitError};
use crate::tokenizer::{DecodeState, Tokenizer};

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
    pub draining: AtomicBool,
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
            draining: AtomicBool::new(false),
            created: unix_now(),
        }
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
        while stats.active.load(Ordering::SeqCst) > 0
            && !stats.stopped.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = drained_tx.send(());
        // Connections still open after the grace period (a stuck client) do not hold the exit.
        tokio::time::sleep(Duration::from_secs(2)).await;
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
    let body = api::parse_body(&bytes)?;
    let validated = api::validate(&body, endpoint)?;
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
    let tokenize_error = |e: crate::EngineError| ApiError::invalid(None, e.to_string());
    let prompt = match &validated.prompt {
        PromptInput::Tokens(ids) => ids.clone(),
        PromptInput::Text(text) => {
            with_bos(state, state.tokenizer.encode(text).map_err(tokenize_error)?)
        }
        PromptInput::Chat(messages) => {
            let text = state
                .tokenizer
                .apply_chat_template(messages, true)
                .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
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
    Ok(Prepared {
        validated,
        prompt,
        max_tokens,
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
    let prepared = match prepare(&state, &headers, body, endpoint) {
        Ok(p) => p,
        Err(e) => {
            state.metrics.error(e.status);
            return error_response(&e);
        }
    };
    let request = GenerationRequest {
        prompt: prepared.prompt.clone(),
        max_tokens: prepared.max_tokens,
        params: prepared.validated.params.clone(),
        stop_tokens: if prepared.validated.ignore_eos {
            prepared.validated.stop_token_ids.clone()
        } else {
            let mut stops = state.stop_tokens.clone();
            stops.extend(&prepared.validated.stop_token_ids);
            stops
        },
        min_tokens: prepared.validated.min_tokens,
        logprobs: prepared.validated.logprobs,
    };
    let events = match state.engine.submit(request) {
        Ok(rx) => rx,
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
    let outcome = Outcome {
        metrics: state.metrics.clone(),
        recorded: false,
    };
    let run = Run {
        id: request_id(match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }),
        created: unix_now(),
        endpoint,
        prompt_tokens: prepared.prompt.len(),
        decoding: DecodeState::default(),
        text: TextStream::new(prepared.validated.stop.clone()),
        decoded_chars: 0,
        logprobs: prepared.validated.logprobs.is_some(),
        state,
        outcome,
    };
    if prepared.validated.stream {
        stream_response(run, events, prepared.validated.include_usage)
    } else {
        complete_response(run, events).await
    }
}

/// One request's progress.
struct Run {
    id: String,
    created: u64,
    endpoint: Endpoint,
    prompt_tokens: usize,
    /// Where the incremental decoding of the output stands.
    decoding: DecodeState,
    text: TextStream,
    /// Characters of output text the tokens so far decoded to: where the next token's text
    /// begins (its completions logprobs `text_offset`).
    decoded_chars: usize,
    logprobs: bool,
    state: Arc<AppState>,
    outcome: Outcome,
}

/// What one engine event means to the client.
enum Step {
    Delta {
        text: String,
        logprob: Option<Value>,
    },
    Done {
        text: String,
        /// The last token's, when a stop string ends the output at that token.
        logprob: Option<Value>,
        reason: FinishReason,
        completion_tokens: usize,
    },
    Failed(String),
}

impl Run {
    fn token_text(&self, id: u32) -> String {
        self.state.tokenizer.decode(&[id]).unwrap_or_default()
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
                let mut top = serde_json::Map::new();
                for &(t, l) in &lp.top {
                    top.insert(self.token_text(t), json!(l));
                }
                json!({"token": token, "logprob": lp.logprob, "top": top, "offset": offset})
            }
        }
    }

    /// Applies one engine event; `generated` counts tokens so far.
    fn apply(&mut self, event: Event, generated: &mut usize) -> Step {
        match event {
            Event::Token { id, logprob } => {
                *generated += 1;
                let piece = self.state.tokenizer.decode_next(&mut self.decoding, id);
                let logprob = logprob
                    .filter(|_| self.logprobs)
                    .map(|lp| self.logprob_entry(&lp, self.decoded_chars));
                self.decoded_chars += piece.chars().count();
                let (text, stopped) = self.text.push(&piece);
                if stopped {
                    Step::Done {
                        text,
                        logprob,
                        reason: FinishReason::Stop,
                        completion_tokens: *generated,
                    }
                } else {
                    Step::Delta { text, logprob }
                }
            }
            Event::Finished {
                reason,
                completion_tokens,
                stop_logprob,
                ..
            } => {
                // The end of a character no token finished, as the whole output's decode shows it.
                let rest = self.state.tokenizer.decode_rest(&mut self.decoding);
                self.decoded_chars += rest.chars().count();
                let (mut text, stopped) = self.text.push(&rest);
                if !stopped {
                    text.push_str(&self.text.flush());
                }
                let logprob = stop_logprob
                    .filter(|_| self.logprobs)
                    .map(|lp| self.logprob_entry(&lp, self.decoded_chars));
                Step::Done {
                    text,
                    logprob,
                    reason: if stopped { FinishReason::Stop } else { reason },
                    completion_tokens,
                }
            }
            Event::Error(message) => Step::Failed(message),
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

    fn choice_delta(&self, text: &str, logprob: Option<Value>, finish: Option<&str>) -> Value {
        match self.endpoint {
            Endpoint::Chat => json!([{
                "index": 0,
                "delta": if text.is_empty() { json!({}) } else { json!({"content": text}) },
                "logprobs": logprob.map(|l| json!({"content": [l]})),
                "finish_reason": finish,
            }]),
            Endpoint::Completions => json!([{
                "index": 0,
                "text": text,
                "logprobs": logprob.map(|entry| completion_logprobs(&[entry])),
                "finish_reason": finish,
            }]),
        }
    }
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

async fn complete_response(mut run: Run, mut events: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut generated = 0;
    loop {
        let Some(event) = events.recv().await else {
            let e = ApiError::new(500, "server_error", engine_stopped(&run.state));
            run.outcome.recorded = true;
            run.state.metrics.error(500);
            return error_response(&e);
        };
        match run.apply(event, &mut generated) {
            Step::Delta { text: t, logprob } => {
                text.push_str(&t);
                logprobs.extend(logprob);
            }
            Step::Done {
                text: t,
                logprob,
                reason,
                completion_tokens,
            } => {
                text.push_str(&t);
                logprobs.extend(logprob);
                drop(events); // a stop string ends the request early: cancel the rest
                run.outcome.finish(reason.as_str());
                let usage = run.usage(completion_tokens);
                let choice = match run.endpoint {
                    Endpoint::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": run.logprobs.then(|| json!({"content": logprobs})),
                        "finish_reason": reason.as_str(),
                    }),
                    Endpoint::Completions => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": run.logprobs.then(|| completion_logprobs(&logprobs)),
                        "finish_reason": reason.as_str(),
                    }),
                };
                return json_response(json!({
                    "id": run.id,
                    "object": run.object(false),
                    "created": run.created,
                    "model": run.state.model_name,
                    "choices": [choice],
                    "usage": usage,
                }));
            }
            Step::Failed(message) => {
                let e = ApiError::new(500, "server_error", message);
                run.state.metrics.error(500);
                run.outcome.recorded = true;
                return error_response(&e);
            }
        }
    }
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn stream_response(
    mut run: Run,
    mut events: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut generated = 0;
        if run.endpoint == Endpoint::Chat {
            let first = run.chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": null, "finish_reason": null}]),
                None,
            );
            if tx.send(sse(&first)).await.is_err() {
                return;
            }
        }
        loop {
            // Client gone: stop at once, which drops `events` and cancels the request.
            let event = tokio::select! {
                e = events.recv() => e,
                () = tx.closed() => return,
            };
            let Some(event) = event else {
                run.outcome.recorded = true;
                run.state.metrics.error(500);
                let _ = tx
                    .send(sse(
                        &json!({"error": {"message": engine_stopped(&run.state),
                        "type": "server_error", "param": null, "code": null}}),
                    ))
                    .await;
                // As vLLM ends a failed stream: clients wait for [DONE].
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                return;
            };
            match run.apply(event, &mut generated) {
                Step::Delta { text, logprob } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let chunk = run.chunk(run.choice_delta(&text, logprob, None), None);
                    if tx.send(sse(&chunk)).await.is_err() {
                        return;
                    }
                }
                Step::Done {
                    text,
                    logprob,
                    reason,
                    completion_tokens,
                } => {
                    drop(events);
                    run.outcome.finish(reason.as_str());
                    let last = run.chunk(
                        run.choice_delta(&text, logprob, Some(reason.as_str())),
                        None,
                    );
                    let _ = tx.send(sse(&last)).await;
                    if include_usage {
                        let usage = run.chunk(json!([]), Some(run.usage(completion_tokens)));
                        let _ = tx.send(sse(&usage)).await;
                    }
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
                Step::Failed(message) => {
                    run.outcome.recorded = true;
                    run.state.metrics.error(500);
                    let _ = tx
                        .send(sse(&json!({"error": {"message": message,
                            "type": "server_error", "param": null, "code": null}})))
                        .await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            }
        }
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
