//! The `costAware` policy's measure: generated tokens per second per unit of `costPerHour`,
//! by variant, and what the engines of an InferenceDeployment serve and cost now (the metrics
//! of `status.lastScaling`).
//!
//! A replica's throughput depends on its load, so a variant is measured only while its batch
//! is full: between two reads of one engine at which it had requests waiting, or every slot
//! running, the `sparsemoe_generation_tokens_total` it added, per second, is what one replica
//! of its variant delivers. A variant's estimate follows those intervals (an exponential
//! average); until it has one, the variant's `expectedTokensPerSecond` stands in, and without
//! that the variant keeps its place in the list. Estimates live in the operator's memory: a
//! restarted operator measures again.
//!
//! Variants are ranked by tokens per second per unit of cost, best first; one overtakes
//! another only when more than 10% better, so two variants measured alike do not trade
//! places with every read. The ranking says where replicas go (the best with room first) and
//! come from (the worst first); replicas that run are not moved, so a fleet drifts to the
//! cheapest variants as load rises and falls, without restarts of its own.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sparsemoe_api::v1alpha1::{GpuVariant, ScalingMetrics};
use tokio::time::Instant;

/// The engine's counter of generated tokens.
pub const GENERATED_METRIC: &str = "sparsemoe_generation_tokens_total";
/// The shortest interval between two reads of one engine that gives it a rate: a reconcile an
/// event brings just after a read keeps the older read.
const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// The weight of a new full-batch interval in a variant's estimate.
const SMOOTHING: f64 = 0.3;
/// How much better (per unit of cost) a variant must be to overtake one ranked before it.
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
    /// Its batch was full: requests waiting, or every slot running.
    pub full: bool,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    generated: f64,
    at: Instant,
    full: bool,
    /// Tokens per second over the last interval that gave a rate.
    rate: Option<f64>,
}

/// What one InferenceDeployment's engines have shown of their throughput.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    /// The last read of each engine read in the last round.
    samples: HashMap<String, Sample>,
    /// Tokens per second one replica delivers with its batch full, by variant.
    full_batch: BTreeMap<String, f64>,
    /// The last ranking of the variants with a figure, best first.
    ranked: Vec<String>,
}

impl Throughput {
    /// Takes a round of reads made at `now`; returns the generated tokens per second, summed
    /// over the engines with a rate. Engines not in `reads` are forgotten (a restarted or
    /// replaced pod starts again), as is an interval over which a counter went down.
    pub fn observe(&mut self, reads: &[EngineRead], now: Instant) -> f64 {
        let mut kept = HashMap::with_capacity(reads.len());
        for read in reads {
            let Some(generated) = read.generated.filter(|g| g.is_finite() && *g >= 0.0) else {
                continue;
            };
            let fresh = Sample {
                generated,
                at: now,
                full: read.full,
                rate: None,
            };
            let sample = match self.samples.remove(&read.pod) {
                Some(prev) if generated < prev.generated => fresh,
                Some(prev) if now.saturating_duration_since(prev.at) < MIN_INTERVAL => prev,
                Some(prev) => {
                    let seconds = now.saturating_duration_since(prev.at).as_secs_f64();
                    let rate = (generated - prev.generated) / seconds;
                    if let Some(variant) = read.variant.as_ref().filter(|_| prev.full && read.full)
                    {
                        self.full_batch
                            .entry(variant.clone())
                            .and_modify(|e| *e += SMOOTHING * (rate - *e))
                            .or_insert(rate);
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
        self.samples.values().filter_map(|s| s.rate).sum()
    }

    /// Tokens per second one replica of `variant` was measured to deliver with its batch full.
    pub fn measured(&self, variant: &str) -> Option<f64> {
        self.full_batch.get(variant).copied()
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

/// What the engines read serve and cost: `waiting` requests, `tokens_per_second`, over the
/// replicas `reads` name (a read's variant's `costPerHour` each; reads of variants no longer
/// in the spec count for neither).
pub fn metrics(
    variants: &[GpuVariant],
    reads: &[EngineRead],
    waiting: f64,
    tokens_per_second: f64,
) -> ScalingMetrics {
    let cost_per_hour: f64 = reads
        .iter()
        .filter_map(|r| {
            let name = r.variant.as_deref()?;
            variants.iter().find(|v| v.name == name)
        })
        .map(|v| v.cost_per_hour.value())
        .sum();
    let per_dollar = match cost_per_hour > 0.0 {
        true => tokens_per_second / cost_per_hour,
        false => 0.0,
    };
    ScalingMetrics {
        queue_depth: waiting,
        tokens_per_second,
        tokens_per_second_per_dollar: per_dollar,
        cost_per_million_tokens: (tokens_per_second > 0.0 && cost_per_hour > 0.0)
            .then(|| cost_per_hour / (tokens_per_second * 3600.0) * 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::variant;
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

    /// Rates come from two reads of one engine; only full-batch intervals measure a
    /// variant; a counter that went down (a restarted engine) and a read too soon after the
    /// last give no rate; an engine not read is forgotten.
    #[test]
    fn full_batches_measure_their_variant() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Throughput::default();
        assert_eq!(t.observe(&[read("a", "h200", 1000.0, true)], at(0)), 0.0);
        // 15 s later: 3,000 more tokens, batch full at both reads: 200 tokens/s.
        let rate = t.observe(
            &[
                read("a", "h200", 4000.0, true),
                read("b", "h100", 50.0, false),
            ],
            at(15),
        );
        assert_eq!(rate, 200.0);
        assert_eq!(t.measured("h200"), Some(200.0));
        // A read 2 s later keeps the older one: the rate stands, nothing is measured again.
        let rate = t.observe(
            &[
                read("a", "h200", 4100.0, true),
                read("b", "h100", 60.0, true),
            ],
            at(17),
        );
        assert_eq!(rate, 200.0);
        // b was idle at its first read: its interval says nothing of h100's full batches.
        let rate = t.observe(
            &[
                read("a", "h200", 7000.0, true),
                read("b", "h100", 1550.0, true),
            ],
            at(30),
        );
        assert_eq!(rate, 200.0 + 100.0);
        assert_eq!(t.measured("h100"), None);
        // The next full interval of a moves h200's estimate 30% of the way.
        t.observe(
            &[
                read("a", "h200", 8500.0, true),
                read("b", "h100", 3050.0, true),
            ],
            at(45),
        );
        assert_eq!(t.measured("h200"), Some(200.0 + 0.3 * (100.0 - 200.0)));
        assert_eq!(t.measured("h100"), Some(100.0));
        // a restarted (its counter went down): no rate until read again; b not read: gone.
        let rate = t.observe(&[read("a", "h200", 10.0, true)], at(60));
        assert_eq!(rate, 0.0);
        let rate = t.observe(&[read("a", "h200", 1510.0, true)], at(75));
        assert_eq!(rate, 100.0);
        // A count that is not a number is no read.
        let mut nan = read("a", "h200", f64::NAN, true);
        assert_eq!(t.observe(std::slice::from_ref(&nan), at(90)), 0.0);
        nan.generated = None;
        assert_eq!(t.observe(&[nan], at(105)), 0.0);
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
        // h200 measured at 2,800 tokens/s: 70 per unit, past h100's 60 by more than 10%.
        t.full_batch.insert("h200".into(), 2800.0);
        let r = t.rank(&variants);
        assert_eq!(r.order, ["h200", "a100", "h100"]);
        assert!(r.describe.contains("h200 (measured)"), "{}", r.describe);
        // h100 measured at 1,500 (75 per unit): within 10% of h200's 70, so h200 stays first.
        t.full_batch.insert("h100".into(), 1500.0);
        assert_eq!(t.rank(&variants).order, ["h200", "a100", "h100"]);
        // At 1,600 (80 per unit, 14% better) h100 overtakes.
        t.full_batch.insert("h100".into(), 1600.0);
        assert_eq!(t.rank(&variants).order, ["h100", "a100", "h200"]);
        // With no figure at all, the listed order.
        let plain = [priced("x", "1", None), priced("y", "2", None)];
        assert_eq!(Throughput::default().rank(&plain).order, ["x", "y"]);
    }

    /// The metrics of lastScaling: the read replicas' price, per million tokens at the rate.
    #[test]
    fn cost_per_million_tokens_is_the_price_of_the_replicas_read() {
        let variants = [priced("h200", "36", None), priced("h100", "18", None)];
        let reads = [
            read("a", "h200", 0.0, true),
            read("b", "h100", 0.0, true),
            read("c", "gone", 0.0, true),
        ];
        let m = metrics(&variants, &reads, 7.0, 1000.0);
        assert_eq!(m.queue_depth, 7.0);
        assert_eq!(m.tokens_per_second, 1000.0);
        assert!((m.tokens_per_second_per_dollar - 1000.0 / 54.0).abs() < 1e-9);
        // 54 an hour for 3.6M tokens an hour: 15 per million.
        assert!((m.cost_per_million_tokens.unwrap() - 15.0).abs() < 1e-9);
        let idle = metrics(&variants, &reads, 0.0, 0.0);
        assert_eq!(
            (
                idle.tokens_per_second_per_dollar,
                idle.cost_per_million_tokens
            ),
            (0.0, None)
        );
    }
}
