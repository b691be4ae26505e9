//! Host work of one MoE layer's routing in a CUDA decode step (an example of the engine crate):
//! the host path against what the device path leaves the host, in one run:
//!
//! ```sh
//! cargo run --release -p sparsemoe-engine --example host_routing -- --out bench/results/host-routing.md
//! ```
//!
//! A batch of `--rows` rows routed among `--experts` experts (`--groups` groups, `--keep` of
//! them kept, top `--top-k`), DeepSeek-V3's rule by default:
//! - host path (float32 experts, traces, longer chunks; expert shards before `dfc930a`; every layer before
//!   `477fd15`, and bf16 experts' before `caca1f0`): each row's router logits through `moe::route`, the choices counted in
//!   `ExpertLoad`, the pairs grouped by expert (`by_expert`), the rows, weights and each row's
//!   pairs (`pairs_by_row`) as the int32 and float32 lists the kernels read. Not counted: the
//!   copy of the logits to the host, which waits for the stream, and the lists' copy back.
//!   Twice: with `route` as it is (the top k selected), and as it was (`moe::route_by_sorting`:
//!   every expert sorted, and its weights not even computed, to its advantage).
//! - device path (fp8 or bf16 experts, at most `in_place_rows` rows): the host only builds
//!   the layer's table of expert addresses (`--experts` × 6 values for fp8, as timed; 3 for
//!   bf16) and finds its copy, kept by
//!   content (`Cuda::expert_tables` with `uploads::Tables`, replayed here with the same
//!   `HashMap<Vec<u64>, _>` lookup).
//!
//! - device path by counts (bf16 experts past `in_place_rows`: a prefill chunk's; before this
//!   row, the host path): the host gets each expert's row offsets back (`--experts` + 1
//!   values, their copy not counted), lists the experts with rows, and builds the three
//!   grouped products' pointer arrays (weights, inputs, outputs) as `Cuda::cublas_grouped`
//!   does.
//!
//! - with `--shards` expert shards (an even plan, `ExpertShards::balanced`): the host path
//!   routes as above, deals the pairs (`ExpertShards::dispatch`) and makes each shard's lists
//!   (`compact_rows`, `by_expert`), as `Cuda::moe_experts_sharded` does before its copies; the
//!   device path builds each shard's table (`ExpertShards::shard_table`, packed two values to a
//!   u64, after the addresses of the experts it holds) and finds its copy by content, as
//!   `Cuda::shard_tables` does.
//!
//! Neither side counts its kernel launches (seven on the device path, about as many on the host
//! path's grouped products). Each variant runs `--reps` times, alternating; medians and their
//! ratio are reported. Host time only: no device is involved.

use std::collections::HashMap;
use std::time::Instant;

use clap::Parser;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparsemoe_engine::backend::{Routing, by_expert, experts_with_rows, pairs_by_row};
use sparsemoe_engine::expert_load::ExpertLoad;
use sparsemoe_engine::expert_shards::{ExpertShards, compact_rows};
use sparsemoe_engine::moe::{RouterConfig, route, route_by_sorting};

#[path = "support.rs"]
mod support;
use support::{machine, median};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 64)]
    rows: usize,
    #[arg(long, default_value_t = 256)]
    experts: usize,
    #[arg(long, default_value_t = 8)]
    groups: usize,
    #[arg(long, default_value_t = 4)]
    keep: usize,
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    /// Expert shards for the sharded rows (GPUs of a replica).
    #[arg(long, default_value_t = 8)]
    shards: usize,
    /// MoE layers in a step, for the per-step line (DeepSeek-V3/V3.2: 58).
    #[arg(long, default_value_t = 58)]
    layers: usize,
    #[arg(long, default_value_t = 200)]
    reps: usize,
    /// Markdown table to write (printed either way).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let e = args.experts;
    anyhow::ensure!(
        args.rows > 0 && args.reps > 0 && e > 0 && args.groups > 0 && e % args.groups == 0,
        "--rows, --reps and --experts must be above 0, and --experts a multiple of --groups"
    );
    anyhow::ensure!(
        (1..=args.groups).contains(&args.keep)
            && args.top_k >= 1
            && args.top_k <= args.keep * (e / args.groups),
        "--keep must be 1..=--groups, and --top-k at most the kept groups' experts"
    );
    let router = RouterConfig {
        n_experts: e,
        top_k: args.top_k,
        n_group: args.groups,
        topk_group: args.keep,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let logits: Vec<f32> = (0..args.rows * e)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let bias: Vec<f32> = (0..e).map(|_| rng.random_range(-0.1..0.1)).collect();
    let load = ExpertLoad::new(&[e]);
    // Each expert's gate, up and down codes and scales: distinct addresses, as device
    // pointers look.
    let address = |i: usize| 0x7f00_0000_0000 + i as u64 * 0x10_0000;
    let codes: Vec<u64> = (0..3 * e).map(address).collect();
    let scales: Vec<u64> = (3 * e..6 * e).map(address).collect();
    let mut tables: HashMap<Vec<u64>, usize> = HashMap::new();

    let host = |sorting: bool| {
        let mut routing = Routing::default();
        for row in logits.chunks(e) {
            let (ids, weights) = if sorting {
                (
                    route_by_sorting(row, &bias, &router),
                    vec![1.0; router.top_k],
                )
            } else {
                route(row, &bias, &router)
            };
            load.record(0, &ids);
            routing.experts.push(ids);
            routing.weights.push(weights);
        }
        let groups = by_expert(routing.pairs(), e);
        let rows: Vec<i32> = groups
            .iter()
            .flat_map(|(_, r)| r.iter().map(|p| p.0 as i32))
            .collect();
        let weights: Vec<f32> = groups
            .iter()
            .flat_map(|(_, r)| r.iter().map(|p| p.1))
            .collect();
        let row_of: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
        let (offsets, pairs) = pairs_by_row(&row_of, args.rows);
        let offsets: Vec<i32> = offsets.into_iter().map(|x| x as i32).collect();
        let pairs: Vec<i32> = pairs.into_iter().map(|x| x as i32).collect();
        (rows.len() + weights.len() + offsets.len() + pairs.len()) as u64
    };
    let mut device = || {
        // As Cuda::expert_tables: each expert's six addresses, then the kept copy by content.
        let mut table = vec![0u64; 6 * e];
        for i in 0..e {
            for w in 0..3 {
                table[w * e + i] = codes[3 * i + w];
                table[(3 + w) * e + i] = scales[3 * i + w];
            }
        }
        let next = tables.len();
        *tables.entry(table).or_insert(next) as u64
    };

    // The expert offsets moe_expert_slots leaves on the device, as the host gets them back.
    let counted = {
        let mut counts = vec![0i32; e];
        for row in logits.chunks(e) {
            for id in route(row, &bias, &router).0 {
                counts[id] += 1;
            }
        }
        std::iter::once(0)
            .chain(counts.iter().scan(0, |at, &c| {
                *at += c;
                Some(*at)
            }))
            .collect::<Vec<i32>>()
    };
    let (hidden, inter) = (7168u64, 2048u64);
    let by_counts = || {
        // As Cuda::routed_products and Cuda::cublas_grouped: the experts with rows, their
        // weights' addresses, and each product's pointers (weights, inputs, outputs).
        let active = experts_with_rows(&counted);
        let sizes: Vec<i32> = active.iter().map(|a| a.2 as i32).collect();
        let weights: [Vec<u64>; 3] =
            [0, 1, 2].map(|w| active.iter().map(|a| codes[3 * a.0 + w]).collect());
        let at = |base: u64, width: u64| -> Vec<u64> {
            active
                .iter()
                .map(|a| base + a.1 as u64 * width * 2)
                .collect()
        };
        let (x, gate, up, act, y) = (address(0), address(1), address(2), address(3), address(4));
        let products = [
            [&weights[0], &at(x, hidden), &at(gate, inter)],
            [&weights[1], &at(x, hidden), &at(up, inter)],
            [&weights[2], &at(act, inter), &at(y, hidden)],
        ];
        let pointers: Vec<u64> = products.into_iter().flatten().flatten().copied().collect();
        (pointers.len() + sizes.len()) as u64
    };

    let shards = ExpertShards::balanced(args.shards, e)?;
    let route_all = || {
        let mut routing = Routing::default();
        for row in logits.chunks(e) {
            let (ids, weights) = route(row, &bias, &router);
            load.record(0, &ids);
            routing.experts.push(ids);
            routing.weights.push(weights);
        }
        routing
    };
    let host_sharded = || {
        let work = shards.dispatch(0, &route_all());
        let mut values = 0;
        for pairs in work.iter().filter(|p| !p.is_empty()) {
            let (rows, local) = compact_rows(pairs, args.rows);
            let groups = by_expert(local.into_iter(), e);
            let rows: Vec<i32> = rows.into_iter().map(|r| r as i32).collect();
            values += rows.len() + groups.iter().map(|(_, r)| r.len()).sum::<usize>();
        }
        values as u64
    };
    let mut shard_tables: HashMap<Vec<u64>, usize> = HashMap::new();
    let mut device_sharded = || {
        let mut found = 0;
        for s in 0..args.shards {
            let (held, dispatch) = shards.shard_table(0, s);
            let mut table = vec![0u64; 6 * held.len()];
            for (j, &i) in held.iter().enumerate() {
                for w in 0..3 {
                    table[w * held.len() + j] = codes[3 * i + w];
                    table[(3 + w) * held.len() + j] = scales[3 * i + w];
                }
            }
            table.extend(dispatch.chunks(2).map(|two| {
                let high = two.get(1).map_or(0, |&v| v as u32);
                u64::from(two[0] as u32) | (u64::from(high) << 32)
            }));
            let next = shard_tables.len();
            found += *shard_tables.entry(table).or_insert(next);
        }
        found as u64
    };

    let (mut sorted, mut selected, mut on_device) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sharded_host, mut sharded_device, mut counted_ms) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut sink = 0u64;
    for _ in 0..args.reps {
        let t = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(host(true)));
        sorted.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(host(false)));
        selected.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(device()));
        on_device.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(by_counts()));
        counted_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(host_sharded()));
        sharded_host.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(device_sharded()));
        sharded_device.push(t.elapsed().as_secs_f64() * 1e3);
    }
    std::hint::black_box(sink);
    let (sorted_ms, host_ms, device_ms) = (median(sorted), median(selected), median(on_device));
    let (sharded_host_ms, sharded_device_ms) = (median(sharded_host), median(sharded_device));
    let by_counts_ms = median(counted_ms);

    let (model, cpus) = machine();
    let table = format!(
        "# Host work of a MoE layer's routing in a CUDA step\n\n\
         `cargo run --release -p sparsemoe-engine --example host_routing` (`bench/host_routing.rs`) \
         on {model}, {cpus} CPUs: {rows} rows, {e} experts in {groups} groups ({keep} kept), top \
         {k}; median of {reps} runs each, alternating. Host time only: neither side's kernel \
         launches, nor the host path's copies (the logits to the host, which waits for the \
         stream, and its lists back), are counted.\n\n\
         | path | host time a layer (ms) | a step of {layers} MoE layers (ms) | vs the host path now |\n|---|---|---|---|\n\
         | host routing before (`moe::route_by_sorting`: every expert sorted), the lists | {sorted_ms:.4} | {ss:.2} | {sr:.2}x |\n\
         | host routing now (`moe::route`: the top k selected), `ExpertLoad::record`, the lists | {host_ms:.4} | {hs:.2} | 1 |\n\
         | routing on the device (the address table found by content) | {device_ms:.4} | {ds:.2} | {dr:.3}x |\n\
         | routing on the device, bf16 experts by counts (the offsets back, cuBLAS's pointer arrays) | {by_counts_ms:.4} | {cs:.2} | {cr:.3}x |\n\
         | {shards} expert shards, host routing, `ExpertShards::dispatch` and each shard's lists | {sharded_host_ms:.4} | {shs:.2} | {shr:.2}x |\n\
         | {shards} expert shards, routing on the device (each shard's table found by content) | {sharded_device_ms:.4} | {sds:.2} | {sdr:.3}x |\n\n\
         The third and last rows are all a layer routed on the device leaves the host, without \
         and with expert shards (fp8 or bf16 experts, at most `in_place_rows` rows; timed with \
         fp8's tables, twice bf16's; the sharded rows with an even plan over {shards} shards, \
         whose lists the host path makes before its copies to each shard). The fourth is what \
         bf16 experts past `in_place_rows` leave it: their expert offsets come back to size \
         cuBLAS's grouped products ({hidden} to {inter} wide), a copy that waits for the routing \
         (not counted, like the host path's copy of the logits, which waits as long). The larger \
         saving is not in this table: the host path copies each layer's logits to the host, \
         which waits for all the work queued before it, so the GPU idles while the host routes; \
         only a GPU can time that. A server CPU is faster than \
         this one; the ratios are what carry over.\n",
        rows = args.rows,
        groups = args.groups,
        keep = args.keep,
        k = args.top_k,
        reps = args.reps,
        layers = args.layers,
        ss = sorted_ms * args.layers as f64,
        hs = host_ms * args.layers as f64,
        ds = device_ms * args.layers as f64,
        sr = sorted_ms / host_ms,
        cs = by_counts_ms * args.layers as f64,
        cr = by_counts_ms / host_ms,
        dr = device_ms / host_ms,
        shards = args.shards,
        shs = sharded_host_ms * args.layers as f64,
        sds = sharded_device_ms * args.layers as f64,
        shr = sharded_host_ms / host_ms,
        sdr = sharded_device_ms / host_ms,
    );
    print!("{table}");
    if let Some(out) = args.out {
        std::fs::write(&out, &table)?;
    }
    Ok(())
}
