//! Prometheus metrics, `sparsemoe_*`, with vLLM's meanings (the README maps the names). The
//! engine thread sets the scheduler gauges and latency histograms; the server counts request
//! outcomes; the expert counters are read from the model's [`ExpertLoad`] at scrape time.

use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::backend::{GraphCounts, GraphCountsSource};
use crate::expert_load::ExpertLoad;
use crate::expert_shards::ExpertShards;

/// Up to two hours: a long reasoning output (tens of thousands of tokens) runs for many
/// minutes, as vLLM's end-to-end buckets allow.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 7680.0,
];
const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];

/// The model's expert counters and what was exported of them so far.
type ExpertSource = (Arc<ExpertLoad>, Vec<Vec<u64>>);
type ShardSource = (Arc<ExpertShards>, Vec<u64>);

/// The backend's CUDA graph counters, what was exported of them so far, and their metrics
/// (registered only for a backend that records graphs).
struct GraphExport {
    source: GraphCountsSource,
    exported: GraphCounts,
    captured: IntCounter,
    replayed: IntCounter,
    spoiled: IntCounter,
    eager: IntCounter,
}

impl std::fmt::Debug for GraphExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphExport")
            .field("exported", &self.exported)
            .finish_non_exhaustive()
    }
}

/// The labels of `sparsemoe_model_info`.
#[derive(Clone, Copy, Debug)]
pub struct ModelInfo<'a> {
    pub model: &'a str,
    /// Empty when not given.
    pub revision: &'a str,
    pub device: &'a str,
    pub arch: &'a str,
    pub kv_cache_dtype: &'a str,
}

/// Every metric the engine exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests_running: IntGauge,
    /// `--max-running`: the running batch's slots (the operator's queueDepth policy reads it).
    pub max_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub kv_cache_usage: Gauge,
    pub kv_cache_blocks: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub preemptions: IntCounter,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    request_success: IntCounterVec,
    request_errors: IntCounterVec,
    expert_tokens: IntCounterVec,
    shard_pairs: IntCounterVec,
    model_info: IntGaugeVec,
    expert_source: Mutex<Option<ExpertSource>>,
    shard_source: Mutex<Option<ShardSource>>,
    graphs: Mutex<Option<GraphExport>>,
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram");
    registry.register(Box::new(h.clone())).expect("unique name");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry.register(Box::new(m.clone())).expect("unique name");
                m
            }};
        }
        Self {
            requests_running: reg!(IntGauge::new(
                "sparsemoe_num_requests_running",
                "Requests in the running batch"
            )),
            max_running: reg!(IntGauge::new(
                "sparsemoe_max_running_requests",
                "Requests the running batch holds at most (--max-running)"
            )),
            requests_waiting: reg!(IntGauge::new(
                "sparsemoe_num_requests_waiting",
                "Requests accepted and waiting to run (including preempted ones)"
            )),
            kv_cache_usage: reg!(Gauge::new(
                "sparsemoe_kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0 to 1)"
            )),
            kv_cache_blocks: reg!(IntGauge::new(
                "sparsemoe_kv_cache_blocks_total",
                "KV-cache blocks the memory budget holds"
            )),
            prompt_tokens: reg!(IntCounter::new(
                "sparsemoe_prompt_tokens_total",
                "Prompt tokens prefilled"
            )),
            generation_tokens: reg!(IntCounter::new(
                "sparsemoe_generation_tokens_total",
                "Tokens generated"
            )),
            time_to_first_token: histogram(
                &registry,
                "sparsemoe_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                LATENCY_BUCKETS,
            ),
            inter_token_latency: histogram(
                &registry,
                "sparsemoe_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request",
                TOKEN_LATENCY_BUCKETS,
            ),
            e2e_latency: histogram(
                &registry,
                "sparsemoe_e2e_request_latency_seconds",
                "Time from arrival to the last token",
                LATENCY_BUCKETS,
            ),
            queue_time: histogram(
                &registry,
                "sparsemoe_request_queue_time_seconds",
                "Time from arrival to first scheduled",
                LATENCY_BUCKETS,
            ),
            preemptions: reg!(IntCounter::new(
                "sparsemoe_num_preemptions_total",
                "Running requests preempted for KV-cache space (re-queued, not lost)"
            )),
            prefix_cache_queries: reg!(IntCounter::new(
                "sparsemoe_prefix_cache_queries_total",
                "Prompt tokens of new requests looked up in the prefix cache (all but the last)"
            )),
            prefix_cache_hits: reg!(IntCounter::new(
                "sparsemoe_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (their KV rows were shared, not computed)"
            )),
            request_success: reg!(IntCounterVec::new(
                Opts::new(
                    "sparsemoe_request_success_total",
                    "Finished requests by finish reason (stop, length, abort); a request of n choices counts each"
                ),
                &["finished_reason"]
            )),
            request_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "sparsemoe_request_errors_total",
                    "Requests answered with an error, by HTTP status"
                ),
                &["code"]
            )),
            expert_tokens: reg!(IntCounterVec::new(
                Opts::new(
                    "sparsemoe_expert_tokens_total",
                    "Tokens routed to each expert of each MoE layer"
                ),
                &["layer", "expert"]
            )),
            shard_pairs: reg!(IntCounterVec::new(
                Opts::new(
                    "sparsemoe_expert_shard_pairs_total",
                    "Routed (token, expert) pairs each expert shard computed (with --placement or --expert-shards)"
                ),
                &["shard"]
            )),
            model_info: reg!(IntGaugeVec::new(
                Opts::new(
                    "sparsemoe_model_info",
                    "The served model, its revision, the device and the KV cache's dtype (value 1)"
                ),
                &["model", "revision", "device", "arch", "kv_cache_dtype"]
            )),
            expert_source: Mutex::new(None),
            shard_source: Mutex::new(None),
            graphs: Mutex::new(None),
            registry,
        }
    }

    /// Records the served model and the source of the expert counters.
    pub fn set_model(&self, info: ModelInfo<'_>, load: Arc<ExpertLoad>) {
        self.model_info
            .with_label_values(&[
                info.model,
                info.revision,
                info.device,
                info.arch,
                info.kv_cache_dtype,
            ])
            .set(1);
        let zero = load.snapshot().iter().map(|r| vec![0; r.len()]).collect();
        if let Ok(mut source) = self.expert_source.lock() {
            *source = Some((load, zero));
        }
    }

    /// Exports the pairs each expert shard computes.
    pub fn set_expert_shards(&self, shards: Arc<ExpertShards>) {
        let zero = vec![0; shards.shards()];
        if let Ok(mut source) = self.shard_source.lock() {
            *source = Some((shards, zero));
        }
    }

    /// Exports the backend's CUDA graph counters (`sparsemoe_cuda_graph_*`).
    pub fn set_graph_counts(&self, source: GraphCountsSource) {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            self.registry
                .register(Box::new(c.clone()))
                .expect("unique name");
            c
        };
        let Ok(mut graphs) = self.graphs.lock() else {
            return;
        };
        if graphs.is_some() {
            return;
        }
        *graphs = Some(GraphExport {
            source,
            exported: GraphCounts::default(),
            captured: counter(
                "sparsemoe_cuda_graph_captures_total",
                "MLP blocks captured into CUDA graphs (--cuda-graph-rows): a (layer, batch rows) each, again after a setting change forgets them",
            ),
            replayed: counter(
                "sparsemoe_cuda_graph_replays_total",
                "CUDA graph launches: a layer's MLP block each",
            ),
            spoiled: counter(
                "sparsemoe_cuda_graph_spoiled_captures_total",
                "CUDA graph captures dropped because the block asked for a copy to or from the host (tried again after a clean run)",
            ),
            eager: counter(
                "sparsemoe_cuda_graph_ungraphed_blocks_total",
                "MLP blocks left to run without a CUDA graph for good (captures refused, or spoiled three times)",
            ),
        });
    }

    /// A request (or one of a request's `n` choices) ended with `reason` (`stop`, `length`,
    /// `abort`).
    pub fn finished(&self, reason: &str) {
        self.request_success.with_label_values(&[reason]).inc();
    }

    /// A request was answered with HTTP `status`.
    pub fn error(&self, status: u16) {
        self.request_errors
            .with_label_values(&[&status.to_string()])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Ok(mut source) = self.expert_source.lock()
            && let Some((load, exported)) = source.as_mut()
        {
            for (layer, (now, before)) in
                load.snapshot().iter().zip(exported.iter_mut()).enumerate()
            {
                for (expert, (&n, b)) in now.iter().zip(before.iter_mut()).enumerate() {
                    if n > *b {
                        self.expert_tokens
                            .with_label_values(&[&layer.to_string(), &expert.to_string()])
                            .inc_by(n - *b);
                        *b = n;
                    }
                }
            }
        }
        if let Ok(mut source) = self.shard_source.lock()
            && let Some((shards, exported)) = source.as_mut()
        {
            for (shard, (n, before)) in shards.computed().into_iter().zip(exported).enumerate() {
                if n > *before {
                    self.shard_pairs
                        .with_label_values(&[&shard.to_string()])
                        .inc_by(n - *before);
                    *before = n;
                }
            }
        }
        if let Ok(mut graphs) = self.graphs.lock()
            && let Some(g) = graphs.as_mut()
        {
            let now = (g.source)();
            let before = g.exported;
            for (counter, now, before) in [
                (&g.captured, now.captured, before.captured),
                (&g.replayed, now.replayed, before.replayed),
                (&g.spoiled, now.spoiled, before.spoiled),
                (&g.eager, now.eager, before.eager),
            ] {
                counter.inc_by(now.saturating_sub(before));
            }
            g.exported = now;
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    use super::*;

    fn value(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn graph_counters_appear_only_with_a_source_and_follow_it() {
        let metrics = Metrics::new();
        assert!(!metrics.render().contains("sparsemoe_cuda_graph"));
        let replays = Arc::new(AtomicU64::new(5));
        let source = replays.clone();
        metrics.set_graph_counts(Arc::new(move || GraphCounts {
            captured: 2,
            replayed: source.load(Relaxed),
            spoiled: 1,
            eager: 0,
        }));
        let text = metrics.render();
        assert_eq!(value(&text, "sparsemoe_cuda_graph_captures_total"), Some(2));
        assert_eq!(value(&text, "sparsemoe_cuda_graph_replays_total"), Some(5));
        assert_eq!(
            value(&text, "sparsemoe_cuda_graph_spoiled_captures_total"),
            Some(1)
        );
        assert_eq!(
            value(&text, "sparsemoe_cuda_graph_ungraphed_blocks_total"),
            Some(0)
        );
        replays.store(12, Relaxed);
        // Rendered twice: the counters follow the source, not add it again.
        metrics.render();
        let text = metrics.render();
        assert_eq!(value(&text, "sparsemoe_cuda_graph_replays_total"), Some(12));
        assert_eq!(value(&text, "sparsemoe_cuda_graph_captures_total"), Some(2));
    }
}
