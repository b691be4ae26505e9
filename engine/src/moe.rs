//! DeepSeek-V3 MoE routing ("noaux_tc"): sigmoid scores, a per-expert bias that steers
//! *selection only*, group-limited top-k, and weights from the unbiased scores.

use crate::config::ModelConfig;

/// The routing rule's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl From<&ModelConfig> for RouterConfig {
    fn from(c: &ModelConfig) -> Self {
        Self {
            n_experts: c.n_routed_experts,
            top_k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            norm_topk_prob: c.norm_topk_prob,
            routed_scaling_factor: c.routed_scaling_factor,
        }
    }
}

/// Chooses the experts of one token from its router logits. Returns `(experts, weights)`,
/// sorted by expert id. Values rank by `f32::total_cmp` (so a NaN has a place), ties to the
/// lower index; every NaN ranked is first made the positive quiet NaN ([`canonical`]), above
/// +inf, so that where a NaN's sign came from (the host's arithmetic, or a GPU's, which
/// `moe_route_f32` mirrors) does not change the choice.
pub fn route(logits: &[f32], bias: &[f32], cfg: &RouterConfig) -> (Vec<usize>, Vec<f32>) {
    let (scores, biased) = scored(logits, bias, cfg, top_two_sum);
    // The top_k by (value descending, index ascending), a strict order: selecting them and
    // sorting the few chosen costs O(experts) where sorting all of them cost O(experts log
    // experts), with the same choice.
    let mut order: Vec<usize> = (0..cfg.n_experts).collect();
    let before = |&a: &usize, &b: &usize| biased[b].total_cmp(&biased[a]).then(a.cmp(&b));
    if cfg.top_k < cfg.n_experts {
        order.select_nth_unstable_by(cfg.top_k, before);
    }
    let mut chosen: Vec<usize> = order[..cfg.top_k].to_vec();
    chosen.sort_unstable();

    let mut weights: Vec<f32> = chosen.iter().map(|&x| scores[x]).collect();
    if cfg.norm_topk_prob {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    weights
        .iter_mut()
        .for_each(|w| *w *= cfg.routed_scaling_factor);
    (chosen, weights)
}

/// The experts [`route`] chooses, by the rule as first written here: each group sorted for its
/// top two, then every expert sorted. `route` must choose exactly as this does (its tests
/// check it); `bench/host_routing.rs` times the two.
pub fn route_by_sorting(logits: &[f32], bias: &[f32], cfg: &RouterConfig) -> Vec<usize> {
    let by_sorting = |group: &[f32]| {
        let mut group = group.to_vec();
        group.sort_unstable_by(|a, b| b.total_cmp(a));
        group[0] + group[1]
    };
    let (_, biased) = scored(logits, bias, cfg, by_sorting);
    let mut order: Vec<usize> = (0..cfg.n_experts).collect();
    order.sort_unstable_by(|&a, &b| biased[b].total_cmp(&biased[a]).then(a.cmp(&b)));
    let mut chosen = order[..cfg.top_k].to_vec();
    chosen.sort_unstable();
    chosen
}

/// Each expert's score (the logit's sigmoid) and its score plus bias, the latter set to -inf
/// outside the `topk_group` groups of the highest `group_score` (ties to the lower group).
fn scored(
    logits: &[f32],
    bias: &[f32],
    cfg: &RouterConfig,
    group_score: impl Fn(&[f32]) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let scores: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
    let mut biased: Vec<f32> = scores
        .iter()
        .zip(bias)
        .map(|(s, b)| canonical(s + b))
        .collect();
    if cfg.n_group > 1 {
        let size = cfg.n_experts / cfg.n_group;
        let mut group_scores: Vec<(f32, usize)> = (0..cfg.n_group)
            .map(|g| (canonical(group_score(&biased[g * size..(g + 1) * size])), g))
            .collect();
        group_scores.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, g) in &group_scores[cfg.topk_group..] {
            biased[g * size..(g + 1) * size].fill(f32::NEG_INFINITY);
        }
    }
    (scores, biased)
}

/// `x`, or the positive quiet NaN (`f32::NAN`) for any NaN: what the routing ranks, so that a
/// NaN's sign and payload, which differ between the host's arithmetic and a GPU's (x86 makes
/// `inf - inf` a negative NaN, a GPU a positive one), never change a choice.
pub fn canonical(x: f32) -> f32 {
    if x.is_nan() { f32::NAN } else { x }
}

/// The sum of a group's two largest values by `f32::total_cmp` (the group has two or more).
fn top_two_sum(group: &[f32]) -> f32 {
    let (mut first, mut second) = (group[0], group[1]);
    if second.total_cmp(&first).is_gt() {
        std::mem::swap(&mut first, &mut second);
    }
    for &v in &group[2..] {
        if v.total_cmp(&first).is_gt() {
            second = first;
            first = v;
        } else if v.total_cmp(&second).is_gt() {
            second = v;
        }
    }
    first + second
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_group: usize, topk_group: usize, top_k: usize) -> RouterConfig {
        RouterConfig {
            n_experts: 8,
            top_k,
            n_group,
            topk_group,
            norm_topk_prob: true,
            routed_scaling_factor: 2.0,
        }
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let logits = [2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0];
        let mut bias = [0.0; 8];
        let (plain, _) = route(&logits, &bias, &cfg(1, 1, 2));
        assert_eq!(plain, vec![0, 1]);
        bias[7] = 10.0;
        let (ids, weights) = route(&logits, &bias, &cfg(1, 1, 2));
        assert_eq!(ids, vec![0, 7]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let expected0 = 2.0 * s(2.0) / (s(2.0) + s(-5.0));
        assert!((weights[0] - expected0).abs() < 1e-6);
        assert!((weights.iter().sum::<f32>() - 2.0).abs() < 1e-6);
    }

    #[test]
    fn groups_are_scored_by_their_top_two_and_limit_the_choice() {
        // Group 0 = {0,1}: one strong expert; group 1 = {2,3}: two good ones.
        let logits = [5.0, -5.0, 1.0, 1.0, -1.0, -1.0, -2.0, -2.0];
        let bias = [0.0; 8];
        let (ids, _) = route(&logits, &bias, &cfg(4, 1, 2));
        assert_eq!(ids, vec![2, 3], "group 1 wins on its top-2 sum");
        let (ids, _) = route(&logits, &bias, &cfg(4, 2, 2));
        assert_eq!(ids, vec![0, 2]);
    }

    #[test]
    fn selecting_chooses_as_sorting_everything() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let rules = [
            (256, 8, 8, 4),
            (64, 6, 8, 3),
            (16, 2, 1, 1),
            (8, 8, 1, 1),
            (8, 2, 4, 2),
        ];
        for (n_experts, top_k, n_group, topk_group) in rules {
            let cfg = RouterConfig {
                n_experts,
                top_k,
                n_group,
                topk_group,
                norm_topk_prob: true,
                routed_scaling_factor: 2.5,
            };
            for token in 0..300 {
                // Coarse values (many ties), and now and then NaNs and infinities.
                let mut logits: Vec<f32> = (0..n_experts)
                    .map(|_| f32::from(rng.random_range(-8i8..8)) * 0.5)
                    .collect();
                if token % 7 == 0 {
                    logits[rng.random_range(0..n_experts)] = f32::NAN;
                    logits[rng.random_range(0..n_experts)] = f32::INFINITY;
                    logits[rng.random_range(0..n_experts)] = f32::NEG_INFINITY;
                }
                let bias: Vec<f32> = (0..n_experts)
                    .map(|_| f32::from(rng.random_range(-2i8..2)) * 0.05)
                    .collect();
                let (ids, weights) = route(&logits, &bias, &cfg);
                assert_eq!(
                    ids,
                    route_by_sorting(&logits, &bias, &cfg),
                    "{cfg:?}: {logits:?}"
                );
                assert_eq!(weights.len(), top_k);
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "distinct, ascending");
            }
        }
    }

    #[test]
    fn unnormalised_weights_are_scaled_sigmoids() {
        let mut c = cfg(1, 1, 1);
        c.norm_topk_prob = false;
        let (ids, weights) = route(&[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[0.0; 8], &c);
        assert_eq!(ids, vec![1]);
        assert!((weights[0] - 2.0 / (1.0 + (-3f32).exp())).abs() < 1e-6);
    }

    /// A NaN ranks above every number whatever its sign or payload (the host's arithmetic and a
    /// GPU's give NaNs of different signs), in a logit, and in a bias that makes a group's
    /// score NaN.
    #[test]
    fn a_nan_ranks_the_same_whatever_its_sign() {
        let negative_nan = f32::from_bits(0xffc0_0000);
        let payload_nan = f32::from_bits(0x7f80_0001);
        for (n_group, topk_group) in [(1, 1), (4, 2)] {
            let c = cfg(n_group, topk_group, 2);
            let logits = [0.5, 2.0, -1.0, 0.0, 1.0, 3.0, -2.0, 0.25];
            for nan in [f32::NAN, negative_nan, payload_nan] {
                let mut with_nan = logits;
                with_nan[6] = nan;
                let (ids, weights) = route(&with_nan, &[0.0; 8], &c);
                // Expert 6's NaN outranks expert 5's 3.0, the best number.
                assert_eq!(ids, vec![5, 6], "NaN {:#x}", nan.to_bits());
                assert!(weights[1].is_nan());
                // The NaN in a bias instead: expert 6 still chosen, its weight a number.
                let mut bias = [0.0; 8];
                bias[6] = nan;
                let (ids, weights) = route(&logits, &bias, &c);
                assert_eq!(ids, vec![5, 6], "NaN bias {:#x}", nan.to_bits());
                assert!(weights.iter().all(|w| w.is_finite()));
            }
            // Biases of +inf and -inf in experts 2 and 3 (group 1 of four): expert 2 ranks
            // first; with groups, only if its group's score, inf + -inf, a NaN (negative on
            // x86), ranks the group first.
            let mut bias = [0.0; 8];
            bias[2] = f32::INFINITY;
            bias[3] = f32::NEG_INFINITY;
            let (ids, _) = route(&logits, &bias, &c);
            assert_eq!(ids, vec![2, 5], "{n_group} groups: inf - inf");
        }
    }
}
