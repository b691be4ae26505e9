//! The replica decision: how many replicas each variant runs. The reconciler calls
//! [`decide_around`] (through `children::decide_and_build`) and nothing else.
//!
//! `fixed` takes `spec.scaling.replicas` (which the /scale subresource, HPA and KEDA set) and
//! fills the variants in listed order up to each one's `maxReplicas`, passing over variants
//! that cannot be realised now, whose running replicas count toward it ([`decide_around`]).
//! `queueDepth` and `costAware` take the total the engines' queues call for
//! ([`crate::queue_scaling`]), adding replicas to the most preferred variants with room and
//! taking them from the least preferred: under `queueDepth` the listed order is the order of
//! preference, under `costAware` the variants' tokens per second per unit of cost
//! ([`crate::cost`]). Without a recommendation (no engine's metrics read) the replicas that
//! run are held (while a renamed variant's old workload is replaced, the replicas decided
//! before), clamped to `[minReplicas, maxReplicas]`, and the reason says so. The operator
//! never writes the user's spec.

use std::collections::{BTreeMap, BTreeSet};

use sparsemoe_api::InferenceDeploymentSpec;
use sparsemoe_api::v1alpha1::{GpuVariant, ScalingPolicy};

/// Replicas per variant, in spec order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ReplicaDecision {
    pub variants: Vec<(String, i32)>,
    /// Replicas asked for that no variant has room for.
    pub unplaced: i32,
    /// `true` when the replicas that run are held rather than decided (see the module doc).
    pub holding: bool,
    /// The ScalingActive condition's reason: `FixedReplicas`, `ValidMetricFound` (queueDepth
    /// deciding), `MetricsUnavailable` or `AutoscalerNotWired` (holding).
    pub reason_code: &'static str,
    /// Why, in words (shown in the ScalingActive condition).
    pub reason: String,
}

impl ReplicaDecision {
    pub fn replicas_of(&self, variant: &str) -> i32 {
        self.variants
            .iter()
            .find(|(name, _)| name == variant)
            .map_or(0, |(_, n)| *n)
    }

    pub fn total(&self) -> i32 {
        self.variants.iter().map(|(_, n)| n).sum()
    }
}

fn capacity(max: Option<u32>) -> i64 {
    max.map_or(i64::MAX, i64::from)
}

/// What an InferenceDeployment's workloads run now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Running {
    /// Replicas each spec variant's workload runs, by variant name (absent: no workload yet).
    pub variants: BTreeMap<String, i32>,
    /// While workloads the spec no longer names still run (a variant renamed or removed, or
    /// one that changed between Deployment and LeaderWorkerSet): the replicas the last
    /// decision gave in all (the status's), which the holding policies keep, so that a rename
    /// does not fall back to minReplicas.
    pub replacing: Option<i32>,
    /// Under `queueDepth`: the replicas the engines' queues call for, or why there is no
    /// recommendation (the replicas that run are then held).
    pub queue: Option<Result<crate::queue_scaling::Recommendation, String>>,
    /// Under `costAware`: the variants by tokens per second per unit of cost, best first
    /// (absent: the listed order).
    pub ranking: Option<crate::cost::Ranking>,
}

/// Replicas per variant for `spec`, given the replicas each variant's workload runs now
/// (`current`, by variant name; absent for variants with no workload yet).
pub fn decide(spec: &InferenceDeploymentSpec, current: &BTreeMap<String, i32>) -> ReplicaDecision {
    let running = Running {
        variants: current.clone(),
        ..Running::default()
    };
    decide_around(spec, &running, &BTreeSet::new())
}

/// [`decide`] from what runs now (`running`), leaving out the variants in `unavailable` (ones
/// that cannot be realised now: a multi-node variant without the LeaderWorkerSet API, a GPU
/// shape no expert plan fits): no replica is added to them, so the next variant in order of
/// preference takes it; what such a variant's workload runs already is left as it is.
pub fn decide_around(
    spec: &InferenceDeploymentSpec,
    running: &Running,
    unavailable: &BTreeSet<String>,
) -> ReplicaDecision {
    let current = &running.variants;
    let scaling = &spec.scaling;
    // The most replicas a variant may be given.
    let room = |v: &GpuVariant| match unavailable.contains(&v.name) {
        true => 0,
        false => capacity(v.max_replicas),
    };
    match scaling.policy {
        ScalingPolicy::Fixed => {
            // What an unrealisable variant's workload runs stays (it is not applied) and
            // counts toward the replicas asked for; the rest fill the others in order.
            let kept = |v: &GpuVariant| match unavailable.contains(&v.name) {
                true => i64::from(current.get(&v.name).copied().unwrap_or(0).max(0)),
                false => 0,
            };
            let kept_total: i64 = spec.variants.iter().map(kept).sum();
            let asked = (i64::from(scaling.replicas) - kept_total).max(0);
            let (mut variants, unplaced) = fill_in_order(spec, asked, room);
            for (v, (_, n)) in spec.variants.iter().zip(variants.iter_mut()) {
                if unavailable.contains(&v.name) {
                    *n = clamp_i32(kept(v));
                }
            }
            ReplicaDecision {
                variants,
                unplaced,
                holding: false,
                reason_code: "FixedReplicas",
                reason: format!(
                    "policy fixed: {} replicas from spec.scaling.replicas",
                    scaling.replicas
                ),
            }
        }
        ScalingPolicy::QueueDepth | ScalingPolicy::CostAware => {
            let min = i64::from(scaling.min_replicas);
            let max = i64::from(scaling.max_replicas.unwrap_or(scaling.min_replicas)).max(min);
            // Keep what runs, per variant, within each variant's capacity.
            let mut variants: Vec<(String, i64)> = spec
                .variants
                .iter()
                .map(|v| {
                    let now = i64::from(current.get(&v.name).copied().unwrap_or(0).max(0));
                    let most = match unavailable.contains(&v.name) {
                        true => now,
                        false => room(v),
                    };
                    (v.name.clone(), now.min(most))
                })
                .collect();
            let total: i64 = variants.iter().map(|(_, n)| n).sum();
            // What runs, or while workloads of a renamed variant are replaced, what was
            // decided before: their replicas move to the spec's variants.
            let held = total.max(running.replacing.map_or(0, i64::from));
            let policy = scaling.policy.as_str();
            let (target, reason_code, mut reason) = match &running.queue {
                Some(Ok(r)) => (
                    r.replicas.clamp(min, max),
                    "ValidMetricFound",
                    r.reason.clone(),
                ),
                unread => (
                    held.clamp(min, max),
                    "MetricsUnavailable",
                    format!(
                        "policy {policy}: holding the current replicas within minReplicas {} \
                         and maxReplicas {max}: {}",
                        scaling.min_replicas,
                        match unread {
                            Some(Err(why)) => why.as_str(),
                            _ => "no engine's metrics read yet",
                        }
                    ),
                ),
            };
            // The order replicas are added in (and taken away in reverse): costAware's
            // ranking, else the listed order.
            let mut order: Vec<usize> = (0..spec.variants.len()).collect();
            if let (ScalingPolicy::CostAware, Some(ranking)) = (scaling.policy, &running.ranking) {
                let place = |name: &String| ranking.order.iter().position(|r| r == name);
                order.sort_by_key(|&i| place(&spec.variants[i].name).unwrap_or(usize::MAX));
                reason.push_str("; ");
                reason.push_str(&ranking.describe);
            }
            let mut unplaced = 0;
            if total < target {
                // Add replicas to the most preferred variants with room.
                let mut missing = target - total;
                for &i in &order {
                    let n = &mut variants[i].1;
                    let add = missing.min((room(&spec.variants[i]) - *n).max(0));
                    *n += add;
                    missing -= add;
                }
                unplaced = missing;
            } else if total > target {
                // Remove replicas from the least preferred variants first; not from one that
                // cannot be realised, whose workload is not applied, so what it runs stays
                // (taking them off it would leave more than the target running).
                let mut excess = total - target;
                for &i in order.iter().rev() {
                    if unavailable.contains(&spec.variants[i].name) {
                        continue;
                    }
                    let n = &mut variants[i].1;
                    let remove = excess.min(*n);
                    *n -= remove;
                    excess -= remove;
                }
            }
            ReplicaDecision {
                variants: variants
                    .into_iter()
                    .map(|(name, n)| (name, clamp_i32(n)))
                    .collect(),
                unplaced: clamp_i32(unplaced),
                holding: reason_code != "ValidMetricFound",
                reason_code,
                reason,
            }
        }
    }
}

fn clamp_i32(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Spreads `total` replicas over the variants in listed order, each up to its `room`.
fn fill_in_order(
    spec: &InferenceDeploymentSpec,
    total: i64,
    room: impl Fn(&GpuVariant) -> i64,
) -> (Vec<(String, i32)>, i32) {
    let mut left = total;
    let variants = spec
        .variants
        .iter()
        .map(|v| {
            let take = left.min(room(v));
            left -= take;
            (v.name.clone(), clamp_i32(take))
        })
        .collect();
    (variants, clamp_i32(left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::spec_with_variants;

    #[test]
    fn fixed_fills_variants_in_order_up_to_their_capacity() {
        let mut spec = spec_with_variants(&[("h200", Some(2)), ("h100", Some(3)), ("a100", None)]);
        spec.scaling.replicas = 4;
        let d = decide(&spec, &BTreeMap::new());
        assert_eq!(
            d.variants,
            vec![("h200".into(), 2), ("h100".into(), 2), ("a100".into(), 0)]
        );
        assert_eq!((d.unplaced, d.holding, d.total()), (0, false, 4));
        spec.scaling.replicas = 9;
        assert_eq!(decide(&spec, &BTreeMap::new()).replicas_of("a100"), 4);
        spec.scaling.replicas = 0;
        assert_eq!(decide(&spec, &BTreeMap::new()).total(), 0);
    }

    /// A variant that cannot be realised now gets no new replicas: the next one in order of
    /// preference takes them, under either kind of policy; what it runs already stays, and
    /// counts.
    #[test]
    fn unavailable_variants_pass_their_replicas_on() {
        let mut spec = spec_with_variants(&[("h200", None), ("h100", Some(3))]);
        spec.scaling.replicas = 2;
        let h200 = BTreeSet::from(["h200".to_string()]);
        let d = decide_around(&spec, &Running::default(), &h200);
        assert_eq!(d.variants, vec![("h200".into(), 0), ("h100".into(), 2)]);
        spec.scaling.replicas = 5;
        let d = decide_around(&spec, &Running::default(), &h200);
        assert_eq!((d.replicas_of("h100"), d.unplaced), (3, 2));
        // Replicas h200 runs already count toward the replicas asked for, not on top of them.
        let on_h200 = Running {
            variants: BTreeMap::from([("h200".to_string(), 2)]),
            replacing: None,
            queue: None,
            ranking: None,
        };
        spec.scaling.replicas = 3;
        let d = decide_around(&spec, &on_h200, &h200);
        assert_eq!(d.variants, vec![("h200".into(), 2), ("h100".into(), 1)]);
        assert_eq!((d.total(), d.unplaced), (3, 0));
        spec.scaling.replicas = 1;
        let d = decide_around(&spec, &on_h200, &h200);
        assert_eq!(d.variants, vec![("h200".into(), 2), ("h100".into(), 0)]);

        spec.scaling.policy = ScalingPolicy::QueueDepth;
        spec.scaling.min_replicas = 2;
        spec.scaling.max_replicas = Some(6);
        let d = decide_around(&spec, &Running::default(), &h200);
        assert_eq!(d.variants, vec![("h200".into(), 0), ("h100".into(), 2)]);
        // One already running on h200 stays, and counts.
        let current = Running {
            variants: BTreeMap::from([("h200".to_string(), 1)]),
            replacing: None,
            queue: None,
            ranking: None,
        };
        let d = decide_around(&spec, &current, &h200);
        assert_eq!(d.variants, vec![("h200".into(), 1), ("h100".into(), 1)]);
        // Over maxReplicas, the replicas come off the variants whose workloads are applied:
        // the unrealisable one keeps what it runs, and the total is the maximum.
        spec.scaling.max_replicas = Some(4);
        let over = Running {
            variants: BTreeMap::from([("h200".to_string(), 3), ("h100".to_string(), 3)]),
            replacing: None,
            queue: None,
            ranking: None,
        };
        let h100 = BTreeSet::from(["h100".to_string()]);
        let d = decide_around(&spec, &over, &h100);
        assert_eq!(d.variants, vec![("h200".into(), 1), ("h100".into(), 3)]);
        assert_eq!(d.total(), 4);
        // All realisable: the least preferred gives them up first.
        let d = decide_around(&spec, &over, &BTreeSet::new());
        assert_eq!(d.variants, vec![("h200".into(), 3), ("h100".into(), 1)]);
    }

    /// Under queueDepth with a recommendation, the total follows it: added to the most
    /// preferred variants with room, taken from the least preferred, within minReplicas and
    /// maxReplicas; without one (no engine read), the replicas that run are held, saying why.
    #[test]
    fn queue_depth_follows_the_recommendation() {
        use crate::queue_scaling::Recommendation;
        let mut spec = spec_with_variants(&[("h200", Some(2)), ("h100", None)]);
        spec.scaling.policy = ScalingPolicy::QueueDepth;
        spec.scaling.min_replicas = 1;
        spec.scaling.max_replicas = Some(6);
        let running = |h200: i32, h100: i32, replicas: i64| Running {
            variants: BTreeMap::from([("h200".to_string(), h200), ("h100".to_string(), h100)]),
            replacing: None,
            queue: Some(Ok(Recommendation {
                replicas,
                reason: format!("{replicas} wanted"),
            })),
            ranking: None,
        };
        let d = decide_around(&spec, &running(1, 0, 5), &BTreeSet::new());
        assert_eq!(d.variants, vec![("h200".into(), 2), ("h100".into(), 3)]);
        assert_eq!(
            (d.holding, d.reason_code, d.reason.as_str()),
            (false, "ValidMetricFound", "5 wanted")
        );
        let d = decide_around(&spec, &running(2, 3, 3), &BTreeSet::new());
        assert_eq!(d.variants, vec![("h200".into(), 2), ("h100".into(), 1)]);
        // Clamped: the policy's bounds hold whatever the recommendation.
        assert_eq!(
            decide_around(&spec, &running(2, 3, 40), &BTreeSet::new()).total(),
            6
        );
        assert_eq!(
            decide_around(&spec, &running(2, 3, 0), &BTreeSet::new()).total(),
            1
        );
        let unread = Running {
            queue: Some(Err("no engine pod is ready".into())),
            ..running(2, 1, 0)
        };
        let d = decide_around(&spec, &unread, &BTreeSet::new());
        assert_eq!(d.total(), 3);
        assert_eq!((d.holding, d.reason_code), (true, "MetricsUnavailable"));
        assert!(d.reason.contains("no engine pod is ready"), "{}", d.reason);
        // costAware follows the same recommendation; without a ranking, in listed order.
        spec.scaling.policy = ScalingPolicy::CostAware;
        let d = decide_around(&spec, &running(1, 0, 5), &BTreeSet::new());
        assert_eq!(d.variants, vec![("h200".into(), 2), ("h100".into(), 3)]);
        let d = decide_around(&spec, &unread, &BTreeSet::new());
        assert_eq!((d.total(), d.reason_code), (3, "MetricsUnavailable"));
        assert!(
            d.reason.starts_with("policy costAware: holding"),
            "{}",
            d.reason
        );
    }

    /// Under costAware, replicas go to the best-ranked variant with room and come off the
    /// worst-ranked; those that run elsewhere stay (nothing is moved); the ranking is named.
    #[test]
    fn cost_aware_adds_to_the_best_and_takes_from_the_worst() {
        use crate::cost::Ranking;
        use crate::queue_scaling::Recommendation;
        let mut spec =
            spec_with_variants(&[("h200", Some(4)), ("a100", Some(1)), ("h100", Some(3))]);
        spec.scaling.policy = ScalingPolicy::CostAware;
        spec.scaling.min_replicas = 1;
        spec.scaling.max_replicas = Some(10);
        let ranking = Ranking {
            order: vec!["h100".into(), "a100".into(), "h200".into()],
            describe: "h100 first".into(),
        };
        let running = |h200: i32, a100: i32, h100: i32, replicas: i64| Running {
            variants: BTreeMap::from([
                ("h200".to_string(), h200),
                ("a100".to_string(), a100),
                ("h100".to_string(), h100),
            ]),
            replacing: None,
            queue: Some(Ok(Recommendation {
                replicas,
                reason: format!("{replicas} wanted"),
            })),
            ranking: Some(ranking.clone()),
        };
        // 2 on h200 (the listed first), 6 wanted: h100 fills to 3, a100 takes 1.
        let d = decide_around(&spec, &running(2, 0, 0, 6), &BTreeSet::new());
        let want = |h200, a100, h100| {
            vec![
                ("h200".to_string(), h200),
                ("a100".to_string(), a100),
                ("h100".to_string(), h100),
            ]
        };
        assert_eq!(d.variants, want(2, 1, 3));
        assert_eq!(d.reason, "6 wanted; h100 first");
        // Past their room, the rest go to h200.
        let d = decide_around(&spec, &running(2, 0, 0, 8), &BTreeSet::new());
        assert_eq!(d.variants, want(4, 1, 3));
        // Down to 3: h200 gives up its 2 first, then a100.
        let d = decide_around(&spec, &running(2, 1, 3, 3), &BTreeSet::new());
        assert_eq!(d.variants, want(0, 0, 3));
        // h100 cannot be realised now: the next best takes what it cannot.
        let h100 = BTreeSet::from(["h100".to_string()]);
        let d = decide_around(&spec, &running(0, 0, 0, 3), &h100);
        assert_eq!(d.variants, want(2, 1, 0));
        // queueDepth ignores a ranking: the listed order.
        spec.scaling.policy = ScalingPolicy::QueueDepth;
        let d = decide_around(&spec, &running(0, 0, 0, 3), &BTreeSet::new());
        assert_eq!(d.variants, want(3, 0, 0));
        assert_eq!(d.reason, "3 wanted");
    }

    /// A renamed variant's replicas, still running under its old name, move to the spec's
    /// variants under the holding policies (not back to minReplicas), and are not counted
    /// twice once the new workload runs them.
    #[test]
    fn holding_policies_carry_a_renamed_variants_replicas_over() {
        let mut spec = spec_with_variants(&[("h200-sxm", None), ("h100", Some(2))]);
        spec.scaling.policy = ScalingPolicy::QueueDepth;
        spec.scaling.min_replicas = 1;
        spec.scaling.max_replicas = Some(10);
        // `h200` (8 replicas) was renamed `h200-sxm`; its workload still runs.
        let renamed = Running {
            variants: BTreeMap::from([("h100".to_string(), 1)]),
            replacing: Some(9),
            queue: None,
            ranking: None,
        };
        let d = decide_around(&spec, &renamed, &BTreeSet::new());
        assert_eq!(d.variants, vec![("h200-sxm".into(), 8), ("h100".into(), 1)]);
        // The new workload runs them now, the old one still there: still 9 in all.
        let moved = Running {
            variants: BTreeMap::from([("h200-sxm".to_string(), 8), ("h100".to_string(), 1)]),
            replacing: Some(9),
            queue: None,
            ranking: None,
        };
        let d = decide_around(&spec, &moved, &BTreeSet::new());
        assert_eq!(d.total(), 9);
        // Capped by maxReplicas; nothing replaced: what runs.
        spec.scaling.max_replicas = Some(4);
        let d = decide_around(&spec, &renamed, &BTreeSet::new());
        assert_eq!(d.total(), 4);
        let d = decide(&spec, &BTreeMap::from([("h100".to_string(), 2)]));
        assert_eq!(d.variants, vec![("h200-sxm".into(), 0), ("h100".into(), 2)]);
    }

    #[test]
    fn fixed_reports_replicas_that_fit_nowhere() {
        let mut spec = spec_with_variants(&[("h200", Some(1)), ("h100", Some(1))]);
        spec.scaling.replicas = 5;
        let d = decide(&spec, &BTreeMap::new());
        assert_eq!((d.total(), d.unplaced), (2, 3));
    }

    #[test]
    fn metric_policies_hold_current_replicas_within_bounds_and_say_so() {
        let mut spec = spec_with_variants(&[("h200", Some(4)), ("h100", None)]);
        spec.scaling.policy = ScalingPolicy::QueueDepth;
        spec.scaling.min_replicas = 2;
        spec.scaling.max_replicas = Some(5);
        // Nothing runs yet: start at minReplicas in preference order.
        let d = decide(&spec, &BTreeMap::new());
        assert_eq!(d.variants, vec![("h200".into(), 2), ("h100".into(), 0)]);
        assert!(
            d.holding && d.reason.contains("no engine's metrics"),
            "{}",
            d.reason
        );
        // Running replicas are held as they are.
        let current = BTreeMap::from([("h200".to_string(), 3), ("h100".to_string(), 1)]);
        assert_eq!(
            decide(&spec, &current).variants,
            vec![("h200".into(), 3), ("h100".into(), 1)]
        );
        // Above maxReplicas: the least preferred variant shrinks first.
        let current = BTreeMap::from([("h200".to_string(), 4), ("h100".to_string(), 3)]);
        assert_eq!(
            decide(&spec, &current).variants,
            vec![("h200".into(), 4), ("h100".into(), 1)]
        );
        spec.scaling.policy = ScalingPolicy::CostAware;
        assert!(
            decide(&spec, &current)
                .reason
                .starts_with("policy costAware: holding"),
            "{}",
            decide(&spec, &current).reason
        );
    }
}
