//! Helpers the engine's test files share: fixture copies, safetensors editing, DeepSeek fp8
//! checkpoints, a placement plan. Each test file uses some of them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sparsemoe_api::placement::{GpuAssignment, PLAN_VERSION, PlacementPlan};
use sparsemoe_engine::weights::fp8_e4m3_to_f32;

/// Every fixture model: MoE, dense, tied embeddings, YaRN, fused experts, top-1 and short
/// top-k indexers, a bf16 checkpoint with a legacy config, and V3 (no indexer).
pub const FIXTURE_MODELS: [&str; 7] = [
    "v32_sparse_moe",
    "v32_dense_tied_sharded",
    "v32_edge_topk1",
    "v32_fused_experts",
    "v32_long_yarn",
    "v32_bf16_legacy_config",
    "v3_moe_yarn",
];

/// Relative L2 distance of `got` from `want`.
pub fn rel_l2(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in want.iter().zip(got) {
        num += f64::from(a - b).powi(2);
        den += f64::from(a).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// The relative L2 error of each `vocab`-wide row of `got` from `want`, smallest first.
pub fn sorted_row_errors(want: &[f32], got: &[f32], vocab: usize) -> Vec<f64> {
    let mut rows: Vec<f64> = want
        .chunks(vocab)
        .zip(got.chunks(vocab))
        .map(|(w, g)| rel_l2(w, g))
        .collect();
    rows.sort_by(f64::total_cmp);
    rows
}

/// Fixture model `name`: under `SPARSEMOE_FIXTURES` when set (a test binary run away from
/// the tree it was built in, as kernels/gpu-check.sh runs the CUDA tests on the GPU machine),
/// else under this crate's tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("SPARSEMOE_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    }
}

/// A copy of a fixture's config and weights in a temporary directory.
pub fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

/// A safetensors file's tensors: name → (dtype, shape, little-endian bytes).
pub type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

pub fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, view)| {
            (
                name.to_string(),
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect()
}

pub fn write_tensors(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Nearest fp8 e4m3 code of `x` (brute force over the 254 finite codes).
fn to_fp8(x: f32) -> u8 {
    (0u8..=255)
        .filter(|&q| !fp8_e4m3_to_f32(q).is_nan())
        .min_by(|&a, &b| {
            (fp8_e4m3_to_f32(a) - x)
                .abs()
                .total_cmp(&(fp8_e4m3_to_f32(b) - x).abs())
        })
        .unwrap()
}

/// Two copies of fixture `name` (float32 weights): one in DeepSeek's fp8 format (every
/// projection weight as e4m3 with one f32 `weight_scale_inv` per 128×128 block), and one whose
/// projection weights hold the values those fp8 weights stand for, stored as `store` writes
/// them (a dtype and its bytes).
pub fn fp8_and_dequantised(
    name: &str,
    store: impl Fn(&[f32]) -> (Dtype, Vec<u8>),
) -> (tempfile::TempDir, tempfile::TempDir) {
    let fp8 = copy_of(name);
    let dequantised = copy_of(name);
    let mut fp8_tensors = read_tensors(&fp8.path().join("model.safetensors"));
    let mut plain_tensors = fp8_tensors.clone();
    let names: Vec<String> = fp8_tensors
        .iter()
        .filter(|(name, (_, shape, _))| {
            let projection = name.ends_with("proj.weight")
                || name.ends_with("wq_b.weight")
                || name.ends_with("wk.weight");
            projection && shape.len() == 2 && !shape.contains(&0)
        })
        .map(|(name, _)| name.clone())
        .collect();
    assert!(names.len() > 10);
    for name in &names {
        let (dtype, shape, data) = fp8_tensors[name].clone();
        assert_eq!(
            dtype,
            Dtype::F32,
            "{name}: the fixture's weights are float32"
        );
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (rows, cols) = (shape[0], shape[1]);
        let (brows, bcols) = (rows.div_ceil(128), cols.div_ceil(128));
        let block = |i: usize| (i / cols / 128) * bcols + (i % cols) / 128;
        let mut scales = vec![0f32; brows * bcols];
        for (i, v) in values.iter().enumerate() {
            scales[block(i)] = scales[block(i)].max(v.abs() / 448.0);
        }
        let codes: Vec<u8> = values
            .iter()
            .enumerate()
            .map(|(i, v)| to_fp8(v / scales[block(i)]))
            .collect();
        let restored: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &q)| fp8_e4m3_to_f32(q) * scales[block(i)])
            .collect();
        let (plain_dtype, plain_bytes) = store(&restored);
        *plain_tensors.get_mut(name).unwrap() = (plain_dtype, shape.clone(), plain_bytes);
        fp8_tensors.insert(name.clone(), (Dtype::F8_E4M3, shape, codes));
        let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        fp8_tensors.insert(
            format!("{name}_scale_inv"),
            (Dtype::F32, vec![brows, bcols], scale_bytes),
        );
    }
    write_tensors(&fp8.path().join("model.safetensors"), &fp8_tensors);
    write_tensors(
        &dequantised.path().join("model.safetensors"),
        &plain_tensors,
    );
    (fp8, dequantised)
}

/// Writes, into `dir`, a plan for the 8 routed experts of `v32_sparse_moe` on 3 shards of 4
/// slots: experts 0-7 once each, and redundant copies of 0, 1, 2 and 3 on other shards.
/// Returns its path.
pub fn write_redundant_plan(dir: &Path) -> PathBuf {
    let plan = PlacementPlan {
        version: PLAN_VERSION,
        num_experts: 8,
        num_gpus: 3,
        num_nodes: 1,
        default: GpuAssignment {
            gpus: vec![vec![0, 1, 2, 3], vec![4, 5, 0, 1], vec![6, 7, 2, 3]],
        },
        layers: Default::default(),
        balancedness: None,
    };
    let file = dir.join("redundant-placement.json");
    std::fs::write(&file, plan.to_canonical_json()).unwrap();
    file
}
