//! The HTTP API with a real client (hyper) on 127.0.0.1, over a fixture model with a word-level
//! tokenizer built here: completions and chat, streaming, bad input, backpressure, preemption,
//! client disconnects and graceful drain.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::backend::{Backend, Expert, MlaDims, MlaSeq, MlaWeights, NoPicks, Routing};
use sparsemoe_engine::expert_shards::Pair;
use sparsemoe_engine::model::{Model, ModelOptions};
use sparsemoe_engine::rope::{Rope, RopeLayout};
use sparsemoe_engine::serve::{ServeArgs, build_state};
use sparsemoe_engine::server::{self, AppState};
use sparsemoe_engine::tokenizer::Tokenizer;
use sparsemoe_engine::weights::Matrix;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v32_sparse_moe")
}

/// The fixture's chat template.
const TEMPLATE: &str = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}\
                        {% if add_generation_prompt %}t9{% endif %}";

/// Words `<s>`, `</s>`, `t2` … `t255` for the fixture's 256-token vocabulary.
fn tokenizer() -> Tokenizer {
    tokenizer_with(&[], Some(TEMPLATE))
}

/// The same vocabulary with `words` (id, text) in place of some `t…`, and `chat_template`.
fn tokenizer_with(words: &[(u32, &str)], chat_template: Option<&str>) -> Tokenizer {
    tokenizer_with_special(words, &[], chat_template)
}

/// [`tokenizer_with`], with the words of `special` (ids among `words`) marked special.
fn tokenizer_with_special(
    words: &[(u32, &str)],
    special: &[u32],
    chat_template: Option<&str>,
) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), json!(0));
    vocab.insert("</s>".into(), json!(1));
    for i in 2..256 {
        let word = words.iter().find(|&&(id, _)| id == i);
        vocab.insert(word.map_or(format!("t{i}"), |w| w.1.into()), json!(i));
    }
    let token = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let mut added = vec![token(0, "<s>"), token(1, "</s>")];
    for &(id, word) in words.iter().filter(|(id, _)| special.contains(id)) {
        added.push(token(id, word));
    }
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t2"}
    });
    let mut config = json!({"bos_token": "<s>", "eos_token": "</s>"});
    if let Some(template) = chat_template {
        config["chat_template"] = json!(template);
    }
    Tokenizer::from_bytes(
        &serde_json::to_vec(&json).unwrap(),
        Some(&config.to_string()),
    )
    .unwrap()
}

struct Server {
    base: String,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn start(extra: &[&str]) -> Server {
    start_with(
        Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap(),
        extra,
    )
    .await
}

async fn start_with<B: Backend>(model: Model<B>, extra: &[&str]) -> Server {
    start_with_tokenizer(model, tokenizer(), extra).await
}

async fn start_with_tokenizer<B: Backend>(
    model: Model<B>,
    tokenizer: Tokenizer,
    extra: &[&str],
) -> Server {
    let mut argv = vec!["serve", "--served-model-name", "tiny"];
    argv.extend_from_slice(extra);
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServeArgs,
    }
    let args = Wrap::parse_from(argv).args;
    let state = build_state(model, tokenizer, "fixture".into(), &args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server::serve(
        listener,
        state.clone(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(args.drain_grace_secs),
    ));
    Server {
        base,
        state,
        stop: Some(stop),
        done,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// The JSON chunks of a stream, which must end with `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        let events = self.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }
}

impl Server {
    async fn send(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Reply {
        let body = body.into();
        // The server may answer (413) and close before a huge body is fully sent; the client
        // then sometimes reports the broken write instead of the answer: try again.
        let mut last_error = String::new();
        for _ in 0..20 {
            match self.try_send(method, path, body.clone()).await {
                Ok(reply) => return reply,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!(
            "{method} {path} ({} body bytes): 20 tries failed, the last with: {last_error}",
            body.len()
        );
    }

    async fn try_send(&self, method: &str, path: &str, body: Bytes) -> Result<Reply, String> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, body.to_string()).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, Bytes::new()).await
    }

    /// The value of an unlabelled sample in `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let metrics = String::from_utf8_lossy(&self.get("/metrics").await.body).into_owned();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    }

    async fn idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stats = &self.state.engine.stats;
        while stats.active.load(Ordering::SeqCst) > 0
            || stats.used_blocks.load(Ordering::SeqCst) > 0
        {
            assert!(
                Instant::now() < deadline,
                "engine not idle: {} active, {} blocks",
                stats.active.load(Ordering::SeqCst),
                stats.used_blocks.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.done.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_keeps_the_last_tokens_logprob() {
    let s = start(&[]).await;
    let body = json!({"prompt": "t5 t6 t7", "max_tokens": 4, "temperature": 0, "logprobs": 1,
                      "ignore_eos": true});
    let free = s.post("/v1/completions", body.clone()).await.json();
    let tokens: Vec<String> = free["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(tokens.len(), 4, "{free}");
    // The text of the first two tokens (the fixture's tokens are words) as the stop string:
    // the output ends at the second token.
    let text = free["choices"][0]["text"].as_str().unwrap();
    let stop = format!("{} {}", tokens[0], tokens[1]);
    assert!(text.starts_with(&stop), "{free}");
    let mut stopped = body.clone();
    stopped["stop"] = json!([stop]);
    s.idle().await;
    let latencies_before = s
        .metric("sparsemoe_e2e_request_latency_seconds_count")
        .await;
    for stream in [false, true] {
        stopped["stream"] = json!(stream);
        let r = s.post("/v1/completions", stopped.clone()).await;
        assert_eq!(r.status, 200);
        let (entries, reason) = if stream {
            let events = r.events();
            let chunks: Vec<Value> = events
                .iter()
                .filter(|e| *e != "[DONE]")
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let entries: usize = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array())
                .map(Vec::len)
                .sum();
            let reason = chunks.last().unwrap()["choices"][0]["finish_reason"].clone();
            (entries, reason)
        } else {
            let v = r.json();
            assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
            assert_eq!(
                v["choices"][0]["text"], "",
                "the stop string is not returned: {v}"
            );
            let entries = v["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .len();
            (entries, v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(reason, "stop", "stream {stream}");
        assert_eq!(
            entries, 2,
            "stream {stream}: a logprob for each of the 2 tokens"
        );
    }
    // The engine sees those ends as cancellations; their latencies are counted all the same.
    s.idle().await;
    let latencies = s
        .metric("sparsemoe_e2e_request_latency_seconds_count")
        .await;
    assert_eq!(latencies - latencies_before, 2.0);
    s.shutdown().await;
}

/// A completion's logprobs give each token's `text_offset` as where its text begins in the
/// returned text, in characters, and a stream's chunks give the same offsets (not from 0 in
/// every chunk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_logprobs_go_on_where_the_last_chunk_ended() {
    let s = start(&[]).await;
    let mut body = json!({"prompt": "t5 t6 t7", "max_tokens": 6, "temperature": 0, "logprobs": 1,
                          "ignore_eos": true});
    let whole = s.post("/v1/completions", body.clone()).await.json();
    let logprobs = &whole["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap().clone();
    let offsets = logprobs["text_offset"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 6, "{whole}");
    let output = whole["choices"][0]["text"].as_str().unwrap();
    for (token, offset) in tokens.iter().zip(&offsets) {
        // The fixture's tokens are words, each but the first after a space.
        let from: String = output
            .chars()
            .skip(offset.as_u64().unwrap() as usize)
            .collect();
        let token = token.as_str().unwrap();
        assert!(
            from.trim_start().starts_with(token),
            "{token:?} at {offset}: {whole}"
        );
    }
    assert!(
        offsets[5].as_u64().unwrap() > offsets[4].as_u64().unwrap(),
        "{whole}"
    );

    body["stream"] = json!(true);
    let r = s.post("/v1/completions", body).await;
    let (mut streamed_tokens, mut streamed_offsets, mut text) = (vec![], vec![], String::new());
    for event in r.events().iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        text.push_str(choice["text"].as_str().unwrap_or(""));
        if let Some(lp) = choice["logprobs"].as_object() {
            streamed_tokens.extend(lp["tokens"].as_array().unwrap().iter().cloned());
            streamed_offsets.extend(lp["text_offset"].as_array().unwrap().iter().cloned());
        }
    }
    assert_eq!(text, whole["choices"][0]["text"]);
    assert_eq!(streamed_tokens, tokens);
    assert_eq!(streamed_offsets, offsets);
    s.shutdown().await;
}

/// A `max_tokens` the prompt leaves no room for is a 400 naming the parameter, as in vLLM;
/// completions' default of 16 is cut to the room instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_tokens_past_the_context_is_refused_and_a_default_is_cut() {
    let s = start(&[]).await;
    let max = s.state.max_context;
    let prompt: Vec<u32> = (0..max - 10).map(|i| 3 + (i % 5) as u32).collect();
    for param in ["max_tokens", "max_completion_tokens"] {
        let r = s
            .post("/v1/completions", json!({"prompt": prompt, param: 11}))
            .await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains("room for 10"), "{message}");
    }
    let fits = json!({"prompt": prompt, "max_tokens": 10, "ignore_eos": true});
    let v = s.post("/v1/completions", fits).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 10, "{v}");
    let default = json!({"prompt": prompt, "ignore_eos": true});
    let v = s.post("/v1/completions", default).await.json();
    assert_eq!(
        v["usage"]["completion_tokens"], 10,
        "16 cut to the room: {v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_report_usage_and_finish_reasons() {
    let s = start(&[]).await;
    let r = s
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 5, "temperature": 0,
                   "logprobs": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], 4, "<s> + 3 words");
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(
        (completion == 5 && reason == "length") || (completion < 5 && reason == "stop"),
        "{v}"
    );
    let logprobs = &v["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["token_logprobs"].as_array().unwrap().len() as u64,
        completion
    );

    // Each top_logprobs entry holds the sampled token as well, even with logprobs 0 (OpenAI's
    // and vLLM's legacy shape: up to logprobs + 1 entries).
    for (logprobs, most) in [(0, 1), (2, 3)] {
        let v = s
            .post(
                "/v1/completions",
                json!({"prompt": "t5 t6 t7", "max_tokens": 6, "temperature": 1.0, "seed": 7,
                       "logprobs": logprobs}),
            )
            .await
            .json();
        let lp = &v["choices"][0]["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty(), "{v}");
        for (i, token) in tokens.iter().enumerate() {
            let top = lp["top_logprobs"][i].as_object().unwrap();
            assert!(
                (1..=most).contains(&top.len()),
                "logprobs {logprobs}: {top:?}"
            );
            assert_eq!(
                top[token.as_str().unwrap()],
                lp["token_logprobs"][i],
                "logprobs {logprobs}: token {i}"
            );
        }
    }

    // Seeded sampling is reproducible.
    let seeded = json!({"prompt": [0, 5, 6], "max_tokens": 8, "temperature": 1.0, "seed": 42});
    let a = s.post("/v1/completions", seeded.clone()).await.json();
    let b = s.post("/v1/completions", seeded).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);

    let v = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "t3 t4"}], "max_tokens": 3,
                   "logprobs": true, "top_logprobs": 1}),
        )
        .await
        .json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 3);
    // As many alternatives as asked for: top_logprobs, else none.
    for (top, want) in [(Some(1), 1), (None, 0)] {
        let mut body = json!({"messages": [{"role": "user", "content": "t3 t4"}],
                              "max_tokens": 3, "logprobs": true});
        if let Some(top) = top {
            body["top_logprobs"] = json!(top);
        }
        let v = s.post("/v1/chat/completions", body).await.json();
        let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert!(!content.is_empty(), "{v}");
        for entry in content {
            assert_eq!(
                entry["top_logprobs"].as_array().unwrap().len(),
                want,
                "top_logprobs {top:?}: {entry}"
            );
        }
    }

    let models = s.get("/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert!(models["data"][0].get("revision").is_none(), "{models}");
    assert_eq!(s.get("/health").await.status, 200);
    assert_eq!(s.get("/ready").await.status, 200);
    let metrics = String::from_utf8_lossy(&s.get("/metrics").await.body).into_owned();
    for name in [
        "sparsemoe_num_requests_running",
        "sparsemoe_max_running_requests 64\n",
        "sparsemoe_kv_cache_usage_perc",
        "sparsemoe_time_to_first_token_seconds_bucket",
        "sparsemoe_generation_tokens_total",
        "sparsemoe_request_success_total{finished_reason=",
        "sparsemoe_expert_tokens_total{expert=",
        "sparsemoe_model_info{arch=",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    s.shutdown().await;
}

/// `--kv-cache-dtype bfloat16` fits twice the tokens in the same bytes and serves; the dtype
/// and `--model-revision` show in `/v1/models` and `sparsemoe_model_info`; a dtype the engine
/// does not know is refused at start-up, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_kv_cache_holds_twice_the_tokens() {
    let blocks = |s: &Server| s.state.engine.stats.total_blocks.load(Ordering::SeqCst);
    let bytes = ["--kv-cache-bytes", "4194304"];
    let f32 = start(&[&bytes[..], &["--kv-cache-dtype", "float32"]].concat()).await;
    let bf16 = start(
        &[
            &bytes[..],
            &[
                "--kv-cache-dtype",
                "bfloat16",
                "--model-revision",
                "0123abc",
            ],
        ]
        .concat(),
    )
    .await;
    assert!(blocks(&f32) > 0);
    assert_eq!(blocks(&bf16), 2 * blocks(&f32));
    // `auto` follows --dtype, which is float32 on the CPU.
    let auto = start(&bytes).await;
    assert_eq!(blocks(&auto), blocks(&f32));

    let r = bf16
        .post(
            "/v1/completions",
            json!({"prompt": "t1 t2 t3", "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["usage"]["completion_tokens"], 8);
    let models = bf16.get("/v1/models").await.json();
    assert_eq!(models["data"][0]["revision"], "0123abc");
    let metrics = String::from_utf8_lossy(&bf16.get("/metrics").await.body).into_owned();
    let info = metrics
        .lines()
        .find(|l| l.starts_with("sparsemoe_model_info{"))
        .unwrap_or_else(|| panic!("no model info in\n{metrics}"));
    for label in [
        "kv_cache_dtype=\"bfloat16\"",
        "revision=\"0123abc\"",
        "model=\"tiny\"",
    ] {
        assert!(info.contains(label), "{label} missing from {info}");
    }
    for s in [f32, bf16, auto] {
        s.shutdown().await;
    }

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServeArgs,
    }
    let args = Wrap::parse_from(["serve", "--kv-cache-dtype", "float16"]).args;
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let err = build_state(model, tokenizer(), "fixture".into(), &args)
        .expect_err("float16 is not a KV cache dtype")
        .to_string();
    assert!(
        err.contains("--kv-cache-dtype float16") && err.contains("`bfloat16`"),
        "{err}"
    );
}

/// The sampling controls vLLM users send act on the output: a +100 `logit_bias` makes greedy
/// decoding repeat one token, `min_tokens` holds the end-of-sequence token back that long,
/// `stop_token_ids` ends the output (also with `ignore_eos`), and a biased token outside the
/// vocabulary is a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_min_tokens_and_stop_token_ids_shape_the_output() {
    let s = start(&[]).await;
    let eos = *s
        .state
        .stop_tokens
        .first()
        .expect("the fixture has an EOS token");
    let token = (0..s.state.vocab_size as u32)
        .find(|t| !s.state.stop_tokens.contains(t) && *t != eos)
        .unwrap();
    let complete = |extra: Value| {
        let mut body = json!({"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/v1/completions", body)
    };
    let r = complete(json!({"logit_bias": {token.to_string(): 100}})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(
        v["choices"][0]["text"],
        tokenizer().decode(&[token; 6]).unwrap(),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // The stop token counts as generated (as OpenAI and vLLM count it); its text is not sent.
    let eos_bias = json!({eos.to_string(): 100});
    let r = complete(json!({"logit_bias": eos_bias, "logprobs": 1}))
        .await
        .json();
    assert_eq!(r["usage"]["completion_tokens"], 1, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["choices"][0]["text"], "", "{r}");
    // Its logprob is there, one for each counted token.
    let lps = r["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(lps.len(), 1, "{r}");
    // Named as a special token, not as the empty text it adds (as vLLM shows it).
    let name = tokenizer().token_text(eos);
    assert!(!name.is_empty());
    assert_eq!(r["choices"][0]["logprobs"]["tokens"][0], name, "{r}");
    // The model's own log-probability, before the bias, as for every other token.
    let lp = lps[0].as_f64().unwrap();
    assert!(lp.is_finite() && lp <= 0.0, "{r}");
    let r = complete(json!({"logit_bias": eos_bias, "min_tokens": 4}))
        .await
        .json();
    assert_eq!(r["usage"]["completion_tokens"], 5, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    for ignore_eos in [false, true] {
        let r = complete(json!({"logit_bias": {token.to_string(): 100},
                                "stop_token_ids": [token], "ignore_eos": ignore_eos}))
        .await
        .json();
        assert_eq!(r["usage"]["completion_tokens"], 1, "{r}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(r["choices"][0]["text"], "", "{r}");
    }

    let vocab = s.state.vocab_size;
    let r = complete(json!({"logit_bias": {vocab.to_string(): 1}})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "logit_bias");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_ends_with_done_and_usage() {
    let s = start(&[]).await;
    let r = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "t3"}], "max_tokens": 6,
                   "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let chunks = r.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);
    let finished = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finished == "length" || finished == "stop", "{finished}");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );

    // Completions stream the same way.
    let r = s
        .post(
            "/v1/completions",
            json!({"prompt": "t7", "max_tokens": 4, "stream": true}),
        )
        .await;
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    s.shutdown().await;
}

/// `n` choices are sequences of their own: choice i under seed s is what a request of one
/// choice under seed s + i gives (so the choices differ, and the request reproduces), the
/// usage counts the prompt once and every choice's tokens, a stream tags each chunk with its
/// choice (a chat stream opens each with its role) and ends once all are done, and an `n` the
/// queue can never hold is a 400 that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_sequences_of_their_own() {
    let s = start(&["--max-queue", "8"]).await;
    let body = |n: u64, seed: u64| {
        json!({"prompt": "t3 t4", "n": n, "max_tokens": 8, "ignore_eos": true,
               "temperature": 1.0, "seed": seed, "logprobs": 0})
    };
    let r = s.post("/v1/completions", body(3, 11)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let whole = r.json();
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{whole}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i as u64, "{whole}");
        assert_eq!(choice["finish_reason"], "length", "{whole}");
        assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), 8);
        // The same tokens; their logprobs within the rounding a batch of another size gives.
        let one = s
            .post("/v1/completions", body(1, 11 + i as u64))
            .await
            .json();
        let (lp, one_lp) = (&choice["logprobs"], &one["choices"][0]["logprobs"]);
        assert_eq!(one["choices"][0]["text"], choice["text"], "choice {i}");
        assert_eq!(one_lp["tokens"], lp["tokens"], "choice {i}");
        let near = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4;
        let (a, b) = (
            lp["token_logprobs"].as_array().unwrap(),
            one_lp["token_logprobs"].as_array(),
        );
        assert!(
            a.iter().zip(b.unwrap()).all(|(a, b)| near(a, b)),
            "choice {i}: {lp} {one_lp}"
        );
        assert_eq!(
            one["usage"]["prompt_tokens"],
            whole["usage"]["prompt_tokens"]
        );
    }
    assert!(
        choices[0]["text"] != choices[1]["text"] || choices[1]["text"] != choices[2]["text"],
        "three seeded choices, all the same: {whole}"
    );
    assert_eq!(whole["usage"]["completion_tokens"], 24, "{whole}");
    let again = s.post("/v1/completions", body(3, 11)).await.json();
    let texts = |v: &Value| -> Vec<Value> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].clone())
            .collect()
    };
    assert_eq!(texts(&again), texts(&whole), "the same request again");

    // A chat stream of two choices against the same request whole.
    let chat = |stream: bool| {
        let mut body = json!({"messages": [{"role": "user", "content": "t5"}], "n": 2,
                              "max_tokens": 5, "ignore_eos": true, "seed": 3, "stream": stream});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    };
    let want = s.post("/v1/chat/completions", chat(false)).await.json();
    let r = s.post("/v1/chat/completions", chat(true)).await;
    assert_eq!(r.status, 200);
    let chunks = r.chunks();
    let (mut texts, mut roles, mut finishes) = (vec![String::new(); 2], [0; 2], [0; 2]);
    for chunk in &chunks[..chunks.len() - 1] {
        let choices = chunk["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "{chunk}");
        let i = choices[0]["index"].as_u64().unwrap() as usize;
        let delta = &choices[0]["delta"];
        if delta["role"] == "assistant" {
            roles[i] += 1;
        }
        texts[i].push_str(delta["content"].as_str().unwrap_or_default());
        if !choices[0]["finish_reason"].is_null() {
            finishes[i] += 1;
        }
    }
    assert_eq!((roles, finishes), ([1, 1], [1, 1]), "{chunks:?}");
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            want["choices"][i]["message"]["content"].as_str(),
            Some(text.as_str()),
            "choice {i}"
        );
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 10, "{usage}");
    assert_eq!(usage, &want["usage"]);

    // More choices than the queue holds can never run: a 400 naming n, not a 429.
    let r = s.post("/v1/completions", body(9, 1)).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["param"], "n", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-queue"),
        "{e}"
    );
    s.idle().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_an_openai_error_and_harms_nothing() {
    let s = start(&[]).await;
    let cases: Vec<(&str, Bytes, u16, &str)> = vec![
        (
            "malformed JSON",
            Bytes::from("{\"prompt\": "),
            400,
            "invalid",
        ),
        (
            "wrong type",
            Bytes::from(r#"{"prompt": "t3", "max_tokens": "many"}"#),
            400,
            "max_tokens",
        ),
        ("missing prompt", Bytes::from("{}"), 400, "prompt"),
        (
            "unknown model",
            Bytes::from(r#"{"prompt": "t3", "model": "gpt-9"}"#),
            404,
            "gpt-9",
        ),
        (
            "unknown model, bad fields too",
            Bytes::from(r#"{"prompt": "t3", "model": "gpt-9", "top_p": 0}"#),
            404,
            "gpt-9",
        ),
        (
            "too long",
            Bytes::from(json!({"prompt": vec![5; 600]}).to_string()),
            400,
            "512",
        ),
        (
            "max_tokens 0",
            Bytes::from(r#"{"prompt": "t3", "max_tokens": 0}"#),
            400,
            "max_tokens",
        ),
        (
            "negative temperature",
            Bytes::from(r#"{"prompt": "t3", "temperature": -1}"#),
            400,
            "temperature",
        ),
        (
            "invalid UTF-8",
            Bytes::from_static(b"{\"prompt\": \"\xff\xfe\"}"),
            400,
            "UTF-8",
        ),
        (
            "token out of range",
            Bytes::from(r#"{"prompt": [3, 999]}"#),
            400,
            "999",
        ),
        (
            "n=129",
            Bytes::from(r#"{"prompt": "t3", "n": 129}"#),
            400,
            "between 1 and 128",
        ),
        (
            "20 MB body",
            Bytes::from(vec![b' '; 20 << 20]),
            413,
            "larger than",
        ),
    ];
    for (what, body, status, needle) in cases {
        let r = s.send("POST", "/v1/completions", body).await;
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let e = r.json();
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {e}");
        assert!(e["error"]["type"].is_string(), "{what}: {e}");
    }

    // A chat without max_tokens may generate up to the context's room: a min_tokens beyond it
    // cannot be met (as vLLM refuses it).
    let r = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "t3"}], "min_tokens": 600}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["param"], "min_tokens");

    // A route asked with a method it does not take, and a route that does not exist: OpenAI
    // error bodies too.
    for (method, path, status) in [
        ("GET", "/v1/completions", 405),
        ("POST", "/v1/models", 405),
        ("GET", "/v1/embeddings", 404),
    ] {
        let r = s.send(method, path, Bytes::new()).await;
        assert_eq!(r.status, status, "{method} {path}");
        let e = r.json();
        assert!(e["error"]["message"].is_string(), "{method} {path}: {e}");
    }

    // A header flood is refused by the HTTP layer, not the process.
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut flood = String::from("GET /health HTTP/1.1\r\nhost: x\r\n");
    for i in 0..500 {
        flood.push_str(&format!("x-flood-{i}: {}\r\n", "y".repeat(64)));
    }
    flood.push_str("\r\n");
    let _ = tcp.write_all(flood.as_bytes()).await;
    let mut reply = vec![0; 64];
    let n = tcp.read(&mut reply).await.unwrap_or(0);
    let head = String::from_utf8_lossy(&reply[..n]).into_owned();
    assert!(!head.contains(" 200 "), "header flood accepted: {head}");

    // The server still answers.
    let r = s
        .post("/v1/completions", json!({"prompt": "t3", "max_tokens": 2}))
        .await;
    assert_eq!(r.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sekret\n").unwrap();
    let s = start(&["--api-key-file", key.to_str().unwrap()]).await;
    let r = s.post("/v1/completions", json!({"prompt": "t3"})).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let request = hyper::Request::builder()
        .method("POST")
        .uri(format!("{}/v1/completions", s.base))
        .header("authorization", "Bearer sekret")
        .body(Full::new(Bytes::from(
            json!({"prompt": "t3", "max_tokens": 1}).to_string(),
        )))
        .unwrap();
    assert_eq!(s.client.request(request).await.unwrap().status(), 200);
    s.shutdown().await;
}

/// The model's generation_config.json gives the sampling settings a request leaves out (here
/// temperature 0: greedy), and only those; `--generation-config vllm` takes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_config_defaults_apply_to_fields_a_request_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"do_sample": true, "temperature": 0.0}"#,
    )
    .unwrap();
    let config = dir.path().to_str().unwrap();
    let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let prompt: Vec<u32> = (3..12).collect();
    let body = |extra: Value| {
        let mut b = json!({"prompt": prompt, "max_tokens": 12});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let s = start(&["--generation-config", config]).await;
    let greedy = text(
        s.post("/v1/completions", body(json!({"temperature": 0})))
            .await
            .json(),
    );
    for _ in 0..2 {
        let left_out = s.post("/v1/completions", body(json!({}))).await.json();
        assert_eq!(text(left_out), greedy, "no temperature given: the file's 0");
    }
    // A request's own temperature wins: of 8 seeds, some continuation is not the greedy one.
    let mut sampled = Vec::new();
    for seed in 0..8 {
        let v = body(json!({"temperature": 1.5, "seed": seed}));
        sampled.push(text(s.post("/v1/completions", v).await.json()));
    }
    assert!(sampled.iter().any(|t| *t != greedy), "{sampled:?}");
    s.shutdown().await;
    // Without the file's defaults, a request that leaves temperature out samples at 1.
    let s = start(&["--generation-config", "vllm"]).await;
    let mut unseeded = Vec::new();
    for seed in 0..8 {
        unseeded.push(text(
            s.post("/v1/completions", body(json!({"seed": seed})))
                .await
                .json(),
        ));
    }
    assert!(unseeded.iter().any(|t| *t != greedy), "{unseeded:?}");
    s.shutdown().await;
}

#[test]
fn a_max_model_len_past_the_model_is_refused_and_past_the_cache_capped() {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServeArgs,
    }
    let state = |extra: &[&str]| {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(extra);
        let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
        build_state(
            model,
            tokenizer(),
            "fixture".into(),
            &Wrap::parse_from(argv).args,
        )
    };
    // The fixture's max_position_embeddings is 512.
    let Err(err) = state(&["--max-model-len", "513"]) else {
        panic!("a length past the model's context was served");
    };
    assert!(
        format!("{err:#}").contains("longer than the model's context of 512"),
        "{err:#}"
    );
    // 448 bytes per token: 8 blocks of 16 tokens hold 128 tokens. A length past that is
    // capped (one spec's length goes to every GPU variant, some with less memory).
    let small = ["--kv-cache-bytes", "57344"];
    let capped = state(&[&small[..], &["--max-model-len", "129"]].concat()).unwrap();
    assert_eq!(capped.max_context, 128);
    // What fits is served as asked; without the flag the cache's capacity caps the model's.
    let fits = state(&[&small[..], &["--max-model-len", "100"]].concat()).unwrap();
    assert_eq!(fits.max_context, 100);
    assert_eq!(state(&["--max-model-len", "512"]).unwrap().max_context, 512);
    assert_eq!(state(&small).unwrap().max_context, 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_preempts_and_every_request_still_finishes() {
    // 448 bytes per token on the fixture: 8 blocks of 16 tokens = 128 tokens of KV in all.
    let s = start(&["--kv-cache-bytes", "57344", "--max-batch-tokens", "32"]).await;
    assert_eq!(s.state.max_context, 128);
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let body = json!({"prompt": [0, 3 + i, 4, 5, 6, 7, 8, 9], "max_tokens": 40,
                          "temperature": 0.7, "seed": i});
        let (client, base) = (s.client.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let request = hyper::Request::builder()
                .method("POST")
                .uri(format!("{base}/v1/completions"))
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&body).unwrap())
        }));
    }
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        let reason = &v["choices"][0]["finish_reason"];
        assert!(reason == "length" || reason == "stop", "{v}");
    }
    s.idle().await;
    let preemptions = s.metric("sparsemoe_num_preemptions_total").await;
    assert!(preemptions > 0.0, "expected preemptions");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = start(&["--max-queue", "1", "--max-running", "1"]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, base) = (s.client.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let request = hyper::Request::builder()
                .method("POST")
                .uri(format!("{base}/v1/completions"))
                .body(Full::new(Bytes::from(
                    json!({"prompt": "t3", "max_tokens": 30}).to_string(),
                )))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let retry = response.headers().get("retry-after").cloned();
            (response.status().as_u16(), retry)
        }));
    }
    let mut limited = 0;
    for t in tasks {
        let (status, retry) = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        if status == 429 {
            limited += 1;
            assert!(retry.is_some(), "429 without Retry-After");
        }
    }
    assert!(limited > 0, "eight requests against a queue of one");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_free_their_kv_blocks() {
    let s = start(&[]).await;
    for _ in 0..4 {
        let request = hyper::Request::builder()
            .method("POST")
            .uri(format!("{}/v1/completions", s.base))
            .body(Full::new(Bytes::from(
                json!({"prompt": [0, 3, 4], "max_tokens": 400, "stream": true}).to_string(),
            )))
            .unwrap();
        let response = s.client.request(request).await.unwrap();
        let mut body = response.into_body();
        // Read the first event, then vanish.
        let _ = body.frame().await;
        drop(body);
    }
    s.idle().await;
    assert_eq!(s.state.engine.stats.running.load(Ordering::SeqCst), 0);
    let metrics = String::from_utf8_lossy(&s.get("/metrics").await.body).into_owned();
    assert!(
        metrics.contains("sparsemoe_kv_cache_usage_perc 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("finished_reason=\"abort\""), "{metrics}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_streams_and_refuses_new_requests() {
    let mut s = start(&["--max-running", "64"]).await;
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let (client, base) = (s.client.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let request = hyper::Request::builder()
                .method("POST")
                .uri(format!("{base}/v1/completions"))
                .body(Full::new(Bytes::from(
                    // ignore_eos: every stream runs its 300 tokens, so none ends before
                    // the signal and the server is still draining when the next request comes.
                    json!({"prompt": [0, 2 + i % 200], "max_tokens": 300, "stream": true,
                           "temperature": 0, "ignore_eos": true})
                    .to_string(),
                )))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }));
    }
    // Wait until all 50 are accepted, then signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.state.engine.stats.active.load(Ordering::SeqCst) < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = s.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(5)).await;
    let refused = s.post("/v1/completions", json!({"prompt": "t3"})).await;
    assert_eq!(refused.status, 503);
    assert_eq!(s.get("/ready").await.status, 503);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            body.ends_with("data: [DONE]\n\n"),
            "unfinished stream: {body}"
        );
    }
    s.done.await.unwrap().unwrap();
}

/// A request still being prepared (parsed, templated, tokenized) when the drain begins is not
/// yet the engine's: the drain waits for it as for a running one, past the two seconds it
/// gives open connections once nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_requests_still_being_prepared() {
    let mut s = start(&[]).await;
    // As a request's handler counts itself before it looks at the drain.
    s.state.preparing.fetch_add(1, Ordering::SeqCst);
    let _ = s.stop.take().unwrap().send(());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!s.done.is_finished(), "the server stopped under a request");
    assert_eq!(s.get("/ready").await.status, 503, "not draining");
    // Submitted (the engine counts it) and finished: the drain ends.
    s.state.preparing.fetch_sub(1, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), &mut s.done)
        .await
        .expect("the drain did not end")
        .unwrap()
        .unwrap();
}

/// `ignore_eos` (vLLM's extension) keeps generating past the end-of-sequence token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_generates_past_the_end_of_sequence() {
    let s = start(&[]).await;
    let body = |i: u32, ignore: bool| json!({"prompt": [0, 2 + i], "max_tokens": 300, "temperature": 0, "ignore_eos": ignore});
    // A prompt whose greedy continuation ends on the end-of-sequence token.
    let mut found = None;
    for i in 0..100 {
        let v = s.post("/v1/completions", body(i, false)).await.json();
        if v["choices"][0]["finish_reason"] == "stop" {
            found = Some((i, v["usage"]["completion_tokens"].as_u64().unwrap()));
            break;
        }
    }
    let (i, ended_after) = found.expect("no prompt among 100 ended on end-of-sequence");
    assert!(ended_after < 300);
    let v = s.post("/v1/completions", body(i, true)).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 300, "{v}");
}

/// The CPU backend on a device that can be lost: once `lost` is set, every product panics, as
/// the CUDA backend does when its device fails in the middle of a step (the trait's compute
/// methods cannot return errors). While `nan` is set, every product is NaN (a numeric fault).
#[derive(Clone, Debug, Default)]
struct LosableCpu {
    cpu: Cpu,
    lost: Arc<std::sync::atomic::AtomicBool>,
    nan: Arc<std::sync::atomic::AtomicBool>,
}

type T = <Cpu as Backend>::Tensor;
type W = <Cpu as Backend>::Weight;
type S = <Cpu as Backend>::Store;

impl Backend for LosableCpu {
    type Tensor = T;
    type Weight = W;
    type Store = S;
    type Picks = NoPicks;

    fn name(&self) -> String {
        format!("losable {}", self.cpu.name())
    }
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.cpu.install(f)
    }
    fn upload(&self, matrix: Matrix) -> sparsemoe_engine::error::Result<W> {
        self.cpu.upload(matrix)
    }
    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> T {
        self.cpu.tensor(rows, cols, data)
    }
    fn kv_dtype(&self, store: &S) -> sparsemoe_engine::kv_cache::KvDtype {
        self.cpu.kv_dtype(store)
    }
    fn to_host(&self, x: &T) -> Vec<f32> {
        self.cpu.to_host(x)
    }
    fn shape(&self, x: &T) -> (usize, usize) {
        self.cpu.shape(x)
    }
    fn embed(&self, table: &W, tokens: &[u32]) -> T {
        self.cpu.embed(table, tokens)
    }
    fn linear(&self, x: &T, w: &W) -> T {
        assert!(
            !self.lost.load(Ordering::SeqCst),
            "CUDA cublasSgemm: CUBLAS_STATUS_EXECUTION_FAILED (the device was lost)"
        );
        let y = self.cpu.linear(x, w);
        if self.nan.load(Ordering::SeqCst) {
            let (rows, cols) = self.cpu.shape(&y);
            return self.cpu.tensor(rows, cols, vec![f32::NAN; rows * cols]);
        }
        y
    }
    fn rms_norm(&self, x: &T, w: &T, eps: f32) -> T {
        self.cpu.rms_norm(x, w, eps)
    }
    fn layer_norm(&self, x: &T, w: &T, b: &T, eps: f32) -> T {
        self.cpu.layer_norm(x, w, b, eps)
    }
    fn add(&self, x: &mut T, y: &T) {
        self.cpu.add(x, y)
    }
    fn columns(&self, x: &T, start: usize, len: usize) -> T {
        self.cpu.columns(x, start, len)
    }
    fn rows(&self, x: &T, start: usize, len: usize) -> T {
        self.cpu.rows(x, start, len)
    }
    fn concat_rows(&self, parts: &[&T]) -> T {
        self.cpu.concat_rows(parts)
    }
    fn append_rows(&self, cache: &mut T, rows: &T) {
        self.cpu.append_rows(cache, rows)
    }
    fn kv_store(
        &self,
        rows: usize,
        cols: usize,
        dtype: sparsemoe_engine::kv_cache::KvDtype,
    ) -> sparsemoe_engine::error::Result<S> {
        self.cpu.kv_store(rows, cols, dtype)
    }
    fn write_rows(&self, dst: &mut S, slots: &[usize], rows: &T) {
        self.cpu.write_rows(dst, slots, rows)
    }
    fn gather_rows(&self, src: &S, slots: &[usize]) -> T {
        self.cpu.gather_rows(src, slots)
    }
    fn rope(
        &self,
        x: &mut T,
        heads: usize,
        head_width: usize,
        offset: usize,
        positions: &[usize],
        rope: &Rope,
        layout: RopeLayout,
    ) {
        self.cpu
            .rope(x, heads, head_width, offset, positions, rope, layout)
    }
    fn hadamard(&self, x: &mut T, dim: usize) {
        self.cpu.hadamard(x, dim)
    }
    fn indexer_select(
        &self,
        q: &T,
        w: &T,
        keys: &T,
        positions: &[usize],
        k: usize,
        scale: f32,
    ) -> Vec<Vec<u32>> {
        self.cpu.indexer_select(q, w, keys, positions, k, scale)
    }
    fn mla_attention(
        &self,
        q: &T,
        seqs: &[MlaSeq<'_, T, S>],
        weights: MlaWeights<'_, W>,
        dims: MlaDims,
        scale: f32,
    ) -> T {
        self.cpu.mla_attention(q, seqs, weights, dims, scale)
    }
    fn swiglu(&self, x: &T, expert: &Expert<W>) -> T {
        self.cpu.swiglu(x, expert)
    }
    fn moe_experts(&self, x: &T, routing: &Routing, experts: &[Expert<W>]) -> T {
        self.cpu.moe_experts(x, routing, experts)
    }
    fn moe_experts_sharded(&self, x: &T, work: &[Vec<Pair>], experts: &[Expert<W>]) -> T {
        self.cpu.moe_experts_sharded(x, work, experts)
    }
}

/// A device lost in the middle of serving: the request in flight ends with an error, and from
/// then on `/health` and `/ready` answer 503 saying why (so the liveness probe restarts the
/// pod) and new requests are refused, rather than queued for an engine thread that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_failure_mid_step_fails_health_instead_of_hanging() {
    let backend = LosableCpu::default();
    let lost = backend.lost.clone();
    let model = Model::load(&fixture(), backend, ModelOptions::default()).unwrap();
    let s = start_with(model, &[]).await;
    let request = json!({"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 3});
    assert_eq!(s.post("/v1/completions", request.clone()).await.status, 200);
    assert_eq!(s.get("/health").await.status, 200);

    lost.store(true, Ordering::SeqCst);
    // Every call is bounded: a server that hangs fails the test instead of stalling it.
    let within = |what: &'static str| {
        move |r: Result<Reply, tokio::time::error::Elapsed>| {
            r.unwrap_or_else(|_| panic!("{what}: no answer in 10 s"))
        }
    };
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        s.post("/v1/completions", request.clone()),
    )
    .await;
    let failed = within("the request in flight")(failed);
    let body = String::from_utf8_lossy(&failed.body);
    assert_eq!(failed.status, 500, "{body}");
    assert!(body.contains("the device was lost"), "{body}");
    for path in ["/health", "/ready"] {
        let r = within("a probe")(tokio::time::timeout(Duration::from_secs(10), s.get(path)).await);
        let why = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 503, "{path}: {why}");
        assert!(why.contains("the device was lost"), "{path}: {why}");
    }
    let refused =
        tokio::time::timeout(Duration::from_secs(10), s.post("/v1/completions", request)).await;
    assert_eq!(within("a new request")(refused).status, 503);
    s.shutdown().await;
}

/// Logits that are all NaN (a numeric fault) end that request with an error that says so,
/// rather than token 0 until `max_tokens`; the engine stays up, and the rows the faulty step
/// cached are not reused: the same prompt afterwards gets what a fresh server gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_logits_fail_their_request_and_leave_no_cached_rows() {
    let backend = LosableCpu::default();
    let nan = backend.nan.clone();
    let model = Model::load(&fixture(), backend, ModelOptions::default()).unwrap();
    let s = start_with(model, &[]).await;
    // Two whole blocks of 16 tokens, which the prefix cache keeps.
    let prompt: Vec<u32> = (3..40).collect();
    let request = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2});
    nan.store(true, Ordering::SeqCst);
    let failed = s.post("/v1/completions", request.clone()).await;
    let body = String::from_utf8_lossy(&failed.body);
    assert_eq!(failed.status, 500, "{body}");
    assert!(body.contains("no usable logit"), "{body}");
    assert_eq!(
        s.get("/health").await.status,
        200,
        "one faulty output is not a dead engine"
    );
    nan.store(false, Ordering::SeqCst);
    let after = s.post("/v1/completions", request.clone()).await;
    assert_eq!(
        after.status,
        200,
        "{}",
        String::from_utf8_lossy(&after.body)
    );
    let fresh = start(&[]).await;
    let want = fresh.post("/v1/completions", request).await.json();
    let got = after.json();
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
    assert_eq!(
        got["choices"][0]["logprobs"],
        want["choices"][0]["logprobs"]
    );
    fresh.shutdown().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_sends_its_error_then_done() {
    let backend = LosableCpu::default();
    let lost = backend.lost.clone();
    let model = Model::load(&fixture(), backend, ModelOptions::default()).unwrap();
    let s = start_with(model, &[]).await;
    lost.store(true, Ordering::SeqCst);
    let request = json!({"prompt": "t5 t6 t7", "max_tokens": 3, "stream": true});
    let r = tokio::time::timeout(Duration::from_secs(10), s.post("/v1/completions", request))
        .await
        .expect("an answer in 10 s");
    assert_eq!(r.status, 200, "a stream's status is sent before it fails");
    let events = r.events();
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the device was lost")),
        "{events:?}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    s.shutdown().await;
}

/// A DSML block of two calls after some text: what DeepSeek-V3.2 writes to call tools.
const CALLS: &str = "Sure.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
    <｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
    <｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
    <｜DSML｜invoke name=\"now\">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";

/// The fixture with token 250 reading as [`CALLS`], 247 as its calls alone, and DeepSeek-V3.2's
/// own chat encoding (its tokenizer has no template, as the official release has none), and a
/// chat body whose output is token 250 then stop token 251: 251 is biased highest (10 above
/// 250) but held back by `min_tokens` for the first token, which is then 250.
async fn start_calling(extra: &[&str]) -> Server {
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let calls_alone = CALLS.strip_prefix("Sure.").unwrap();
    let words = [(247, calls_alone), (250, CALLS)];
    start_with_tokenizer(model, tokenizer_with(&words, None), extra).await
}

fn calling_body(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "now"}}
        ],
        "logit_bias": {"250": 90, "251": 100}, "stop_token_ids": [251], "min_tokens": 1,
        "temperature": 0, "max_tokens": 4
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn call_names_and_arguments(calls: &Value) -> Vec<(String, Value)> {
    calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function", "{c}");
            let args = c["function"]["arguments"].as_str().unwrap();
            (
                c["function"]["name"].as_str().unwrap().to_string(),
                serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}")),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_come_back_as_openais_tool_calls() {
    let s = start_calling(&[]).await;
    let r = s
        .post("/v1/chat/completions", calling_body(json!({})))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert_eq!(choice["message"]["content"], "Sure.", "{v}");
    let calls = &choice["message"]["tool_calls"];
    assert_eq!(
        call_names_and_arguments(calls),
        [
            (
                "get_weather".to_string(),
                json!({"city": "Paris", "days": 2})
            ),
            ("now".to_string(), json!({}))
        ]
    );
    let ids: Vec<&str> = (0..2).map(|i| calls[i]["id"].as_str().unwrap()).collect();
    assert!(
        ids[0] != ids[1] && ids.iter().all(|id| id.starts_with("call-")),
        "{ids:?}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");

    // The tools are in the prompt: it is longer with them.
    let mut bare = calling_body(json!({}));
    bare.as_object_mut().unwrap().remove("tools");
    let without = s.post("/v1/chat/completions", bare).await.json();
    let prompt_tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens(&v) > prompt_tokens(&without) + 100,
        "{v} {without}"
    );
    // And without tools nothing is read as a call: the block is text.
    assert_eq!(without["choices"][0]["finish_reason"], "stop");
    assert_eq!(without["choices"][0]["message"]["content"], CALLS);
    assert!(without["choices"][0]["message"].get("tool_calls").is_none());

    // tool_choice "none": no tools offered, nothing read.
    let r = s
        .post(
            "/v1/chat/completions",
            calling_body(json!({"tool_choice": "none"})),
        )
        .await
        .json();
    assert_eq!(r["choices"][0]["message"]["content"], CALLS, "{r}");
    assert_eq!(prompt_tokens(&r), prompt_tokens(&without));

    // Calls alone: the content is null, not the blank line before the block.
    let r = s
        .post(
            "/v1/chat/completions",
            calling_body(json!({"logit_bias": {"247": 90, "251": 100}})),
        )
        .await
        .json();
    let message = &r["choices"][0]["message"];
    assert!(message["content"].is_null(), "{r}");
    assert_eq!(
        call_names_and_arguments(&message["tool_calls"]).len(),
        2,
        "{r}"
    );

    // parallel_tool_calls false: the first call only.
    let r = s
        .post(
            "/v1/chat/completions",
            calling_body(json!({"parallel_tool_calls": false})),
        )
        .await
        .json();
    let names = call_names_and_arguments(&r["choices"][0]["message"]["tool_calls"]);
    assert_eq!(names.len(), 1, "{r}");
    assert_eq!(names[0].0, "get_weather");
    s.shutdown().await;
}

/// A chat template that shows the tools and writes past calls as DeepSeek-V3.1 does.
const V31_TEMPLATE: &str = "{% if tools %}tools {{ tools | length }} {% endif %}{% for m in messages %}{{ m.role }} {{ m.content }} \
    {% if m.tool_calls %}<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}<｜tool▁call▁begin｜>\
    {{ c.function.name }}<｜tool▁sep｜>{{ c.function.arguments }}<｜tool▁call▁end｜>{% endfor %}\
    <｜tool▁calls▁end｜>{% endif %}{% endfor %}{% if add_generation_prompt %}t9{% endif %}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek_v31_calls_are_read_from_special_tokens() {
    // DeepSeek-V3.1's markers as special tokens (which outputs skip unless a parser keeps
    // them), a name and an arguments word; biased in the output's order, each halved by the
    // repetition penalty once generated, then 251 stops it.
    let words = [
        (240, "<｜tool▁calls▁begin｜>"),
        (241, "<｜tool▁call▁begin｜>"),
        (242, "get_weather"),
        (243, "<｜tool▁sep｜>"),
        (244, "{\"city\": \"Paris\"}"),
        (245, "<｜tool▁call▁end｜>"),
        (246, "<｜tool▁calls▁end｜>"),
    ];
    let special = [240, 241, 243, 245, 246];
    let bias: serde_json::Map<String, Value> = words
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.to_string(), json!(100 - 5 * i as i64)))
        .chain([("251".to_string(), json!(60))])
        .collect();
    let body = |extra: Value| {
        let mut body = calling_body(json!({
            "logit_bias": bias, "repetition_penalty": 2.0, "min_tokens": 0, "max_tokens": 12,
        }));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let tokenizer = || tokenizer_with_special(&words, &special, Some(V31_TEMPLATE));
    let model = || Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    // `auto` finds V3.1's format in the template.
    let s = start_with_tokenizer(model(), tokenizer(), &[]).await;
    let v = s.post("/v1/chat/completions", body(json!({}))).await.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    assert_eq!(
        call_names_and_arguments(&choice["message"]["tool_calls"]),
        [("get_weather".to_string(), json!({"city": "Paris"}))],
        "{v}"
    );
    // The stop token counts, as in every test here.
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");

    // Streamed: one call delta, no content.
    let mut streamed = body(json!({}));
    streamed["stream"] = json!(true);
    let chunks = s.post("/v1/chat/completions", streamed).await.chunks();
    let calls: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0]["index"], 0);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "", "{chunks:?}");

    // The call goes back into the prompt through the template, its markers encoded as their
    // tokens.
    let call = &choice["message"]["tool_calls"][0];
    let mut again = body(json!({}));
    again["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
    ]);
    let first = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let v2 = s.post("/v1/chat/completions", again).await.json();
    let second = v2["usage"]["prompt_tokens"].as_u64().unwrap();
    let written = "assistant  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>\
                   {\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let ids = tokenizer().encode(written).unwrap();
    for marker in special {
        assert_eq!(ids.iter().filter(|&&id| id == marker).count(), 1, "{ids:?}");
    }
    assert_eq!(second, first + ids.len() as u64, "{v2}");
    s.shutdown().await;

    // Read as V3's format (whose calls have a fenced block), the same output is text: the
    // markers are kept in it, so nothing is lost.
    let s =
        start_with_tokenizer(model(), tokenizer(), &["--tool-call-parser", "deepseek_v3"]).await;
    let v = s.post("/v1/chat/completions", body(json!({}))).await.json();
    let message = &v["choices"][0]["message"];
    assert_eq!(
        message["content"],
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜> \
         {\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "{v}"
    );
    assert!(message.get("tool_calls").is_none(), "{v}");
    s.shutdown().await;

    // With no parser the markers are skipped as special tokens, and tools are refused.
    let s = start_with_tokenizer(model(), tokenizer(), &["--tool-call-parser", "none"]).await;
    let r = s.post("/v1/chat/completions", body(json!({}))).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let mut bare = body(json!({}));
    bare.as_object_mut().unwrap().remove("tools");
    let v = s.post("/v1/chat/completions", bare).await.json();
    assert_eq!(
        v["choices"][0]["message"]["content"], "get_weather {\"city\": \"Paris\"}",
        "{v}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_are_deltas_with_their_indices() {
    let s = start_calling(&[]).await;
    let r = s
        .post(
            "/v1/chat/completions",
            calling_body(json!({"stream": true, "n": 2})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for index in 0..2 {
        let deltas: Vec<Value> = r
            .chunks()
            .into_iter()
            .filter_map(|c| {
                let choice = c["choices"].as_array()?.first()?.clone();
                (choice["index"] == index).then_some(choice)
            })
            .collect();
        let content: String = deltas
            .iter()
            .filter_map(|d| d["delta"]["content"].as_str())
            .collect();
        assert_eq!(content, "Sure.");
        let calls: Vec<Value> = deltas
            .iter()
            .filter_map(|d| d["delta"]["tool_calls"].as_array())
            .flatten()
            .cloned()
            .collect();
        let indices: Vec<&Value> = calls.iter().map(|c| &c["index"]).collect();
        assert_eq!(indices, [&json!(0), &json!(1)], "{calls:?}");
        assert_eq!(
            call_names_and_arguments(&Value::Array(calls))[0],
            (
                "get_weather".to_string(),
                json!({"city": "Paris", "days": 2})
            )
        );
        let last = deltas.last().unwrap();
        assert_eq!(last["finish_reason"], "tool_calls", "{deltas:?}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_conversation_is_encoded_and_bad_ones_are_refused() {
    let s = start_calling(&[]).await;
    let conversation = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call-1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"}
    ]);
    let r = s
        .post(
            "/v1/chat/completions",
            calling_body(json!({"messages": conversation})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    for (messages, param, says) in [
        (
            json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "sunny"}]),
            "messages",
            "messages[1]: a tool message must follow an assistant message with tool_calls",
        ),
        (
            json!([{"role": "user", "content": "x", "tool_calls": []}]),
            "messages",
            "messages[0]: tool_calls belong to assistant messages",
        ),
        (
            json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                    "arguments": "[1]"}}]}]),
            "messages",
            "messages[0].tool_calls[0].function.arguments must be a JSON object",
        ),
    ] {
        let r = s
            .post(
                "/v1/chat/completions",
                calling_body(json!({"messages": messages})),
            )
            .await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    for (extra, param, says) in [
        (
            json!({"tool_choice": "required"}),
            "tool_choice",
            "guided decoding",
        ),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "now"}}}),
            "tool_choice",
            "guided decoding",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a\"b"}}]}),
            "tools",
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "retrieval"}]}),
            "tools",
            "tools[0].type must be \"function\"",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}},
                             {"type": "function", "function": {"name": "f"}}]}),
            "tools",
            "two tools are named",
        ),
    ] {
        let r = s.post("/v1/chat/completions", calling_body(extra)).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }
    let r = s
        .post(
            "/v1/completions",
            json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "tools");
    s.idle().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_need_a_parser_and_a_template_file_sees_them() {
    // A checkpoint with a Jinja template: no parser unless one is named.
    let s = start(&[]).await;
    let r = s
        .post("/v1/chat/completions", calling_body(json!({})))
        .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["param"], "tools");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--tool-call-parser"),
        "{e}"
    );
    s.shutdown().await;

    // --chat-template: a file of its own, which sees the request's tools.
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("tools.jinja");
    std::fs::write(
        &template,
        "{% if tools is none %}{{ raise_exception('this template wants tools') }}{% endif %}\
         {% for t in tools %}{{ t.function.name }} {% endfor %}\
         {% for m in messages %}{{ m.content }} {% endfor %}",
    )
    .unwrap();
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let s = start_with_tokenizer(
        model,
        tokenizer_with(&[(250, CALLS)], Some(TEMPLATE)),
        &[
            "--chat-template",
            template.to_str().unwrap(),
            "--tool-call-parser",
            "deepseek_v32",
        ],
    )
    .await;
    let r = s
        .post("/v1/chat/completions", calling_body(json!({})))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    // <s> and "get_weather now Weather in Paris ?", each word a token (unknown ones t2).
    assert_eq!(v["usage"]["prompt_tokens"], 1 + 6, "{v}");
    let mut bare = calling_body(json!({}));
    bare.as_object_mut().unwrap().remove("tools");
    let r = s.post("/v1/chat/completions", bare).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this template wants tools")
    );
    s.shutdown().await;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ServeArgs,
    }
    for (flag, value, says) in [
        ("--tool-call-parser", "hermes", "--tool-call-parser hermes"),
        (
            "--reasoning-parser",
            "sometimes",
            "--reasoning-parser sometimes",
        ),
        (
            "--chat-template",
            "/no/such/file.jinja",
            "reading --chat-template",
        ),
    ] {
        let args = Wrap::parse_from(["serve", flag, value]).args;
        let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
        let err = build_state(model, tokenizer(), "fixture".into(), &args).expect_err("refused");
        assert!(format!("{err:#}").contains(says), "{err:#}");
    }
    std::fs::write(&template, "{% for %}").unwrap();
    let args = Wrap::parse_from(["serve", "--chat-template", template.to_str().unwrap()]).args;
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let err = build_state(model, tokenizer(), "fixture".into(), &args).expect_err("refused");
    assert!(format!("{err:#}").contains("--chat-template"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_outputs_give_their_reasoning_apart() {
    // Token 248 "pondering", 249 "</think>", 250 the calls, 251 a stop token: biased 100, 90,
    // 80 and 70 with a repetition penalty of 2, each token's logit halves once it is
    // generated, so the output is 248, 249, 250, then 251 ends it.
    let words = [(248, "pondering"), (249, "</think>"), (250, CALLS)];
    let body = |extra: Value| {
        let mut body = calling_body(json!({
            "logit_bias": {"248": 100, "249": 90, "250": 80, "251": 70},
            "repetition_penalty": 2.0, "min_tokens": 0, "max_tokens": 6,
        }));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let thinking = json!({"chat_template_kwargs": {"thinking": true}});
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let s = start_with_tokenizer(model, tokenizer_with(&words, None), &[]).await;

    let v = s
        .post("/v1/chat/completions", body(thinking.clone()))
        .await
        .json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "pondering", "{v}");
    // The word-level decoder puts a space between words.
    assert_eq!(message["content"], " Sure.", "{v}");
    assert_eq!(
        call_names_and_arguments(&message["tool_calls"]).len(),
        2,
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");

    // Cut short in its reasoning: no answer, so a null content.
    let mut cut = body(thinking.clone());
    cut["max_tokens"] = json!(1);
    let v = s.post("/v1/chat/completions", cut).await.json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "pondering", "{v}");
    assert!(message["content"].is_null(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Streamed: the reasoning first, as reasoning_content deltas.
    let mut streamed = body(thinking.clone());
    streamed["stream"] = json!(true);
    let chunks = s.post("/v1/chat/completions", streamed).await.chunks();
    let part = |key: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][key].as_str())
            .collect()
    };
    assert_eq!(part("reasoning_content"), "pondering");
    assert_eq!(part("content"), " Sure.");
    // (The first chunk gives the role, with an empty content.)
    let first_content = chunks
        .iter()
        .position(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .unwrap();
    let last_reasoning = chunks
        .iter()
        .rposition(|c| c["choices"][0]["delta"]["reasoning_content"].is_string())
        .unwrap();
    assert!(last_reasoning < first_content);

    // Chat mode: the prompt does not open a thought, and the output is all answer.
    let v = s.post("/v1/chat/completions", body(json!({}))).await.json();
    let message = &v["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{v}");
    assert_eq!(message["content"], "pondering </think> Sure.", "{v}");
    s.shutdown().await;

    // A tokenizer without a </think> token: the text ends the reasoning, wherever it falls
    // ("ok</think>" is one word here, so the tag is inside a token's text).
    let spelled = [(248, "pondering"), (249, "ok</think>"), (250, CALLS)];
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let s = start_with_tokenizer(model, tokenizer_with(&spelled, None), &[]).await;
    let v = s
        .post("/v1/chat/completions", body(thinking.clone()))
        .await
        .json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "pondering ok", "{v}");
    assert_eq!(message["content"], " Sure.", "{v}");
    assert_eq!(
        call_names_and_arguments(&message["tool_calls"]).len(),
        2,
        "{v}"
    );
    let mut streamed = body(thinking.clone());
    streamed["stream"] = json!(true);
    let chunks = s.post("/v1/chat/completions", streamed).await.chunks();
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "pondering ok");
    s.shutdown().await;

    // --reasoning-parser none: thinking mode's reasoning stays in the content.
    let model = Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap();
    let s = start_with_tokenizer(
        model,
        tokenizer_with(&words, None),
        &["--reasoning-parser", "none"],
    )
    .await;
    let v = s.post("/v1/chat/completions", body(thinking)).await.json();
    let message = &v["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none(), "{v}");
    assert_eq!(message["content"], "pondering </think> Sure.", "{v}");
    s.shutdown().await;
}
