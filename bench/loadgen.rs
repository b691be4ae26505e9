//! Load generator for `sparsemoe-engine serve` (an example of the engine crate):
//!
//! ```sh
//! cargo run --release -p sparsemoe-engine --example loadgen -- --url http://127.0.0.1:8000 \
//!     --concurrency 32 --requests 128 --prompt-len 16:64 --output-len 32:64
//! cargo run --release -p sparsemoe-engine --example loadgen -- --in-process MODEL_DIR ...
//! ```
//!
//! Drives streaming completions (random token-id prompts, so any tokenizer works) at a fixed
//! concurrency (closed loop) or a Poisson request rate (open loop), with uniform prompt and
//! output length ranges, and prints one JSON line: tokens/s, requests/s, TTFT and inter-token
//! latency p50/p99, errors. `--in-process` runs the same workload on the engine's scheduler
//! with no HTTP in between, to measure the server's overhead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::kv_cache::{BlockAllocator, KvDtype, bytes_per_token};
use sparsemoe_engine::metrics::Metrics;
use sparsemoe_engine::model::{Model, ModelOptions};
use sparsemoe_engine::sampling::SamplingParams;
use sparsemoe_engine::scheduler::{self, EngineHandle, Event, GenerationRequest, SchedulerConfig};
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
struct Args {
    /// The server's base URL (streaming HTTP mode).
    #[arg(long, conflicts_with = "in_process")]
    url: Option<String>,
    /// A model directory to run in-process on the scheduler (no HTTP).
    #[arg(long)]
    in_process: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests per second (Poisson arrivals); 0 is a closed loop at `concurrency`.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Uniform prompt length range MIN:MAX (tokens).
    #[arg(long, default_value = "16:64")]
    prompt_len: String,
    /// Uniform max_tokens range MIN:MAX.
    #[arg(long, default_value = "32:64")]
    output_len: String,
    /// Tokens every prompt starts with (a shared system prompt), before its own prompt_len.
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// In-process mode: run the scheduler without prefix caching (the server's flag).
    #[arg(long, conflicts_with = "url")]
    no_prefix_caching: bool,
    /// Token ids are drawn from 2..vocab.
    #[arg(long, default_value_t = 256)]
    vocab: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Free-form label copied into the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Scheduler token budget per step (in-process mode; match the server's flag).
    #[arg(long, default_value_t = 256)]
    max_batch_tokens: usize,
    /// In-process mode: the KV cache's bytes and dtype (`float32` or `bfloat16`).
    #[arg(long, default_value_t = 1 << 30, conflicts_with = "url")]
    kv_cache_bytes: usize,
    #[arg(long, default_value = "float32", conflicts_with = "url")]
    kv_cache_dtype: String,
}

fn range(text: &str) -> (usize, usize) {
    let (a, b) = text.split_once(':').unwrap_or((text, text));
    let a: usize = a.parse().expect("range MIN:MAX");
    let b: usize = b.parse().expect("range MIN:MAX");
    (a.min(b), a.max(b))
}

/// One request's timings.
#[derive(Debug, Default, Clone)]
struct Sample {
    ok: bool,
    tokens: usize,
    ttft: Option<f64>,
    gaps: Vec<f64>,
}

#[derive(Clone)]
enum Target {
    Http(Client<HttpConnector, Full<Bytes>>, String),
    InProcess(EngineHandle, Vec<u32>),
}

async fn run_one(target: &Target, prompt: Vec<u32>, max_tokens: usize) -> Sample {
    let start = Instant::now();
    let mut sample = Sample::default();
    let mut last = start;
    let mut tick = |sample: &mut Sample| {
        let now = Instant::now();
        match sample.ttft {
            None => sample.ttft = Some((now - start).as_secs_f64()),
            Some(_) => sample.gaps.push((now - last).as_secs_f64()),
        }
        last = now;
    };
    match target {
        Target::Http(client, base) => {
            let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                              "stream": true, "stream_options": {"include_usage": true}});
            let Ok(request) = hyper::Request::builder()
                .method("POST")
                .uri(format!("{base}/v1/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
            else {
                return sample;
            };
            let Ok(response) = client.request(request).await else {
                return sample;
            };
            if !response.status().is_success() {
                return sample;
            }
            let mut body = response.into_body();
            let mut pending = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.push_str(&String::from_utf8_lossy(data));
                while let Some(end) = pending.find("\n\n") {
                    let event: String = pending.drain(..end + 2).collect();
                    let payload = event.trim().trim_start_matches("data: ");
                    if payload == "[DONE]" {
                        sample.ok = true;
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<Value>(payload) else {
                        continue;
                    };
                    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                        sample.tokens = n as usize;
                    } else if v["choices"][0]["text"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty())
                    {
                        tick(&mut sample);
                    }
                }
            }
        }
        Target::InProcess(engine, stops) => {
            let request = GenerationRequest {
                prompt,
                max_tokens,
                params: SamplingParams::greedy(),
                stop_tokens: stops.clone(),
                min_tokens: 0,
                logprobs: None,
            };
            let Ok(mut events) = engine.submit(request) else {
                return sample;
            };
            while let Some(event) = events.recv().await {
                match event {
                    Event::Token { .. } => tick(&mut sample),
                    Event::Finished {
                        completion_tokens, ..
                    } => {
                        sample.tokens = completion_tokens;
                        sample.ok = true;
                        break;
                    }
                    Event::Error(_) => break,
                }
            }
        }
    }
    sample
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[i] * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let (p_lo, p_hi) = range(&args.prompt_len);
    let (o_lo, o_hi) = range(&args.output_len);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let shared: Vec<u32> = (0..args.shared_prefix)
        .map(|_| rng.random_range(2..args.vocab))
        .collect();
    let work: Vec<(Vec<u32>, usize)> = (0..args.requests)
        .map(|_| {
            let n = rng.random_range(p_lo..=p_hi).max(1);
            let mut prompt = shared.clone();
            prompt.extend((0..n).map(|_| rng.random_range(2..args.vocab)));
            (prompt, rng.random_range(o_lo..=o_hi).max(1))
        })
        .collect();
    let kv_dtype: KvDtype = args.kv_cache_dtype.parse().unwrap_or_else(|e| {
        eprintln!("loadgen: {e}");
        std::process::exit(2);
    });
    let metrics = Arc::new(Metrics::new());
    let mut kv_tokens = None;
    let (target, mode) = match (&args.url, &args.in_process) {
        (Some(url), _) => (
            Target::Http(
                Client::builder(TokioExecutor::new()).build({
                    let mut connector = HttpConnector::new();
                    connector.set_nodelay(true);
                    connector
                }),
                url.trim_end_matches('/').to_string(),
            ),
            "http-streaming",
        ),
        (None, Some(dir)) => {
            let model = Model::load(dir, Cpu, ModelOptions::default()).expect("loading the model");
            let config = model.config.clone();
            let blocks = BlockAllocator::from_budget(
                16,
                args.kv_cache_bytes,
                bytes_per_token(&config, kv_dtype),
            );
            kv_tokens = Some(blocks.capacity_tokens());
            let max_context = config.max_position_embeddings.min(blocks.capacity_tokens());
            let engine = scheduler::spawn(
                model,
                blocks,
                SchedulerConfig {
                    max_batch_tokens: args.max_batch_tokens,
                    max_running: 64,
                    max_waiting: 1 << 20,
                    max_context,
                    prefix_caching: !args.no_prefix_caching,
                    kv_dtype,
                },
                metrics.clone(),
            )
            .expect("starting the engine");
            (
                Target::InProcess(engine, config.eos_token_ids),
                "in-process",
            )
        }
        (None, None) => {
            eprintln!("loadgen: pass --url URL or --in-process MODEL_DIR");
            std::process::exit(2);
        }
    };

    let work = Arc::new(work);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    if args.rate > 0.0 {
        // Open loop: Poisson arrivals, each request its own task.
        for i in 0..work.len() {
            let gap: f64 = -(1.0 - rng.random::<f64>()).ln() / args.rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            let (target, work, samples) = (target.clone(), work.clone(), samples.clone());
            tasks.push(tokio::spawn(async move {
                let (prompt, max) = work[i].clone();
                let s = run_one(&target, prompt, max).await;
                samples.lock().await.push(s);
            }));
        }
    } else {
        for _ in 0..args.concurrency.max(1) {
            let (target, work, samples, next) =
                (target.clone(), work.clone(), samples.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((prompt, max)) = work.get(i).cloned() else {
                        break;
                    };
                    let s = run_one(&target, prompt, max).await;
                    samples.lock().await.push(s);
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let samples = samples.lock().await;
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    ttft.sort_by(f64::total_cmp);
    itl.sort_by(f64::total_cmp);
    let report = json!({
        "label": args.label,
        "mode": mode,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "requests": samples.len(),
        "errors": samples.len() - ok.len(),
        "prompt_len": args.prompt_len,
        "shared_prefix": args.shared_prefix,
        // In-process only: over HTTP it is the server's setting, which the caller knows.
        "prefix_caching": args.in_process.as_ref().map(|_| !args.no_prefix_caching),
        "kv_cache_dtype": args.in_process.as_ref().map(|_| kv_dtype.as_str()),
        "kv_cache_tokens": kv_tokens,
        "preemptions": args.in_process.as_ref().map(|_| metrics.preemptions.get()),
        "output_len": args.output_len,
        "duration_s": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens as f64 / elapsed,
        "requests_per_s": ok.len() as f64 / elapsed,
        "ttft_ms_p50": percentile(&ttft, 0.5),
        "ttft_ms_p99": percentile(&ttft, 0.99),
        "itl_ms_p50": percentile(&itl, 0.5),
        "itl_ms_p99": percentile(&itl, 0.99),
    });
    println!("{report}");
}
