//! Balanced expert placement from measured per-expert loads, in the manner of DeepSeek's EPLB:
//! give redundant slots to the hottest experts (splitting their load between copies), then
//! pack the copies onto GPUs heaviest first, each onto the least loaded GPU with a free slot.
//! With several nodes and evenly divisible counts the balancing is hierarchical: experts are
//! first packed onto nodes (so an expert's copies stay inside one node and its traffic does
//! not cross the inter-node network), then replicated and packed within each node; otherwise
//! it is global.

use std::collections::BTreeMap;

use serde::Deserialize;
use sparsemoe_api::PlacementPlan;
use sparsemoe_api::placement::{GpuAssignment, PLAN_VERSION, PlanError};

/// Why a placement cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("expert loads: {0}")]
    Loads(String),
}

/// Loads of one layer; `None` as the layer means every layer.
pub type LayerLoads = (Option<u32>, Vec<f64>);

/// The `--loads` file: one list of per-expert loads (used for every layer), a list of lists
/// (one per decoder layer, layer index = position, an empty list for a dense layer: the
/// engine's `sparsemoe_expert_tokens_total{layer}` numbering), or
/// `{"layers": {"3": [...], ...}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LoadsFile {
    Single(Vec<f64>),
    PerLayer(Vec<Vec<f64>>),
    Keyed { layers: BTreeMap<String, Vec<f64>> },
}

impl LoadsFile {
    /// Loads per layer; `None` as the key means "every layer".
    pub fn into_layers(self) -> Result<Vec<LayerLoads>, PlacementError> {
        Ok(match self {
            LoadsFile::Single(loads) => vec![(None, loads)],
            LoadsFile::PerLayer(layers) => layers
                .into_iter()
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(i, l)| (Some(i as u32), l))
                .collect(),
            LoadsFile::Keyed { layers } => {
                let mut seen = std::collections::BTreeSet::new();
                layers
                    .into_iter()
                    .map(|(k, l)| {
                        // Plain digits only, so no two keys ("3", "03", "+3") name one layer.
                        let layer = Some(&k)
                            .filter(|k| k.bytes().all(|b| b.is_ascii_digit()))
                            .filter(|k| k.len() == 1 || !k.starts_with('0'))
                            .and_then(|k| k.parse::<u32>().ok())
                            .ok_or_else(|| {
                                PlacementError::Loads(format!(
                                    "layer key {k:?} is not a layer index such as \"3\""
                                ))
                            })?;
                        if !seen.insert(layer) {
                            return Err(PlacementError::Loads(format!(
                                "layer {layer} is listed twice"
                            )));
                        }
                        Ok((Some(layer), l))
                    })
                    .collect::<Result<_, PlacementError>>()?
            }
        })
    }
}

/// A plan from a loads file: a single list becomes the default assignment; per-layer loads
/// give each layer its own assignment, and the default is planned from their sum.
pub fn plan_from_file(
    file: LoadsFile,
    gpus: u32,
    nodes: u32,
    redundant: u32,
) -> Result<PlacementPlan, PlacementError> {
    let layers = file.into_layers()?;
    let Some(experts) = layers.first().map(|(_, l)| l.len()) else {
        return Err(PlacementError::Loads("the file lists no layers".into()));
    };
    if let Some((layer, l)) = layers.iter().find(|(_, l)| l.len() != experts) {
        return Err(PlacementError::Loads(format!(
            "layer {} has {} experts, the first layer has {experts}; every layer needs the same number",
            layer.unwrap_or(0),
            l.len()
        )));
    }
    for (layer, loads) in &layers {
        check_loads(loads).map_err(|why| match layer {
            Some(layer) => PlacementError::Loads(format!("layer {layer}: {why}")),
            None => PlacementError::Loads(why),
        })?;
    }
    let mut total = vec![0.0; experts];
    for (_, loads) in &layers {
        for (t, l) in total.iter_mut().zip(loads) {
            *t += l;
        }
    }
    if total.iter().any(|t| !t.is_finite()) {
        return Err(PlacementError::Loads(
            "the layers' loads add up past the largest number; scale them down".into(),
        ));
    }
    let mut plan = plan_experts(&total, gpus, nodes, redundant)?;
    if layers.iter().any(|(k, _)| k.is_some()) {
        let mut worst = f64::INFINITY;
        for (layer, loads) in layers {
            let layer_plan = plan_experts(&loads, gpus, nodes, redundant)?;
            worst = worst.min(layer_plan.balancedness.unwrap_or(1.0));
            plan.layers.insert(layer.unwrap_or(0), layer_plan.default);
        }
        plan.balancedness = Some(worst);
    }
    plan.validate()?;
    Ok(plan)
}

/// The most experts a plan places (the CRD's `numExperts` limit).
const MAX_EXPERTS: u32 = 4096;
/// The most redundant slots a plan has (the CRD's `redundantExperts` limit).
const MAX_REDUNDANT: u32 = 1024;

/// Every load finite and not negative.
fn check_loads(loads: &[f64]) -> Result<(), String> {
    match loads
        .iter()
        .enumerate()
        .find(|(_, l)| !l.is_finite() || **l < 0.0)
    {
        Some((e, l)) => Err(format!(
            "expert {e} has load {l}; loads must be finite and not negative"
        )),
        None => Ok(()),
    }
}

/// Places `loads.len()` experts plus `redundant` copies on `gpus` GPUs over `nodes` nodes.
pub fn plan_experts(
    loads: &[f64],
    gpus: u32,
    nodes: u32,
    redundant: u32,
) -> Result<PlacementPlan, PlacementError> {
    check_loads(loads).map_err(PlacementError::Loads)?;
    // Within the CRD's limits (numExperts, redundantExperts), which also bound the planner's
    // work (a round per redundant slot over the experts).
    if loads.len() > MAX_EXPERTS as usize {
        return Err(PlacementError::Loads(format!(
            "{} experts; at most {MAX_EXPERTS}",
            loads.len()
        )));
    }
    if redundant > MAX_REDUNDANT {
        return Err(PlacementError::Loads(format!(
            "{redundant} redundant slots; at most {MAX_REDUNDANT}"
        )));
    }
    let experts = loads.len() as u32;
    let infeasible = |why| PlanError::Infeasible {
        experts,
        gpus,
        redundant,
        why,
    };
    for (value, name) in [
        (experts, "numExperts"),
        (gpus, "numGpus"),
        (nodes, "numNodes"),
    ] {
        if value == 0 {
            return Err(PlanError::Zero(name).into());
        }
    }
    if !gpus.is_multiple_of(nodes) {
        return Err(PlanError::NodesDoNotDivideGpus { gpus, nodes }.into());
    }
    if !(experts + redundant).is_multiple_of(gpus) {
        return Err(infeasible("numExperts + redundant must be a multiple of numGpus").into());
    }
    let slots = (experts + redundant) / gpus;
    if u64::from(redundant) > u64::from(experts) * u64::from(gpus - 1) {
        return Err(
            infeasible("more redundant slots than experts can have copies (one per GPU)").into(),
        );
    }

    let hierarchical =
        nodes > 1 && experts.is_multiple_of(nodes) && redundant.is_multiple_of(nodes);
    // Hierarchical when it can be done; otherwise (e.g. one GPU per node cannot hold copies
    // inside its node) global.
    let assignment = hierarchical
        .then(|| place_hierarchically(loads, gpus, nodes, redundant, slots))
        .flatten()
        .or_else(|| place_globally(loads, gpus, redundant, slots))
        .ok_or_else(|| infeasible("no packing without duplicate copies on a GPU"))?;

    let mut plan = PlacementPlan {
        version: PLAN_VERSION,
        num_experts: experts,
        num_gpus: gpus,
        num_nodes: nodes,
        default: GpuAssignment { gpus: assignment },
        layers: BTreeMap::new(),
        balancedness: None,
    };
    plan.balancedness = Some(balancedness(&plan.default, loads));
    plan.validate()?;
    Ok(plan)
}

/// Experts onto nodes (each once, balanced by load), then each node replicated and packed on
/// its own GPUs, so no expert's copies cross nodes.
fn place_hierarchically(
    loads: &[f64],
    gpus: u32,
    nodes: u32,
    redundant: u32,
    slots: u32,
) -> Option<Vec<Vec<u32>>> {
    let experts = loads.len() as u32;
    let items: Vec<(u32, f64)> = (0..experts).map(|e| (e, loads[e as usize])).collect();
    let per_node = pack(items, nodes, experts / nodes)?;
    let mut all = Vec::with_capacity(gpus as usize);
    for node_experts in per_node {
        let local_loads: Vec<f64> = node_experts.iter().map(|&e| loads[e as usize]).collect();
        let local = place_globally(&local_loads, gpus / nodes, redundant / nodes, slots)?;
        all.extend(local.into_iter().map(|gpu| {
            gpu.into_iter()
                .map(|i| node_experts[i as usize])
                .collect::<Vec<u32>>()
        }));
    }
    Some(all)
}

/// Mean over max GPU load when each expert's load is split evenly between its copies.
pub fn balancedness(assignment: &GpuAssignment, loads: &[f64]) -> f64 {
    let mut copies = vec![0u32; loads.len()];
    for gpu in &assignment.gpus {
        for &e in gpu {
            copies[e as usize] += 1;
        }
    }
    let gpu_loads: Vec<f64> = assignment
        .gpus
        .iter()
        .map(|gpu| {
            gpu.iter()
                .map(|&e| loads[e as usize] / f64::from(copies[e as usize].max(1)))
                .sum()
        })
        .collect();
    let max = gpu_loads.iter().cloned().fold(0.0, f64::max);
    if max <= 0.0 {
        return 1.0;
    }
    gpu_loads.iter().sum::<f64>() / gpu_loads.len() as f64 / max
}

/// Replicates the hottest experts into `redundant` extra slots and packs every copy onto
/// `gpus` GPUs of `slots` slots. Returns local expert indices per GPU.
fn place_globally(loads: &[f64], gpus: u32, redundant: u32, slots: u32) -> Option<Vec<Vec<u32>>> {
    let mut copies = vec![1u32; loads.len()];
    for _ in 0..redundant {
        // The expert whose copies carry the most load each gets one more (lowest index on ties).
        let (hottest, _) = copies
            .iter()
            .enumerate()
            .filter(|(_, c)| **c < gpus)
            .map(|(e, c)| (e, loads[e] / f64::from(*c)))
            .fold(None, |best: Option<(usize, f64)>, (e, l)| match best {
                Some((_, bl)) if bl >= l => best,
                _ => Some((e, l)),
            })?;
        copies[hottest] += 1;
    }
    let items = copies
        .iter()
        .enumerate()
        .flat_map(|(e, &c)| (0..c).map(move |_| (e as u32, loads[e] / f64::from(c))))
        .collect();
    pack(items, gpus, slots)
}

/// Packs weighted items into `bins` bins of `slots` each, heaviest first onto the lightest bin
/// with room that does not already hold the same item. `None` if no such packing was found.
fn pack(mut items: Vec<(u32, f64)>, bins: u32, slots: u32) -> Option<Vec<Vec<u32>>> {
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Each bin's items with their weights, and its total.
    let mut content: Vec<Vec<(u32, f64)>> = vec![Vec::with_capacity(slots as usize); bins as usize];
    let mut weight = vec![0.0f64; bins as usize];
    let holds = |bin: &[(u32, f64)], item: u32| bin.iter().any(|&(x, _)| x == item);
    for (item, w) in items {
        let best = (0..bins as usize)
            .filter(|&b| content[b].len() < slots as usize && !holds(&content[b], item))
            .min_by(|&a, &b| weight[a].total_cmp(&weight[b]).then(a.cmp(&b)));
        let target = match best {
            Some(b) => b,
            None => {
                // Every bin with room already holds this item: move some other item from a
                // bin without it into a bin with room, then place this one where that was.
                let open = (0..bins as usize).find(|&b| content[b].len() < slots as usize)?;
                let (donor, pos) = (0..bins as usize)
                    .filter(|&b| !holds(&content[b], item))
                    .find_map(|b| {
                        content[b]
                            .iter()
                            .position(|&(x, _)| !holds(&content[open], x))
                            .map(|p| (b, p))
                    })?;
                let moved = content[donor].remove(pos);
                weight[donor] -= moved.1;
                weight[open] += moved.1;
                content[open].push(moved);
                donor
            }
        };
        content[target].push((item, w));
        weight[target] += w;
    }
    Some(
        content
            .into_iter()
            .map(|bin| {
                let mut ids: Vec<u32> = bin.into_iter().map(|(x, _)| x).collect();
                ids.sort_unstable();
                ids
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu_loads(plan: &PlacementPlan, loads: &[f64]) -> Vec<f64> {
        let a = &plan.default;
        let mut copies = vec![0.0; loads.len()];
        a.gpus
            .iter()
            .flatten()
            .for_each(|&e| copies[e as usize] += 1.0);
        a.gpus
            .iter()
            .map(|g| {
                g.iter()
                    .map(|&e| loads[e as usize] / copies[e as usize])
                    .sum()
            })
            .collect()
    }

    #[test]
    fn uniform_loads_spread_evenly_and_validate() {
        let plan = plan_experts(&[1.0; 256], 8, 1, 32).unwrap();
        assert_eq!(plan.default.gpus.len(), 8);
        assert!(plan.default.gpus.iter().all(|g| g.len() == 36));
        assert!(plan.balancedness.unwrap() > 0.99, "{:?}", plan.balancedness);
        // Deterministic: the same input gives the same plan.
        assert_eq!(
            plan.hash(),
            plan_experts(&[1.0; 256], 8, 1, 32).unwrap().hash()
        );
    }

    #[test]
    fn hot_experts_get_the_redundant_copies_and_balance_improves() {
        let mut loads = vec![1.0; 16];
        loads[3] = 20.0;
        loads[9] = 10.0;
        let plain = plan_experts(&loads, 4, 1, 0).unwrap();
        let plan = plan_experts(&loads, 4, 1, 4).unwrap();
        assert!(plan.replicas_of(0, 3).len() >= 2, "{:?}", plan.default);
        assert!(plan.replicas_of(0, 9).len() >= 2, "{:?}", plan.default);
        assert!(plan.balancedness.unwrap() > plain.balancedness.unwrap());
        let gl = gpu_loads(&plan, &loads);
        let mean = gl.iter().sum::<f64>() / 4.0;
        assert!(
            (plan.balancedness.unwrap() - mean / gl.iter().cloned().fold(0.0, f64::max)).abs()
                < 1e-9
        );
    }

    #[test]
    fn hierarchical_keeps_copies_inside_a_node() {
        let loads: Vec<f64> = (0..32).map(|e| 1.0 + (e % 7) as f64 * 3.0).collect();
        let plan = plan_experts(&loads, 8, 2, 8).unwrap();
        for e in 0..32 {
            let nodes: std::collections::BTreeSet<u32> =
                plan.replicas_of(0, e).into_iter().map(|g| g / 4).collect();
            assert_eq!(
                nodes.len(),
                1,
                "expert {e} crosses nodes: {:?}",
                plan.default
            );
        }
        assert!(plan.balancedness.unwrap() > 0.9, "{:?}", plan.balancedness);
    }

    #[test]
    fn infeasible_and_bad_inputs_are_errors_not_panics() {
        let err = plan_experts(&[1.0; 10], 4, 1, 0).unwrap_err().to_string();
        assert!(err.contains("multiple of numGpus"), "{err}");
        assert!(
            plan_experts(&[1.0; 4], 3, 2, 2)
                .unwrap_err()
                .to_string()
                .contains("not a multiple")
        );
        assert!(plan_experts(&[], 4, 1, 0).is_err());
        assert!(plan_experts(&[1.0, f64::NAN], 2, 1, 0).is_err());
        assert!(plan_experts(&[1.0, -1.0], 2, 1, 0).is_err());
        assert!(plan_experts(&[1.0; 2], 0, 1, 0).is_err());
        // Two experts cannot fill 8 slots on 2 GPUs without duplicating on one GPU.
        assert!(plan_experts(&[1.0; 2], 2, 1, 6).is_err());
        // One GPU per node cannot hold a copy inside its node: falls back to global placement.
        let plan = plan_experts(&[1.0, 5.0, 1.0, 1.0], 2, 2, 2).unwrap();
        assert_eq!(plan.replicas_of(0, 1).len(), 2);
    }

    #[test]
    fn per_layer_files_give_per_layer_assignments() {
        let file: LoadsFile = serde_json::from_str("[[1,1,1,9],[9,1,1,1]]").unwrap();
        let plan = plan_from_file(file, 2, 1, 2).unwrap();
        assert_eq!(plan.layers.len(), 2);
        assert_eq!(plan.replicas_of(0, 3).len(), 2);
        assert_eq!(plan.replicas_of(1, 0).len(), 2);
        // Positions are decoder layers: the dense layers before the first MoE one are empty
        // lists, and the plans go to the layers the engine numbers so.
        let file: LoadsFile = serde_json::from_str("[[],[],[1,1,1,9],[9,1,1,1]]").unwrap();
        let plan = plan_from_file(file, 2, 1, 2).unwrap();
        assert_eq!(plan.layers.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(plan.replicas_of(2, 3).len(), 2);
        assert_eq!(plan.replicas_of(3, 0).len(), 2);
        let none: LoadsFile = serde_json::from_str("[[],[]]").unwrap();
        assert!(plan_from_file(none, 2, 1, 0).is_err());
        let keyed: LoadsFile =
            serde_json::from_str(r#"{"layers": {"3": [1, 2], "4": [2, 1]}}"#).unwrap();
        assert_eq!(
            plan_from_file(keyed, 2, 1, 0)
                .unwrap()
                .layers
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        let ragged: LoadsFile = serde_json::from_str("[[1,1],[1,1,1]]").unwrap();
        assert!(plan_from_file(ragged, 2, 1, 0).is_err());
    }

    /// Bad loads files and arguments are refused, naming the problem, never a panic or an
    /// endless plan: two keys for one layer, a key that is not plain digits, layers whose sum
    /// overflows, a bad value in one layer, and sizes past the CRD's limits (which once
    /// overflowed `experts + redundant`).
    #[test]
    fn bad_loads_and_sizes_are_refused_by_name() {
        let refused = |json: &str, gpus, redundant| {
            let file: LoadsFile = serde_json::from_str(json).unwrap();
            plan_from_file(file, gpus, 1, redundant)
                .unwrap_err()
                .to_string()
        };
        let cases = [
            (r#"{"layers": {"3": [1, 9], "+3": [9, 1]}}"#, 2, 0, "\"+3\""),
            (r#"{"layers": {"3": [1, 9], "03": [9, 1]}}"#, 2, 0, "\"03\""),
            (r#"{"layers": {"x": [1, 9]}}"#, 2, 0, "not a layer index"),
            ("[[1e308, 1], [1e308, 1]]", 2, 0, "add up"),
            ("[[1, 1], [1, -2]]", 2, 0, "layer 1: expert 1 has load -2"),
            ("[1]", 1, u32::MAX, "at most 1024"),
        ];
        for (json, gpus, redundant, words) in cases {
            let err = refused(json, gpus, redundant);
            assert!(err.contains(words), "{json}: {err}");
        }
        let many = serde_json::to_string(&vec![1.0; 5000]).unwrap();
        assert!(refused(&many, 8, 0).contains("at most 4096"));
    }
}
