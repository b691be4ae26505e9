//! Expert parallelism: the routed experts of every MoE layer are spread over shards (the GPUs of
//! a replica with the CUDA backend; tasks on the worker pool with the CPU backend) as a
//! [`PlacementPlan`] says. Each (token, expert) pair of a step goes to one shard holding a copy
//! of that expert; when a hot expert has redundant copies, its pairs are dealt to them in turn,
//! starting at a copy that moves with the expert and the layer, so the copies share its load
//! (and the first pairs of different experts do not all land on their first copies). The shards' outputs are then combined per token with the
//! router's weights. The rule is simple enough for a GPU to follow on its own (the CUDA backend's
//! `moe_shard_pairs`), so the host can count each shard's pairs from the experts' counts alone
//! ([`ExpertShards::count_routed`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use sparsemoe_api::placement::{GpuAssignment, PlacementPlan};

use crate::backend::Routing;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// One (token row, routed expert, routing weight) pair a shard computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub row: usize,
    pub expert: usize,
    pub weight: f32,
}

/// The shards and, per MoE layer, which shards hold each expert.
#[derive(Debug)]
pub struct ExpertShards {
    plan: PlacementPlan,
    /// `holders[e]`: the shards holding expert `e`, for the plan's default assignment and for
    /// each layer with its own.
    default_holders: Vec<Vec<usize>>,
    layer_holders: std::collections::BTreeMap<u32, Vec<Vec<usize>>>,
    /// Tokens (pairs) each shard has computed since start, for metrics and tests.
    computed: Vec<AtomicU64>,
}

impl ExpertShards {
    /// Checks `plan` against a model with `num_experts` routed experts per layer.
    pub fn new(plan: PlacementPlan, num_experts: usize) -> Result<Self> {
        plan.validate()
            .map_err(|e| EngineError::input(e.to_string()))?;
        if plan.num_experts as usize != num_experts {
            return Err(EngineError::input(format!(
                "placement plan: numExperts is {} but the model has {num_experts} routed experts \
                 per layer (n_routed_experts)",
                plan.num_experts
            )));
        }
        let computed = (0..plan.num_gpus).map(|_| AtomicU64::new(0)).collect();
        let holders = |a: &GpuAssignment| {
            let mut holders = vec![Vec::new(); num_experts];
            for (shard, experts) in a.gpus.iter().enumerate() {
                for &e in experts {
                    holders[e as usize].push(shard);
                }
            }
            holders
        };
        Ok(Self {
            default_holders: holders(&plan.default),
            layer_holders: plan.layers.iter().map(|(&l, a)| (l, holders(a))).collect(),
            plan,
            computed,
        })
    }

    /// A plan with `shards` shards and no redundant copies (experts dealt out evenly).
    pub fn balanced(shards: usize, num_experts: usize) -> Result<Self> {
        let (Ok(shards_u32), Ok(experts_u32)) = (u32::try_from(shards), u32::try_from(num_experts))
        else {
            return Err(EngineError::input("expert shards: count out of range"));
        };
        if shards == 0 || !num_experts.is_multiple_of(shards) {
            return Err(EngineError::input(format!(
                "expert shards: {shards} shards cannot hold {num_experts} experts evenly; use a \
                 count that divides n_routed_experts, or a placement plan (--placement)"
            )));
        }
        let plan = PlacementPlan::balanced(experts_u32, shards_u32, 1)
            .map_err(|e| EngineError::input(e.to_string()))?;
        Self::new(plan, num_experts)
    }

    /// The `--expert-shards N` / `--placement FILE` options for `config`'s model: `None` when
    /// both are absent (and `devices` is one device); with several devices and neither option,
    /// an even split over them. A plan file must parse, validate and agree with N, and with
    /// several devices the shard count must equal theirs (shard `s` runs on device `s`).
    pub fn from_options(
        config: &ModelConfig,
        shards: Option<usize>,
        placement: Option<&Path>,
        devices: usize,
    ) -> Result<Option<Self>> {
        let plan = match placement {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    EngineError::input(format!("placement plan {}: {e}", path.display()))
                })?;
                let plan = PlacementPlan::from_json(&text)
                    .map_err(|e| EngineError::input(format!("{}: {e}", path.display())))?;
                if let Some(n) = shards.filter(|&n| n != plan.num_gpus as usize) {
                    return Err(EngineError::input(format!(
                        "--expert-shards {n} disagrees with {}, which places experts on {} shards",
                        path.display(),
                        plan.num_gpus
                    )));
                }
                Some(plan)
            }
        };
        if plan.is_none() && shards.is_none() && devices <= 1 {
            return Ok(None);
        }
        if config.n_routed_experts == 0 || !config.moe_layers.iter().any(|&m| m) {
            return Err(EngineError::input(
                "expert shards: this model has no routed experts to shard (several devices \
                 per engine split only the routed experts)",
            ));
        }
        let shards = match plan {
            Some(plan) => Self::new(plan, config.n_routed_experts)?,
            None => Self::balanced(shards.unwrap_or(devices), config.n_routed_experts)?,
        };
        if devices > 1 && shards.shards() != devices {
            return Err(EngineError::input(format!(
                "expert shards: {} shards on {devices} devices; with several devices each \
                 shard runs on one of them, so give as many shards as devices",
                shards.shards()
            )));
        }
        Ok(Some(shards))
    }

    pub fn plan(&self) -> &PlacementPlan {
        &self.plan
    }

    pub fn shards(&self) -> usize {
        self.plan.num_gpus as usize
    }

    /// The shards holding routed expert `expert` of decoder layer `layer` (one unless the plan
    /// gives it redundant copies).
    pub fn holders(&self, layer: usize, expert: usize) -> &[usize] {
        self.holders_of(layer)[expert].as_slice()
    }

    fn holders_of(&self, layer: usize) -> &[Vec<usize>] {
        u32::try_from(layer)
            .ok()
            .and_then(|l| self.layer_holders.get(&l))
            .unwrap_or(&self.default_holders)
    }

    /// Pairs computed by each shard since start.
    pub fn computed(&self) -> Vec<u64> {
        self.computed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Splits one step's routing for decoder layer `layer` into per-shard work. Every pair goes
    /// to exactly one shard that holds its expert: an expert's pairs, in row order, are dealt to
    /// its copies in turn, the `r`-th to `holders(layer, expert)[(r + expert + layer) % copies]`,
    /// so copies share an expert's load evenly, and an expert with a single pair in a step
    /// does not always load its first copy.
    ///
    /// Routed expert ids are below the model's expert count, which equals the plan's, and a
    /// validated plan places every expert on some shard, so every pair has a shard.
    pub fn dispatch(&self, layer: usize, routing: &Routing) -> Vec<Vec<Pair>> {
        let holders = self.holders_of(layer);
        let mut work: Vec<Vec<Pair>> = vec![Vec::new(); self.shards()];
        let mut dealt = vec![0usize; holders.len()];
        for (row, (ids, weights)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            for (&expert, &weight) in ids.iter().zip(weights) {
                let copies = &holders[expert];
                let shard = copies[(dealt[expert] + expert + layer) % copies.len()];
                dealt[expert] += 1;
                work[shard].push(Pair {
                    row,
                    expert,
                    weight,
                });
            }
        }
        for (shard, pairs) in work.iter().enumerate() {
            self.computed[shard].fetch_add(pairs.len() as u64, Ordering::Relaxed);
        }
        work
    }

    /// Counts, for the shards' totals ([`ExpertShards::computed`]), the pairs of decoder layer
    /// `layer` that a backend dispatched on its own by [`ExpertShards::dispatch`]'s rule, from
    /// how many pairs each expert had (`counts[e]`, as the step's expert load has them).
    pub fn count_routed(&self, layer: usize, counts: &[f32]) {
        for (expert, (copies, &count)) in self.holders_of(layer).iter().zip(counts).enumerate() {
            let pairs = count as usize;
            let n = copies.len();
            for (i, &shard) in copies.iter().enumerate() {
                // The ranks r < pairs with (r + expert + layer) % n == i: those with r % n == j.
                let j = (i + n - (expert + layer) % n) % n;
                let dealt = (pairs + n - 1 - j) / n;
                self.computed[shard].fetch_add(dealt as u64, Ordering::Relaxed);
            }
        }
    }

    /// The routed experts shard `shard` holds for decoder layer `layer`, in the order it
    /// numbers them, and the table `moe_shard_pairs` reads to deal it its pairs: three arrays of
    /// one value an expert of the layer: the shard's number for the expert (-1 where it holds
    /// no copy), the ranks `r % copies` of the expert's pairs that are the shard's (its copy's
    /// place among the holders, less `expert + layer`, modulo the copies: [`Self::dispatch`]'s
    /// rule), and how many copies there are.
    pub fn shard_table(&self, layer: usize, shard: usize) -> (Vec<usize>, Vec<i32>) {
        let holders = self.holders_of(layer);
        let e = holders.len();
        let mut held = Vec::new();
        let mut table = vec![-1i32; 3 * e];
        for (expert, copies) in holders.iter().enumerate() {
            if let Some(copy) = copies.iter().position(|&s| s == shard) {
                let n = copies.len();
                table[expert] = held.len() as i32;
                table[e + expert] = ((copy + n - (expert + layer) % n) % n) as i32;
                held.push(expert);
            }
            table[2 * e + expert] = copies.len() as i32;
        }
        (held, table)
    }
}

/// The distinct rows `pairs` name (of a batch of `batch_rows`), in order of first mention, and
/// the pairs with each row renumbered as its place in that list: what a shard on another device
/// needs of the batch, and its pairs against the rows it was sent. Every pair's row must be
/// below `batch_rows`.
pub fn compact_rows(pairs: &[Pair], batch_rows: usize) -> (Vec<usize>, Vec<Pair>) {
    let mut local = vec![usize::MAX; batch_rows];
    let mut rows = Vec::new();
    let renumbered = pairs
        .iter()
        .map(|p| {
            if local[p.row] == usize::MAX {
                local[p.row] = rows.len();
                rows.push(p.row);
            }
            Pair {
                row: local[p.row],
                ..*p
            }
        })
        .collect();
    (rows, renumbered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(pairs: &[&[(usize, f32)]]) -> Routing {
        Routing {
            experts: pairs
                .iter()
                .map(|p| p.iter().map(|x| x.0).collect())
                .collect(),
            weights: pairs
                .iter()
                .map(|p| p.iter().map(|x| x.1).collect())
                .collect(),
        }
    }

    #[test]
    fn every_pair_goes_to_exactly_one_shard_holding_its_expert() {
        let shards = ExpertShards::balanced(4, 8).unwrap();
        let r = routing(&[
            &[(0, 0.5), (7, 0.5)],
            &[(3, 1.0), (4, 0.25)],
            &[(7, 0.1), (1, 0.9)],
        ]);
        let work = shards.dispatch(1, &r);
        let mut seen: Vec<(usize, usize)> = Vec::new();
        for (shard, pairs) in work.iter().enumerate() {
            for p in pairs {
                assert!(shards.plan().assignment(1).gpus[shard].contains(&(p.expert as u32)));
                seen.push((p.row, p.expert));
            }
        }
        seen.sort();
        assert_eq!(seen, vec![(0, 0), (0, 7), (1, 3), (1, 4), (2, 1), (2, 7)]);
        assert_eq!(shards.computed().iter().sum::<u64>(), 6);
    }

    #[test]
    fn redundant_copies_of_a_hot_expert_share_its_tokens() {
        // Expert 0 has copies on shards 0 and 1; every token picks it.
        let plan = PlacementPlan {
            version: sparsemoe_api::placement::PLAN_VERSION,
            num_experts: 4,
            num_gpus: 2,
            num_nodes: 1,
            default: GpuAssignment {
                gpus: vec![vec![0, 1, 2], vec![0, 3, 1]],
            },
            layers: Default::default(),
            balancedness: None,
        };
        let shards = ExpertShards::new(plan, 4).unwrap();
        let rows: Vec<&[(usize, f32)]> = vec![&[(0, 1.0)]; 9];
        let work = shards.dispatch(0, &routing(&rows));
        assert_eq!((work[0].len(), work[1].len()), (5, 4));
    }

    #[test]
    fn counts_per_expert_give_each_shards_dispatched_pairs() {
        // Expert 0 on shards 0, 1 and 2; expert 1 on 0 and 1; expert 2 on 0 and 2; expert 3
        // on 1 and 2.
        let plan = PlacementPlan {
            version: sparsemoe_api::placement::PLAN_VERSION,
            num_experts: 4,
            num_gpus: 3,
            num_nodes: 1,
            default: GpuAssignment {
                gpus: vec![vec![0, 2, 1], vec![0, 1, 3], vec![0, 2, 3]],
            },
            layers: Default::default(),
            balancedness: None,
        };
        let dispatched = ExpertShards::new(plan.clone(), 4).unwrap();
        let counted = ExpertShards::new(plan, 4).unwrap();
        // 11 rows of two experts each, in a mix that leaves the copies uneven.
        let rows: Vec<Vec<(usize, f32)>> = (0..11)
            .map(|r| vec![(0, 0.5), ([1, 2, 3, 2][r % 4], 0.5)])
            .collect();
        let rows: Vec<&[(usize, f32)]> = rows.iter().map(|r| r.as_slice()).collect();
        let work = dispatched.dispatch(0, &routing(&rows));
        // Layer 0: expert e's r-th pair goes to its copy (r + e) % copies. Expert 0's 11 pairs go
        // to shards 0, 1, 2, 0, 1, …: shard 0 gets rows 0, 3, 6, 9.
        let rows_of = |shard: usize, expert: usize| -> Vec<usize> {
            work[shard]
                .iter()
                .filter(|p| p.expert == expert)
                .map(|p| p.row)
                .collect()
        };
        assert_eq!(rows_of(0, 0), vec![0, 3, 6, 9]);
        assert_eq!(rows_of(2, 0), vec![2, 5, 8]);
        // Expert 2's pairs (rows 1, 3, 5, 7, 9) alternate between its copies on shards 0 and 2;
        // expert 3's (rows 2, 6, 10) between shards 1 and 2, starting at its second copy.
        assert_eq!(rows_of(0, 2), vec![1, 5, 9]);
        assert_eq!(rows_of(2, 2), vec![3, 7]);
        assert_eq!(rows_of(2, 3), vec![2, 10]);
        assert_eq!(rows_of(1, 3), vec![6]);
        let mut counts = vec![0f32; 4];
        for row in &rows {
            for &(e, _) in *row {
                counts[e] += 1.0;
            }
        }
        counted.count_routed(0, &counts);
        assert_eq!(counted.computed(), dispatched.computed());
        assert_eq!(dispatched.computed().iter().sum::<u64>(), 22);

        let (held, table) = counted.shard_table(0, 2);
        assert_eq!(held, vec![0, 2, 3]);
        assert_eq!(table, vec![0, -1, 1, 2, 2, -1, 1, 0, 3, 2, 2, 2]);

        // Layer 1 moves every start by one copy, and the counts follow.
        let work = dispatched.dispatch(1, &routing(&rows));
        counted.count_routed(1, &counts);
        assert_eq!(counted.computed(), dispatched.computed());
        let layer_1: Vec<usize> = work[0]
            .iter()
            .filter(|p| p.expert == 0)
            .map(|p| p.row)
            .collect();
        assert_eq!(layer_1, vec![2, 5, 8]);
    }

    #[test]
    fn a_shard_is_sent_each_row_it_needs_once() {
        let shards = ExpertShards::balanced(2, 8).unwrap();
        let rows: [&[(usize, f32)]; 5] = [
            &[(6, 0.5), (7, 0.5)],
            &[(0, 0.7), (5, 0.3)],
            &[(4, 1.0), (1, 0.2)],
            &[(2, 0.1), (3, 0.9)],
            &[(5, 0.4), (6, 0.6)],
        ];
        let work = shards.dispatch(1, &routing(&rows));
        for pairs in &work {
            let (sent, local) = compact_rows(pairs, rows.len());
            let mut distinct = sent.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), sent.len(), "a row sent twice: {sent:?}");
            assert_eq!(local.len(), pairs.len());
            for (p, l) in pairs.iter().zip(&local) {
                assert_eq!(sent[l.row], p.row);
                assert_eq!((l.expert, l.weight), (p.expert, p.weight));
            }
        }
        // Shard 1 holds experts 4..8: rows 0, 1, 2 and 4 need it, row 3 does not.
        assert_eq!(compact_rows(&work[1], rows.len()).0, vec![0, 1, 2, 4]);
        assert_eq!(compact_rows(&[], 3), (vec![], vec![]));
    }

    #[test]
    fn plans_that_do_not_fit_the_model_are_clear_errors() {
        let e = ExpertShards::balanced(3, 8).unwrap_err().to_string();
        assert!(e.contains("3 shards cannot hold 8 experts"), "{e}");
        let plan = PlacementPlan::balanced(16, 2, 1).unwrap();
        let e = ExpertShards::new(plan, 8).unwrap_err().to_string();
        assert!(
            e.contains("numExperts is 16") && e.contains("8 routed experts"),
            "{e}"
        );
    }
}
