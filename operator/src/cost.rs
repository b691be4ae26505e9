//! The `costAware` policy's measure: generated tokens per second per unit of `costPerHour`,
//! by variant, and what the engines of an InferenceDeployment serve and cost now (the metrics
//! of `status.lastScaling`).
//!
//! A replica's throughput depends on its load, so a variant is measured only while its batch
//! is full: between two reads of one engine, at most 45 s apart, at both of which every slot
//! was running (or requests waited with the KV cache 90% used), the
//! `sparsemoe_generation_tokens_total` it added, per second, is what one replica of its
//! variant delivers. A variant's figure is the mean of its first three such intervals, then an
//! exponential average; until then its `expectedTokensPerSecond` stands in, and without that
//! the variant keeps its place in the list. Figures live in the operator's memory: a restarted
//! operator measures again, and so does a changed model, engine or GPU shape.
//!
//! Variants are ranked by tokens per second per unit of cost, best first; one overtakes the
//! one ranked just before it only when more than 10% better, so two variants measured alike
//! do not trade places with every read. The ranking says where replicas go (the best with
//! room first) and come from (the worst first); replicas that run are not moved, so a fleet
//! drifts to the cheapest variants as load rises and falls, without restarts of its own.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use sparsemoe_api::InferenceDeploymentSpec;
use sparsemoe_api::v1alpha1::{GpuVariant, ScalingMetrics};
use tokio::time::Instant;

/// The engine's counter of generated tokens.
pub const GENERATED_METRIC: &str = "sparsemoe_generation_tokens_total";
/// The engine's gauge of the KV cache in use (0 to 1).
pub const KV_USAGE_METRIC: &str = "sparsemoe_kv_cache_usage_perc";
/// The KV cache in use past which an engine with requests waiting is full (they wait for
/// cache, not for a slot).
pub const KV_FULL: f64 = 0.9;
/// The shortest interval between two reads of one engine that gives it a rate: a reconcile an
/// event brings just after a read keeps the older read.
const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// The longest interval that measures a variant: over a longer one (reads paused by a policy
/// switch or a backoff) the batch may not have been full throughout.
const MAX_INTERVAL: Duration = Duration::from_secs(45);
/// Full-batch intervals a variant needs before its figure counts (their mean), so that one
/// odd interval (a burst of prefills) does not rank it.
const MIN_INTERVALS: u32 = 3;
/// The weight of each later full-batch interval in a variant's estimate.
const SMOOTHING: f64 = 0.3;
/// How much better (per unit of cost) a variant must be to overtake the one ranked just
/// before it.
const OVERTAKE: f64 = 1.1;

/// One engine pod's read.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineRead {
    /// The pod (its UID, or its name): an engine's reads are told apart by it.
    pub pod: String,
    /// Its variant (the pod's `sparsemoe.io/variant` label).
    pub variant: Option<String>,
    /// `sparsemoe_generation_tokens_total`, if it says.
    pub generated: Option<f64>,
    /// Its batch was full: every slot running, or requests waiting for KV cache.
    pub full: bool,
}

#[derive(Clone, Debug)]
struct Sample {
    variant: Option<String>,
    generated: f64,
    at: Instant,
    full: bool,
    /// Tokens per second over the last interval that gave a rate.
    rate: Option<f64>,
}

/// A variant's full-batch tokens per second per replica, for one shape of its replicas.
#[derive(Clone, Copy, Debug)]
struct Estimate {
    tokens_per_second: f64,
    intervals: u32,
    /// [`fingerprint`] of the variant when measured: a changed model, engine or GPU shape is
    /// measured again.
    fingerprint: u64,
}

/// What determines a variant's throughput in its spec: the model, the engine's settings, the
/// parallelism and the variant's GPUs (not its price, capacity or expected figure).
fn fingerprint(spec: &InferenceDeploymentSpec, variant: &GpuVariant) -> u64 {
    let shape = serde_json::json!({
        "model": spec.model,
        "engine": spec.engine,
        "parallelism": spec.parallelism,
        "nodeSelector": variant.node_selector,
        "gpusPerReplica": variant.gpus_per_replica,
        "nodesPerReplica": variant.nodes_per_replica,
    });
    let mut hasher = DefaultHasher::new();
    shape.to_string().hash(&mut hasher);
    hasher.finish()
}

/// What one InferenceDeployment's engines have shown of their throughput.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    /// The last read of each engine read in the last round.
    samples: HashMap<String, Sample>,
    /// By variant.
    estimates: BTreeMap<String, Estimate>,
    /// The last ranking of the variants with a figure, best first.
    ranked: Vec<String>,
}

impl Throughput {
    /// Takes a round of reads made at `now` of the engines of an object whose spec is `spec`.
    /// Engines not in `reads` are forgotten (a restarted or replaced pod starts again), as is
    /// an interval over which a counter went down; estimates of variants no longer in the
    /// spec, or whose shape changed, are dropped.
    pub fn observe(&mut self, spec: &InferenceDeploymentSpec, reads: &[EngineRead], now: Instant) {
        let shapes: BTreeMap<&str, u64> = spec
            .variants
            .iter()
            .map(|v| (v.name.as_str(), fingerprint(spec, v)))
            .collect();
        self.estimates
            .retain(|name, e| shapes.get(name.as_str()) == Some(&e.fingerprint));
        let mut kept = HashMap::with_capacity(reads.len());
        for read in reads {
            let Some(generated) = read.generated.filter(|g| g.is_finite() && *g >= 0.0) else {
                continue;
            };
            let fresh = Sample {
                variant: read.variant.clone(),
                generated,
                at: now,
                full: read.full,
                rate: None,
            };
            let sample = match self.samples.remove(&read.pod) {
                Some(prev) if generated < prev.generated => fresh,
                Some(prev) if now.saturating_duration_since(prev.at) < MIN_INTERVAL => prev,
                Some(prev) => {
                    let interval = now.saturating_duration_since(prev.at);
                    let rate = (generated - prev.generated) / interval.as_secs_f64();
                    let shape = read
                        .variant
                        .as_deref()
                        .and_then(|v| Some((v, shapes.get(v)?)));
                    if let Some((variant, &fingerprint)) = shape
                        && prev.full
                        && read.full
                        && interval <= MAX_INTERVAL
                    {
                        let e = self
                            .estimates
                            .entry(variant.to_string())
                            .or_insert(Estimate {
                                tokens_per_second: 0.0,
                                intervals: 0,
                                fingerprint,
                            });
                        e.intervals = e.intervals.saturating_add(1);
                        // The mean of the first intervals, then an exponential average.
                        let weight = SMOOTHING.max(1.0 / f64::from(e.intervals));
                        e.tokens_per_second += weight * (rate - e.tokens_per_second);
                    }
                    Sample {
                        rate: Some(rate),
                        ..fresh
                    }
                }
                None => fresh,
            };
            kept.insert(read.pod.clone(), sample);
        }
        self.samples = kept;
    }

    /// Tokens per second one replica of `variant` was measured to deliver with its batch full
    /// (once measured over [`MIN_INTERVALS`] intervals).
    pub fn measured(&self, variant: &str) -> Option<f64> {
        self.estimates
            .get(variant)
            .filter(|e| e.intervals >= MIN_INTERVALS)
            .map(|e| e.tokens_per_second)
    }

    /// What the engines with a rate serve and cost: their generated tokens per second and
    /// their variants' `costPerHour` (an engine read once, or whose variant the spec no longer
    /// names, counts for neither), with `waiting` requests; `None` while no engine has a rate.
    pub fn served(&self, variants: &[GpuVariant], waiting: f64) -> Option<ScalingMetrics> {
        let (mut tokens_per_second, mut cost_per_hour, mut rated) = (0.0, 0.0, false);
        for sample in self.samples.values() {
            let Some(rate) = sample.rate else { continue };
            let Some(variant) = variants
                .iter()
                .find(|v| Some(&v.name) == sample.variant.as_ref())
            else {
                continue;
            };
            tokens_per_second += rate;
            cost_per_hour += variant.cost_per_hour.value();
            rated = true;
        }
        let finite = tokens_per_second.is_finite() && cost_per_hour.is_finite();
        (rated && finite && waiting.is_finite()).then(|| ScalingMetrics {
            queue_depth: waiting,
            tokens_per_second,
            tokens_per_second_per_dollar: tokens_per_second / cost_per_hour,
            cost_per_million_tokens: (tokens_per_second > 0.0)
                .then(|| cost_per_hour / (tokens_per_second * 3600.0) * 1e6),
        })
    }

    /// The variants in order of preference, best first, and how each was judged (no live
    /// figure: the words go into a condition, which must not change with every read).
    ///
    /// A variant's figure is its measured full-batch tokens per second, else its
    /// `expectedTokensPerSecond`, per unit of `costPerHour`. Variants with a figure are ranked
    /// among the places they hold in the list; those without keep theirs.
    pub fn rank(&mut self, variants: &[GpuVariant]) -> Ranking {
        let figure = |v: &GpuVariant| {
            let tokens = self
                .measured(&v.name)
                .or(v.expected_tokens_per_second.map(f64::from))?;
            Some(tokens.max(0.0) / v.cost_per_hour.value())
        };
        let known: BTreeMap<&str, f64> = variants
            .iter()
            .filter_map(|v| Some((v.name.as_str(), figure(v)?)))
            .collect();
        // Start from the last ranking; variants new to it join at the end, in listed order.
        let mut order: Vec<&str> = self
            .ranked
            .iter()
            .filter_map(|name| known.get_key_value(name.as_str()).map(|(k, _)| *k))
            .collect();
        for v in variants {
            if known.contains_key(v.name.as_str()) && !order.contains(&v.name.as_str()) {
                order.push(&v.name);
            }
        }
        // One moves ahead of the one before it only when better by more than OVERTAKE; each
        // swap undoes one inversion of the figures, so this ends.
        let mut swapped = true;
        while swapped {
            swapped = false;
            for i in 1..order.len() {
                if known[order[i]] > known[order[i - 1]] * OVERTAKE {
                    order.swap(i, i - 1);
                    swapped = true;
                }
            }
        }
        self.ranked = order.iter().map(|s| s.to_string()).collect();
        // The ranked variants fill, in order, the places in the list those with a figure hold.
        let mut ranked = order.into_iter();
        let mut names = Vec::with_capacity(variants.len());
        let mut judged = Vec::with_capacity(variants.len());
        for v in variants {
            let name = match known.contains_key(v.name.as_str()) {
                true => ranked.next().unwrap_or(v.name.as_str()),
                false => &v.name,
            };
            let how = if self.measured(name).is_some() {
                "measured"
            } else if known.contains_key(name) {
                "expectedTokensPerSecond"
            } else {
                "not measured, kept in its listed place"
            };
            names.push(name.to_string());
            judged.push(format!("{name} ({how})"));
        }
        Ranking {
            describe: format!(
                "variants by tokens per second per unit of cost, best first: {}",
                judged.join(", ")
            ),
            order: names,
        }
    }
}

/// The variants in order of preference, best first, and how they were judged, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranking {
    pub order: Vec<String>,
    pub describe: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{spec_with_variants, variant};
    use sparsemoe_api::CostPerHour;

    fn read(pod: &str, variant: &str, generated: f64, full: bool) -> EngineRead {
        EngineRead {
            pod: pod.into(),
            variant: Some(variant.into()),
            generated: Some(generated),
            full,
        }
    }

    fn priced(name: &str, cost: &str, expected: Option<u32>) -> GpuVariant {
        GpuVariant {
            cost_per_hour: CostPerHour::parse(cost).unwrap(),
            expected_tokens_per_second: expected,
            ..variant(name, None)
        }
    }

    fn spec(variants: Vec<GpuVariant>) -> InferenceDeploymentSpec {
        InferenceDeploymentSpec {
            variants,
            ..spec_with_variants(&[])
        }
    }

    /// Rates come from two reads of one engine; only full-batch intervals measure a
    /// variant, and only three of them make a figure; a counter that went down (a restarted
    /// engine) and a read too soon after the last give no rate; an engine not read is
    /// forgotten.
    #[test]
    fn full_batches_measure_their_variant() {
        let s = spec(vec![priced("h200", "40", None), priced("h100", "20", None)]);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let tokens = |t: &Throughput| t.served(&s.variants, 0.0).map(|m| m.tokens_per_second);
        let mut t = Throughput::default();
        t.observe(&s, &[read("a", "h200", 1000.0, true)], at(0));
        assert_eq!(tokens(&t), None);
        // 15 s later: 3,000 more tokens, batch full at both reads: 200 tokens/s.
        let round = [
            read("a", "h200", 4000.0, true),
            read("b", "h100", 50.0, false),
        ];
        t.observe(&s, &round, at(15));
        assert_eq!(tokens(&t), Some(200.0));
        // One interval is not yet a figure.
        assert_eq!(t.measured("h200"), None);
        // A read 2 s later keeps the older one: the rate stands, nothing is measured again.
        let round = [
            read("a", "h200", 4100.0, true),
            read("b", "h100", 60.0, true),
        ];
        t.observe(&s, &round, at(17));
        assert_eq!(tokens(&t), Some(200.0));
        // b was not full at its first read: its interval says nothing of h100's full batches.
        let round = [
            read("a", "h200", 7000.0, true),
            read("b", "h100", 1550.0, true),
        ];
        t.observe(&s, &round, at(30));
        assert_eq!(tokens(&t), Some(200.0 + 100.0));
        assert!(!t.estimates.contains_key("h100"));
        // The third full interval of a: the mean of 200, 200 and 110.
        let round = [
            read("a", "h200", 8650.0, true),
            read("b", "h100", 3050.0, true),
        ];
        t.observe(&s, &round, at(45));
        assert_eq!(t.measured("h200"), Some(170.0));
        // A fourth moves it 30% of the way.
        t.observe(&s, &[read("a", "h200", 9400.0, true)], at(60));
        assert!((t.measured("h200").unwrap() - (170.0 + 0.3 * (50.0 - 170.0))).abs() < 1e-9);
        // An interval longer than 45 s (reads paused) gives a rate but measures nothing.
        let before = t.estimates["h200"].intervals;
        t.observe(&s, &[read("a", "h200", 21400.0, true)], at(160));
        assert_eq!(tokens(&t), Some(120.0));
        assert_eq!(t.estimates["h200"].intervals, before);
        // a restarted (its counter went down): no rate until read again; b not read: gone.
        t.observe(&s, &[read("a", "h200", 10.0, true)], at(175));
        assert_eq!(tokens(&t), None);
        t.observe(&s, &[read("a", "h200", 1510.0, true)], at(190));
        assert_eq!(tokens(&t), Some(100.0));
        // A count that is not a number is no read.
        let mut nan = read("a", "h200", f64::NAN, true);
        t.observe(&s, std::slice::from_ref(&nan), at(205));
        assert_eq!(tokens(&t), None);
        nan.generated = None;
        t.observe(&s, &[nan], at(220));
        assert_eq!(tokens(&t), None);
    }

    /// A changed model, engine or GPU shape is measured again; a changed price or capacity
    /// is not; a variant gone from the spec is forgotten.
    #[test]
    fn a_changed_shape_is_measured_again() {
        let mut s = spec(vec![priced("h200", "40", None)]);
        let t0 = Instant::now();
        let mut t = Throughput::default();
        for (i, generated) in [0.0, 3000.0, 6000.0, 9000.0].into_iter().enumerate() {
            let now = t0 + Duration::from_secs(15 * i as u64);
            t.observe(&s, &[read("a", "h200", generated, true)], now);
        }
        assert_eq!(t.measured("h200"), Some(200.0));
        // (2 s after the last read: no new interval.)
        let at = t0 + Duration::from_secs(47);
        s.variants[0].cost_per_hour = CostPerHour::parse("30").unwrap();
        s.variants[0].max_replicas = Some(3);
        t.observe(&s, &[read("a", "h200", 9000.0, true)], at);
        assert_eq!(t.measured("h200"), Some(200.0));
        s.engine.max_batched_tokens = Some(16384);
        t.observe(&s, &[read("a", "h200", 9000.0, true)], at);
        assert_eq!(t.measured("h200"), None);
        assert!(t.estimates.is_empty());
    }

    /// Measured figures outrank declared ones; a variant without either keeps its place;
    /// per unit of cost, a cheaper slower variant can come first.
    #[test]
    fn variants_rank_by_tokens_per_unit_of_cost() {
        let variants = [
            priced("h200", "40", Some(2000)), // 50 per unit
            priced("a100", "10", None),       // unknown: stays second
            priced("h100", "20", Some(1200)), // 60 per unit
        ];
        let mut t = Throughput::default();
        let r = t.rank(&variants);
        assert_eq!(r.order, ["h100", "a100", "h200"]);
        assert_eq!(
            r.describe,
            "variants by tokens per second per unit of cost, best first: \
             h100 (expectedTokensPerSecond), a100 (not measured, kept in its listed place), \
             h200 (expectedTokensPerSecond)"
        );
        let measure = |t: &mut Throughput, name: &str, tokens_per_second: f64| {
            t.estimates.insert(
                name.into(),
                Estimate {
                    tokens_per_second,
                    intervals: MIN_INTERVALS,
                    fingerprint: 0,
                },
            );
        };
        // h200 measured at 2,800 tokens/s: 70 per unit, past h100's 60 by more than 10%.
        measure(&mut t, "h200", 2800.0);
        let r = t.rank(&variants);
        assert_eq!(r.order, ["h200", "a100", "h100"]);
        assert!(r.describe.contains("h200 (measured)"), "{}", r.describe);
        // h100 measured at 1,500 (75 per unit): within 10% of h200's 70, so h200 stays first.
        measure(&mut t, "h100", 1500.0);
        assert_eq!(t.rank(&variants).order, ["h200", "a100", "h100"]);
        // At 1,600 (80 per unit, 14% better) h100 overtakes.
        measure(&mut t, "h100", 1600.0);
        assert_eq!(t.rank(&variants).order, ["h100", "a100", "h200"]);
        // With no figure at all, the listed order.
        let plain = [priced("x", "1", None), priced("y", "2", None)];
        assert_eq!(Throughput::default().rank(&plain).order, ["x", "y"]);
    }

    /// The metrics of lastScaling: the price of the replicas with a rate, per million tokens
    /// at that rate; an engine read once adds no cost, and one of a variant gone from the
    /// spec counts for nothing.
    #[test]
    fn cost_per_million_tokens_is_the_price_of_the_replicas_measured() {
        let s = spec(vec![priced("h200", "36", None), priced("h100", "18", None)]);
        let t0 = Instant::now();
        let mut t = Throughput::default();
        let first = [
            read("a", "h200", 0.0, true),
            read("b", "h100", 0.0, true),
            read("c", "gone", 0.0, true),
        ];
        t.observe(&s, &first, t0);
        assert_eq!(t.served(&s.variants, 7.0), None);
        let later = [
            read("a", "h200", 9000.0, true),
            read("b", "h100", 6000.0, true),
            read("c", "gone", 6000.0, true),
            read("new", "h200", 0.0, true),
        ];
        t.observe(&s, &later, t0 + Duration::from_secs(15));
        let m = t.served(&s.variants, 7.0).unwrap();
        assert_eq!((m.queue_depth, m.tokens_per_second), (7.0, 1000.0));
        assert!((m.tokens_per_second_per_dollar - 1000.0 / 54.0).abs() < 1e-9);
        // 54 an hour for 3.6M tokens an hour: 15 per million.
        assert!((m.cost_per_million_tokens.unwrap() - 15.0).abs() < 1e-9);
        // Nothing generated: no price per token.
        t.observe(&s, &later, t0 + Duration::from_secs(30));
        let idle = t.served(&s.variants, 0.0).unwrap();
        assert_eq!(
            (idle.tokens_per_second, idle.cost_per_million_tokens),
            (0.0, None)
        );
    }
}
