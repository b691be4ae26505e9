//! The CUDA backend against the CPU reference, and its start-up path.
//!
//! The GPU tests need a CUDA device; without one they print that they skipped and why, and
//! with `SPARSEMOE_REQUIRE_GPU=1` (kernels/gpu-check.sh sets it) they fail instead. The NVRTC
//! test compiles the backend's kernels with no GPU at all; it needs libnvrtc (the pinned wheel
//! that kernels/nvcc-env.sh puts on LD_LIBRARY_PATH) and fails without it when `CI` is set.

use std::path::Path;

use sparsemoe_engine::backend::Backend;
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::backend::cuda::{Cuda, compile_kernels};
use sparsemoe_engine::kv_cache::SeqCache;
use sparsemoe_engine::model::{AttentionMode, LogitRows, Model, ModelOptions, SeqStep};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Device 0, or `None` (with the reason printed) when this machine has none.
fn gpu(test: &str) -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(cuda) => Some(cuda),
        Err(e) if std::env::var_os("SPARSEMOE_REQUIRE_GPU").is_some() => {
            panic!("{test}: SPARSEMOE_REQUIRE_GPU is set but cuda:0 did not open: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped (needs a CUDA GPU): {e}");
            None
        }
    }
}

/// Relative L2 distance of `got` from `want`.
fn rel_l2(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in want.iter().zip(got) {
        num += f64::from(a - b).powi(2);
        den += f64::from(a).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn nvrtc_compiles_the_engine_kernels() {
    match compile_kernels() {
        Ok(modules) => {
            assert_eq!(modules.len(), sparsemoe_kernels::ENGINE_SOURCES.len());
            for (file, ptx) in modules {
                let text = ptx.to_src();
                assert!(
                    text.contains(".entry"),
                    "{file}: no kernel entry in the PTX"
                );
            }
        }
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set and the engine's kernels did not compile: {e}")
        }
        Err(e) => eprintln!("nvrtc_compiles_the_engine_kernels: skipped: {e}"),
    }
}

/// Logits at every position of a prompt, on the GPU and on the CPU, for every fixture model
/// (MoE, dense, tied embeddings, YaRN, fused experts, top-1 and short top-k indexers) in
/// sparse and dense attention.
#[test]
fn every_fixture_model_matches_the_cpu_backend() {
    let Some(cuda) = gpu("every_fixture_model_matches_the_cpu_backend") else {
        return;
    };
    let models = [
        "v32_sparse_moe",
        "v32_dense_tied_sharded",
        "v32_edge_topk1",
        "v32_fused_experts",
        "v32_long_yarn",
        "v32_bf16_legacy_config",
        "v3_moe_yarn",
    ];
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    for name in models {
        for attention in [AttentionMode::Sparse, AttentionMode::Dense] {
            let options = ModelOptions {
                attention,
                // A short top-k, so the indexer selects among the prompt's 40 keys.
                index_topk: Some(8),
                ..ModelOptions::default()
            };
            let cpu = Model::load(&fixture(name), Cpu, options).unwrap();
            let gpu = Model::load(&fixture(name), cuda.clone(), options).unwrap();
            let want = cpu.logits(&tokens, None).unwrap();
            let got = gpu.logits(&tokens, None).unwrap();
            let err = rel_l2(&want, &got);
            eprintln!("{name} {attention:?}: relative L2 {err:.2e}");
            assert!(err < 1e-4, "{name} {attention:?}: relative L2 {err:.2e}");
        }
    }
}

/// Chunked prefill and decode steps of two sequences through a paged pool (scattered blocks,
/// written and gathered on the device), against the CPU backend doing the same.
#[test]
fn paged_batches_match_the_cpu_backend() {
    let Some(cuda) = gpu("paged_batches_match_the_cpu_backend") else {
        return;
    };
    let dir = fixture("v32_sparse_moe");
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let cpu = Model::load(&dir, Cpu, options).unwrap();
    let gpu = Model::load(&dir, cuda, options).unwrap();
    let want = paged_run(&cpu);
    let got = paged_run(&gpu);
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let err = rel_l2(w, g);
        assert!(err < 1e-4, "output {i}: relative L2 {err:.2e}");
    }
}

/// Two sequences through a pool of 16 blocks of 4 rows, scattered and interleaved: the first in
/// prefill chunks of 7 and then single tokens (every row's logits), the second a token a step
/// alongside (its last row's logits).
fn paged_run<B: Backend>(model: &Model<B>) -> Vec<Vec<f32>> {
    let a: Vec<u32> = (0..23).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let b: Vec<u32> = (0..19).map(|i| (i * 11 % 250 + 2) as u32).collect();
    let pool = model.new_paged_pool(4, 16);
    let mut first = SeqCache::paged(pool.clone());
    let mut second = SeqCache::paged(pool);
    first.set_blocks(&[9, 2, 14, 5, 0, 11]);
    second.set_blocks(&[3, 8, 1, 13, 6]);
    let mut logits = Vec::new();
    let mut at = 0;
    while at < a.len() {
        let n = if at < 14 { 7 } else { 1 };
        let mut steps = [
            SeqStep {
                tokens: &a[at..at + n],
                cache: &mut first,
                logits: LogitRows::All,
            },
            SeqStep {
                tokens: &b[at.min(b.len() - 1)..(at + 1).min(b.len())],
                cache: &mut second,
                logits: LogitRows::Last,
            },
        ];
        logits.extend(model.forward(&mut steps, None).unwrap());
        at += n;
    }
    logits
}
