//! The CUDA backend against the CPU reference, and its start-up path.
//!
//! The GPU tests need a CUDA device; without one they print that they skipped and why, and
//! with `SPARSEMOE_REQUIRE_GPU=1` (kernels/gpu-check.sh sets it) they fail instead. The NVRTC
//! test compiles the backend's kernels with no GPU at all; it needs libnvrtc (the pinned wheel
//! that kernels/nvcc-env.sh puts on LD_LIBRARY_PATH) and fails without it when `CI` is set.

mod support;

use std::path::Path;
use std::sync::Arc;

use sparsemoe_engine::backend::cpu::{Cpu, fp8_round_rows};
use sparsemoe_engine::backend::cuda::kernel_cache::KernelCache;
use sparsemoe_engine::backend::cuda::{
    CompiledKernels, Cuda, CudaTensor, Dtype, GraphCounts, KernelTarget, compile_kernels,
    compile_kernels_with,
};
use sparsemoe_engine::backend::{
    AttentionForm, Backend, BlockId, CachedRows, IndexerSeq, MlaDims, MlaSeq, MlaWeights,
    Selection, absorbed_query_weight,
};
use sparsemoe_engine::config::ModelConfig;
use sparsemoe_engine::expert_shards::ExpertShards;
use sparsemoe_engine::kv_cache::{KvDtype, PagedRows, SeqCache};
use sparsemoe_engine::model::{AttentionMode, LogitRows, Model, ModelOptions, SeqStep};
use sparsemoe_engine::weights::{Matrix, StoredType};
use sparsemoe_kernels::launch;
use support::{FIXTURE_MODELS, fixture, rel_l2, sorted_row_errors};

/// Device 0, or `None` (with the reason printed) when this machine has none.
fn gpu(test: &str) -> Option<Cuda> {
    gpus(test, &[0], Dtype::Float32)
}

/// The backend on GPUs `ordinals`, or `None` (with the reason printed) when they do not open.
fn gpus(test: &str, ordinals: &[usize], dtype: Dtype) -> Option<Cuda> {
    match Cuda::new(ordinals, dtype) {
        Ok(cuda) => {
            // Says whether this ran on a GPU or on the CPU emulator (kernels/emu).
            eprintln!("{test}: on {}", cuda.name());
            Some(cuda)
        }
        Err(e) if std::env::var_os("SPARSEMOE_REQUIRE_GPU").is_some() => {
            panic!("{test}: SPARSEMOE_REQUIRE_GPU is set but {ordinals:?} did not open: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped (needs a CUDA GPU): {e}");
            None
        }
    }
}

/// Two backends on device 0 with `dtype` weights: one running the routed experts as grouped
/// products (the default), one expert by expert; `None` (with the reason printed) without one.
fn grouped_and_one_by_one(test: &str, dtype: Dtype) -> Option<(Cuda, Cuda)> {
    let grouped = gpus(test, &[0], dtype)?;
    let one_by_one = gpus(test, &[0], dtype).unwrap();
    one_by_one.experts_one_by_one();
    Some((grouped, one_by_one))
}

/// The logits of fixture model `name` at every position of a 40-token prompt, on the CPU and on
/// `cuda`, with a short indexer top-k (8, so it selects among the prompt's keys), and the vocab.
fn logits_on_both(
    cuda: &Cuda,
    name: &str,
    attention: AttentionMode,
) -> (Vec<f32>, Vec<f32>, usize) {
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let options = ModelOptions {
        attention,
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let cpu = Model::load(&fixture(name), Cpu, options.clone()).unwrap();
    let gpu = Model::load(&fixture(name), cuda.clone(), options).unwrap();
    let want = cpu.logits(&tokens, None).unwrap();
    (
        want,
        gpu.logits(&tokens, None).unwrap(),
        cpu.config.vocab_size,
    )
}

/// The kernels NVRTC compiled, or `None` (with the reason printed) where it could not: a
/// failure when `CI` is set.
fn compiled<E: std::fmt::Display>(
    test: &str,
    result: Result<Vec<CompiledKernels>, E>,
) -> Option<Vec<CompiledKernels>> {
    match result {
        Ok(modules) => Some(modules),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set and the engine's kernels did not compile: {e}")
        }
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

/// NVRTC compiles the engine's kernels for the device's architecture, not its own default
/// (CUDA 13's is below sm_80, where the bf16 `mma.sync` of the tensor-core kernels would not
/// load): machine code (an ELF) for sm_90 and sm_80, from PTX that targets them, and PTX alone
/// for compute_90. For 90 the fp8 indexer's products are `mma.sync` e4m3; for 80 the codes are
/// widened to bf16 instead.
/// (Through the kernel cache where it has these kernels already, as the engine would: NVRTC
/// wrote them from the same source, options and NVRTC version; CI starts with an empty one.)
#[test]
fn nvrtc_compiles_the_engine_kernels() {
    let targets = [
        (KernelTarget::Sm(90), true),
        (KernelTarget::Sm(80), false),
        (KernelTarget::Compute(90), true),
    ];
    for (target, fp8_mma) in targets {
        let Some(modules) = compiled("nvrtc_compiles_the_engine_kernels", compile_kernels(target))
        else {
            return;
        };
        assert_eq!(modules.len(), sparsemoe_kernels::ENGINE_SOURCES.len());
        for kernels in &modules {
            let file = kernels.file;
            assert!(
                kernels.ptx.contains(".entry"),
                "{file}: no kernel entry in the PTX"
            );
            assert!(
                kernels
                    .ptx
                    .contains(&format!(".target sm_{}", target.arch())),
                "{file}: the PTX does not target sm_{}",
                target.arch()
            );
            match (target, &kernels.cubin) {
                (KernelTarget::Sm(_), Some(cubin)) => {
                    assert!(
                        cubin.starts_with(b"\x7fELF"),
                        "{file}: the machine code is no ELF"
                    )
                }
                (KernelTarget::Compute(_), None) => {}
                (_, cubin) => panic!("{file} for {target}: machine code {:?}", cubin.is_some()),
            }
        }
        let engine = &modules
            .iter()
            .find(|kernels| kernels.file == "engine.cu")
            .expect("engine.cu compiled")
            .ptx;
        assert!(engine.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        assert_eq!(
            engine.contains("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"),
            fp8_mma,
            "{target}: fp8 tensor-core products"
        );
    }
}

/// The kernel cache on disk: a start with an empty cache compiles each source file and keeps
/// it; the next takes every file from the cache, the same PTX byte for byte.
/// A damaged entry (a flipped byte) is compiled again and rewritten, and the others are still
/// read from the cache. PTX for compute_90: the shorter compile (the GPU check runs this too),
/// and the cache's machine code is the unit tests' (`kernel_cache`).
#[test]
fn compiled_kernels_are_kept_on_disk_for_the_next_start() {
    let target = KernelTarget::Compute(90);
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::at(dir.path().join("kernels"));
    let test = "compiled_kernels_are_kept_on_disk_for_the_next_start";
    let Some(first) = compiled(test, compile_kernels_with(target, Some(&cache))) else {
        return;
    };
    assert!(first.iter().all(|k| !k.cached), "an empty cache: {first:?}");
    let entries = || std::fs::read_dir(cache.dir()).unwrap().count();
    assert_eq!(entries(), sparsemoe_kernels::ENGINE_SOURCES.len());

    let second = compile_kernels_with(target, Some(&cache)).unwrap();
    for (a, b) in first.iter().zip(&second) {
        assert!(b.cached, "{}: not from the cache", b.file);
        assert_eq!((a.file, &a.ptx, &a.cubin), (b.file, &b.ptx, &b.cubin));
    }

    // Damage topk.cu's entry (its compile is the short one).
    let topk = std::fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("topk-compute_90-")
        })
        .expect("topk.cu's entry");
    let mut bytes = std::fs::read(&topk).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&topk, &bytes).unwrap();
    let third = compile_kernels_with(target, Some(&cache)).unwrap();
    for (a, c) in first.iter().zip(&third) {
        assert_eq!(c.cached, c.file != "topk.cu", "{}", c.file);
        assert_eq!((&a.ptx, &a.cubin), (&c.ptx, &c.cubin), "{}", c.file);
    }
    let fourth = compile_kernels_with(target, Some(&cache)).unwrap();
    assert!(fourth.iter().all(|k| k.cached), "rewritten: {fourth:?}");
    assert_eq!(entries(), sparsemoe_kernels::ENGINE_SOURCES.len());
}

/// Each GPU's memory pool keeps what the engine frees (release threshold: all of it), so that
/// a step does not map again what the last one freed; the memory the engine reports available
/// trims the pool first (not compared here: the tests beside this one allocate and free at the
/// same time).
#[test]
fn freed_device_memory_stays_with_the_pool() {
    use cudarc::driver::sys;
    let Some(cuda) = gpu("freed_device_memory_stays_with_the_pool") else {
        return;
    };
    let mut device = 0;
    let mut pool = std::ptr::null_mut();
    let mut threshold = 0u64;
    // SAFETY: each call writes the value it is asked for.
    unsafe {
        sys::cuDeviceGet(&mut device, 0).result().unwrap();
        sys::cuDeviceGetDefaultMemPool(&mut pool, device)
            .result()
            .unwrap();
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .unwrap();
    }
    assert_eq!(threshold, u64::MAX);
    drop(cuda.tensor(1024, 1024, vec![1.0; 1024 * 1024]));
    assert!(cuda.device_memory_available().is_some_and(|free| free > 0));
}

/// Logits at every position of a prompt, on the GPU and on the CPU, for every fixture model
/// (MoE, dense, tied embeddings, YaRN, fused experts, top-1 and short top-k indexers) in
/// sparse and dense attention.
#[test]
fn every_fixture_model_matches_the_cpu_backend() {
    let Some(cuda) = gpu("every_fixture_model_matches_the_cpu_backend") else {
        return;
    };
    for name in FIXTURE_MODELS {
        for attention in [AttentionMode::Sparse, AttentionMode::Dense] {
            let (want, got, _) = logits_on_both(&cuda, name, attention);
            let err = rel_l2(&want, &got);
            eprintln!("{name} {attention:?}: relative L2 {err:.2e}");
            assert!(err < 1e-4, "{name} {attention:?}: relative L2 {err:.2e}");
        }
    }
}

/// Chunked prefill and decode steps of two sequences through a paged pool (scattered blocks,
/// written and gathered on the device), against the CPU backend doing the same, with the pool
/// in float32, bf16 and fp8. The narrow pools' bounds are looser: where the two backends'
/// float32 rows differ in the last bit, a value can round to a neighbouring bf16 or e4m3 code.
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
    let cpu = Model::load(&dir, Cpu, options.clone()).unwrap();
    let gpu = Model::load(&dir, cuda.clone(), options).unwrap();
    // fp8: a last-bit difference can move a value to the next e4m3 code (1/8 of it), rarely.
    for (dtype, bound) in [
        (KvDtype::Float32, 1e-4),
        (KvDtype::Bfloat16, 1e-3),
        (KvDtype::Fp8, 1e-2),
        (KvDtype::Fp8Ue8m0, 1e-2),
    ] {
        let want = paged_run(&cpu, dtype);
        let launches = cuda.indexer_launches();
        let got = paged_run(&gpu, dtype);
        // The indexer (top-k 8) runs for the first sequence from its second step (14 tokens)
        // on, 10 steps, and for the second in the last 3 (9 to 11 tokens): one launch a layer
        // for both sequences together, not 13 a layer one sequence at a time.
        assert_eq!(
            cuda.indexer_launches() - launches,
            10 * gpu.config.num_layers as u64,
            "{dtype:?}"
        );
        assert_eq!(want.len(), got.len());
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let err = rel_l2(w, g);
            assert!(err < bound, "{dtype:?} output {i}: relative L2 {err:.2e}");
        }
    }
}

/// A batch of sequences in one paged pool, which the CUDA backend reads in place, is one
/// attention call and one launch a layer, however small `attended_bytes` (the budget of rows
/// gathered at once: none are gathered here), and gives the CPU backend's logits.
#[test]
fn a_paged_batch_is_one_attention_launch_a_layer() {
    let Some(cuda) = gpu("a_paged_batch_is_one_attention_launch_a_layer") else {
        return;
    };
    let dir = fixture("v32_sparse_moe");
    let options = ModelOptions {
        attention: AttentionMode::Dense,
        attended_bytes: 1,
        ..ModelOptions::default()
    };
    let cpu = Model::load(&dir, Cpu, options.clone()).unwrap();
    let gpu = Model::load(&dir, cuda.clone(), options).unwrap();
    // Dense attention: no indexer, so every tensor-core launch is an attention launch.
    cuda.attention_on_tensor_cores(true);
    let want = paged_run(&cpu, KvDtype::Bfloat16);
    let launches = cuda.tensor_core_launches();
    let got = paged_run(&gpu, KvDtype::Bfloat16);
    // paged_run's 11 steps (2 of 7 tokens, 9 of 1) each batch both sequences.
    assert_eq!(
        cuda.tensor_core_launches() - launches,
        11 * gpu.config.num_layers as u64
    );
    let mut worst: f64 = 0.0;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let err = rel_l2(w, g);
        assert!(err < 5e-3, "output {i}: relative L2 {err:.2e}");
        worst = worst.max(err);
    }
    eprintln!("a paged batch on the tensor cores: worst output's relative L2 {worst:.2e}");
}

/// bf16 weights with tensor-core products, against the float32 CPU backend. Rounding the
/// products' inputs to bf16 moves every logit a little and flips some discrete choices (an
/// expert, a key at the edge of the indexer's top-k), which moves that row a lot; so the bounds
/// are on the median row and, in dense attention (expert flips only), on the share of rows
/// within 3e-2. `tests/fixtures/bf16_error_model.py` measured the same rounding in float64 on
/// these models and tokens (with the routed experts' grouped products writing bf16, as cuBLAS's
/// do; `bf16_grouped_tc`, which these 40-token prompts get, writes float32, less rounding):
/// median row error 4.0e-3 to 8.2e-3, and in dense attention at least 97.5% of rows
/// within 3e-2; the bounds give that a 2× margin. The model does not round attention or the
/// indexer, which with bf16 weights run on the tensor cores (queries, keys and probabilities in
/// bf16): with them the CPU emulator measures medians of 4.6e-3 to 8.7e-3, still within the
/// bound (sparse attention flips more keys at the edge of the top-k: as few as 62.5% of a
/// model's rows within 3e-2). The experts run both ways: grouped, and one product per expert
/// (float32 outputs, less rounding).
#[test]
fn bf16_weights_stay_within_bf16_rounding_of_the_cpu_backend() {
    let test = "bf16_weights_stay_within_bf16_rounding_of_the_cpu_backend";
    let Some((grouped, one_by_one)) = grouped_and_one_by_one(test, Dtype::Bfloat16) else {
        return;
    };
    for (cuda, experts) in [(&grouped, "grouped"), (&one_by_one, "one by one")] {
        for name in FIXTURE_MODELS {
            for attention in [AttentionMode::Dense, AttentionMode::Sparse] {
                let (want, got, vocab) = logits_on_both(cuda, name, attention);
                let rows = sorted_row_errors(&want, &got, vocab);
                let median = rows[rows.len() / 2];
                let within = rows.iter().filter(|&&e| e < 3e-2).count() as f64 / rows.len() as f64;
                eprintln!(
                    "{name} {attention:?} bf16, experts {experts}: median row {median:.2e}, \
                     {:.1}% of rows within 3e-2, worst {:.2e}",
                    within * 100.0,
                    rows[rows.len() - 1]
                );
                assert!(
                    median < 1.65e-2,
                    "{name} {attention:?}, experts {experts}: median row error {median:.2e}"
                );
                if attention == AttentionMode::Dense {
                    assert!(
                        within >= 0.9,
                        "{name}, experts {experts}: only {:.1}% of rows within 3e-2",
                        within * 100.0
                    );
                }
            }
        }
    }
    assert!(
        grouped.experts_grouped() && grouped.grouped_expert_layers() > 0,
        "the bf16 experts never ran grouped (refused by cuBLAS? see the log)"
    );
    // With bf16 weights attention and the indexer run on the tensor cores too (the fixtures'
    // widths fit).
    assert!(grouped.tensor_core_launches() > 0);
    assert_eq!(one_by_one.grouped_expert_layers(), 0);
}

/// The routed experts as grouped products (the default) and one product per expert give the
/// same logits, and cuBLAS accepts the grouped call. Float32 experts: cuBLAS's grouped products,
/// the same products summed in the same order (cuBLAS may tile them differently, hence a
/// float32-rounding bound, not equality). bf16 experts (one by one, each product of this
/// 40-token prompt a `bf16_linear_tc` launch: x rounded to bf16, float32 sums and outputs):
/// while no expert has more rows than `in_place_rows` (all of this prompt's), the grouped
/// products are `bf16_grouped_tc`'s, the same block over the same rows, so within float32
/// rounding; past it (`in_place_rows(0)`) they are cuBLAS's grouped products, which write bf16
/// outputs (and the other products are cuBLAS's too): within bf16 rounding of the gate, up and
/// down outputs (2e-2, a little above the fixtures' measured median row error of bf16 rounding;
/// the run prints what it measures).
#[test]
fn grouped_expert_products_match_one_product_per_expert() {
    let test = "grouped_expert_products_match_one_product_per_expert";
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    // (weights, [(in_place_rows, bound on the relative L2 error)]).
    let cases = [
        (Dtype::Float32, &[(64, 1e-5)][..]),
        (Dtype::Bfloat16, &[(64, 1e-5), (0, 2e-2)][..]),
    ];
    for (dtype, bounds) in cases {
        let Some((grouped, one_by_one)) = grouped_and_one_by_one(test, dtype) else {
            return;
        };
        for name in ["v32_sparse_moe", "v32_fused_experts", "v3_moe_yarn"] {
            let logits = |cuda: &Cuda| {
                let model =
                    Model::load(&fixture(name), cuda.clone(), ModelOptions::default()).unwrap();
                model.logits(&tokens, None).unwrap()
            };
            let want = logits(&one_by_one);
            for &(in_place_rows, bound) in bounds {
                grouped.in_place_rows(in_place_rows);
                let (layers, launches) = (
                    grouped.grouped_expert_layers(),
                    grouped.bf16_grouped_products(),
                );
                let err = rel_l2(&want, &logits(&grouped));
                let (layers, launches) = (
                    grouped.grouped_expert_layers() - layers,
                    grouped.bf16_grouped_products() - launches,
                );
                let case = format!("{name}, {dtype:?}, in place up to {in_place_rows} rows");
                eprintln!(
                    "{test}: {case}: {layers} MoE layers grouped, {launches} bf16_grouped_tc \
                     launches: relative L2 {err:.2e}"
                );
                assert!(err < bound, "{case}: relative L2 {err:.2e}");
                assert!(
                    layers > 0,
                    "{case}: no MoE layer ran grouped (refused by cuBLAS? see the log)"
                );
                let in_place = dtype == Dtype::Bfloat16 && in_place_rows > 0;
                assert_eq!(
                    launches,
                    if in_place { 3 * layers } else { 0 },
                    "{case}: bf16_grouped_tc launches"
                );
            }
        }
        assert!(
            grouped.experts_grouped(),
            "cuBLAS refused a grouped product"
        );
        assert_eq!(one_by_one.grouped_expert_layers(), 0);
    }
}

/// DeepSeek's fp8 weights stay fp8 on the GPU under `--dtype bfloat16` (half the bytes of bf16).
/// A product of more rows than `in_place_rows` dequantises them to bf16 first: then an fp8
/// checkpoint must give the logits of a bf16 checkpoint holding the values its fp8 weights
/// stand for, rounded to bf16 (the same bf16 weights reach the same products). Products of
/// fewer rows (all of this 40-token prompt's, by default) read the codes in place
/// (`fp8_linear_tc`; the absorbed query weight, which the engine derives in bf16, through
/// `bf16_linear_tc`): the same bf16 values, summed in another order, so within float32
/// rounding of that (the median row: with sparse attention a last-bit change can move a key
/// across the top-k's edge and one row with it; on the emulator they are equal).
#[test]
fn fp8_weights_give_the_logits_of_their_bf16_values() {
    let test = "fp8_weights_give_the_logits_of_their_bf16_values";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    // fp8 experts run one product each; so must the bf16 ones, for the same products.
    cuda.experts_one_by_one();
    let (fp8, bf16) = fp8_and_bf16("v32_sparse_moe");
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let logits = |dir: &Path| {
        let model = Model::load(dir, cuda.clone(), options.clone()).unwrap();
        model.logits(&tokens, None).unwrap()
    };
    // Every product on cuBLAS: the bf16 checkpoint's products too (under the default bound
    // they would read their bf16 weights in place, summing in another order).
    cuda.in_place_rows(0);
    let from_bf16 = logits(bf16.path());
    let dequantised = logits(fp8.path());
    let err = rel_l2(&from_bf16, &dequantised);
    eprintln!("{test}: dequantised: relative L2 {err:.2e}");
    assert!(err < 1e-6, "fp8 vs its bf16 values: relative L2 {err:.2e}");
    assert_eq!(cuda.in_place_products().total(), 0);

    cuda.in_place_rows(tokens.len());
    let in_place = logits(fp8.path());
    let products = cuda.in_place_products().fp8;
    let rows = sorted_row_errors(&dequantised, &in_place, in_place.len() / tokens.len());
    let median = rows[rows.len() / 2];
    eprintln!(
        "{test}: {products} products read fp8 codes in place: median row {median:.2e}, worst {:.2e}",
        rows[rows.len() - 1]
    );
    assert!(products > 0, "no product read the fp8 codes in place");
    assert!(
        median < 1e-4,
        "in place vs dequantised: median row {median:.2e}"
    );

    // Grouped (the default): each MoE layer's active experts in three `fp8_grouped_tc`
    // launches, the same products as one by one (no split of k there, so float32 rounding).
    let grouped = gpus(test, &[0], Dtype::Bfloat16).unwrap();
    let model = Model::load(fp8.path(), grouped.clone(), options.clone()).unwrap();
    let from_grouped = model.logits(&tokens, None).unwrap();
    let rows = sorted_row_errors(&in_place, &from_grouped, in_place.len() / tokens.len());
    let median = rows[rows.len() / 2];
    eprintln!(
        "{test}: {} MoE layers grouped, {} in-place launches: vs one by one, median row \
         {median:.2e}, worst {:.2e}",
        grouped.grouped_expert_layers(),
        grouped.in_place_products().fp8,
        rows[rows.len() - 1]
    );
    assert!(
        grouped.grouped_expert_layers() > 0,
        "fp8 experts never ran grouped"
    );
    assert!(
        median < 1e-4,
        "grouped vs one by one: median row {median:.2e}"
    );
}

/// A product of an fp8 or bf16 weight with few rows (a decode step's) reads the weight in place
/// (`fp8_linear_tc`: each code the bf16 value that dequantising gives; `bf16_linear_tc`: the
/// values as stored; x rounded to bf16, float32 sums; k split over blocks where the grid is
/// small); a product of more rows than `in_place_rows` runs on cuBLAS (an fp8 weight
/// dequantised for it). Both must give the product of those bf16 values summed in float64,
/// within float32 summation error, at shapes with partial tiles: 1 to 70 rows (past 64, a
/// second block of rows), weight rows not a multiple of 64, k not a multiple of 4 (codes and
/// values read one at a time) or of 128 (a partial scale block or k-step), and k long enough
/// to split (the emulator's one multiprocessor splits grids of under 4 blocks).
#[test]
fn products_read_fp8_and_bf16_weights_in_place() {
    let test = "products_read_fp8_and_bf16_weights_in_place";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    let mut rand = noise(11);
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
    let shapes = [
        (1, 64, 128),
        (3, 100, 301),
        (16, 130, 1000),
        (64, 72, 2048),
        (70, 65, 259),
        (1, 1, 4096),
        (5, 33, 130),
    ];
    for (m, n, k) in shapes {
        let fp8 = random_fp8(&mut rand, n, k);
        let fp8_values: Vec<f32> = fp8.to_f32_vec().into_iter().map(bf16).collect();
        let bf16_values: Vec<f32> = rand(n * k).into_iter().map(bf16).collect();
        let bf16_bytes = bf16_values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let weights = [
            ("fp8", fp8, fp8_values),
            (
                "bf16",
                Matrix::from_bytes(n, k, StoredType::Bf16, bf16_bytes),
                bf16_values,
            ),
        ];
        let x = rand(m * k);
        for (dtype, w, w_values) in weights {
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k)
                        .map(|j| f64::from(bf16(x[r * k + j])) * f64::from(w_values[c * k + j]))
                        .sum::<f64>() as f32
                })
                .collect();
            let weight = cuda.upload(w).unwrap();
            let xt = cuda.tensor(m, k, x.clone());
            for in_place_rows in [usize::MAX, 64, 0] {
                cuda.in_place_rows(in_place_rows);
                let before = cuda.in_place_products();
                let got = cuda.to_host(&cuda.linear(&xt, &weight));
                let err = rel_l2(&want, &got);
                let after = cuda.in_place_products();
                let in_place = match dtype {
                    "fp8" => (after.fp8 - before.fp8, after.bf16 - before.bf16),
                    _ => (after.bf16 - before.bf16, after.fp8 - before.fp8),
                };
                let case =
                    format!("{dtype} {m}x{k} by {n}x{k}, in place up to {in_place_rows} rows");
                eprintln!("{test}: {case}: relative L2 {err:.2e}");
                assert_eq!(got.len(), m * n, "{case}: output length");
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{case}: a value not written"
                );
                assert!(err < 1e-5, "{case}: relative L2 {err:.2e}");
                assert_eq!(
                    in_place,
                    (u64::from(m <= in_place_rows), 0),
                    "{case}: in-place launches of its dtype and of the other"
                );
            }
        }
    }
}

/// Expert parallelism across lanes: the routed experts split over two shards on one GPU (each
/// with its own stream), then three shards with redundant copies of hot experts, then, where
/// the machine has two GPUs, one shard per GPU; the logits must match the CPU backend with no
/// shards, and every routed pair must be computed once.
#[test]
fn expert_shards_across_lanes_match_the_cpu_backend() {
    let test = "expert_shards_across_lanes_match_the_cpu_backend";
    let dir = fixture("v32_sparse_moe");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let want = Model::load(&dir, Cpu, options.clone())
        .unwrap()
        .logits(&tokens, None)
        .unwrap();
    let plan_dir = tempfile::tempdir().unwrap();
    let redundant = support::write_redundant_plan(plan_dir.path());
    let setups: [(&[usize], Option<&Path>); 3] = [
        (&[0, 0], None),
        (&[0, 0, 0], Some(&redundant)),
        (&[0, 1], None),
    ];
    for (ordinals, placement) in setups {
        let cuda = match Cuda::new(ordinals, Dtype::Float32) {
            Ok(cuda) => cuda,
            Err(e) if ordinals == [0, 1] && e.to_string().contains("no GPU 1") => {
                eprintln!("{test}: one shard per GPU skipped (needs two GPUs): {e}");
                continue;
            }
            Err(_) => match gpus(test, ordinals, Dtype::Float32) {
                Some(cuda) => cuda,
                None => return,
            },
        };
        let shards = ExpertShards::from_options(&config, None, placement, ordinals.len())
            .unwrap()
            .map(Arc::new);
        let sharded = ModelOptions {
            expert_shards: shards.clone(),
            ..options.clone()
        };
        let model = Model::load(&dir, cuda, sharded).unwrap();
        let got = model.logits(&tokens, None).unwrap();
        let err = rel_l2(&want, &got);
        eprintln!("{ordinals:?} {placement:?}: relative L2 {err:.2e}");
        assert!(err < 1e-4, "{ordinals:?}: relative L2 {err:.2e}");
        let computed = shards.unwrap().computed();
        // One MoE layer, top-2 routing.
        assert_eq!(computed.iter().sum::<u64>() as usize, tokens.len() * 2);
        assert!(
            computed.iter().all(|&c| c > 0),
            "an idle shard: {computed:?}"
        );
    }
}

/// Deterministic values in [-0.5, 0.5) from `seed`, `len` at a call (no RNG crate needed).
fn noise(mut seed: u32) -> impl FnMut(usize) -> Vec<f32> {
    move |len| {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }
}

/// Two sequences through a pool of 16 blocks of 4 rows of `dtype`, scattered and interleaved:
/// the first in prefill chunks of 7 and then single tokens (every row's logits), the second a
/// token a step alongside (its last row's logits).
fn paged_run<B: Backend>(model: &Model<B>, dtype: KvDtype) -> Vec<Vec<f32>> {
    let a: Vec<u32> = (0..23).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let b: Vec<u32> = (0..19).map(|i| (i * 11 % 250 + 2) as u32).collect();
    let pool = model.new_paged_pool(4, 16, dtype).unwrap();
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

/// The indexer's score of key `s` for query row `r`, in float64: Σ_h w[r, h] · relu(scale ·
/// q[r, h] · keys[s]), with `heads` heads of the keys' width.
fn indexer_score(
    q: &[f32],
    w: &[f32],
    keys: &[f32],
    (r, s): (usize, usize),
    heads: usize,
    scale: f32,
) -> f64 {
    let dim = q.len() / (w.len() / heads) / heads;
    let key = &keys[s * dim..(s + 1) * dim];
    (0..heads)
        .map(|h| {
            let query = &q[(r * heads + h) * dim..(r * heads + h + 1) * dim];
            let dot: f64 = query
                .iter()
                .zip(key)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            f64::from(w[r * heads + h]) * (f64::from(scale) * dot).max(0.0)
        })
        .sum()
}

/// The indexer over a paged pool's keys read in place (`indexer_select_paged`), for each KV
/// dtype, against float64 scores of the keys as the CPU backend stores and widens them: each
/// row picks k distinct visible keys, none scoring below the k-th best by more than rounding
/// (fp8: a last-bit difference can move a key value to a neighbouring code), and a row with at
/// most k visible keys keeps them all. 64 heads run the in-place kernels; 80, more than they
/// keep sums for, the gathered copy. Then the same on the tensor cores
/// (`indexer_scores_tc_store_*`, in place for 80 heads too): over float32 and bf16 pools the
/// queries and keys rounded to bf16, whose picks may trail the k-th best by bf16 rounding:
/// within 2e-3 of the largest score (measured on the CPU emulator: at most 1.3e-4); over an fp8
/// pool the e4m3 codes through `mma.sync` e4m3, exact products (the emulator's picks trail by
/// 0.0; a GPU's tensor-core sums may keep fewer bits than float32: the same 2e-3). Keys of 132 values, wider than
/// the fp8 kernel takes (and two fp8 scale blocks a row), fall back over an fp8 pool: to the
/// float32 in-place kernel for 64 heads, to the gathered copy for 80.
#[test]
fn the_indexer_reads_each_kv_store_in_place() {
    let Some(cuda) = gpu("the_indexer_reads_each_kv_store_in_place") else {
        return;
    };
    let (pool_rows, n_keys, k, scale) = (705, 598, 64, 0.088_f32);
    let positions = [n_keys - 1, 300, 40];
    let mut noise = noise(7);
    // Blocks of 5 rows; the keys' 120 blocks (the last holding 3) are blocks (7b + 3) mod 141
    // of the pool's: scattered, distinct.
    let blocks: Vec<u32> = (0..120).map(|b| (b * 7 + 3) % 141).collect();
    let table = PagedRows::new(&blocks, 5, n_keys);
    let slots = table.rows(0..n_keys);
    let cases = [(64, false), (80, false), (64, true), (80, true)];
    for ((heads, tensor_cores), dim) in cases.into_iter().flat_map(|c| [(c, 128), (c, 132)]) {
        cuda.attention_on_tensor_cores(tensor_cores);
        // Over an fp8 pool the scores are those of the queries rounded as the pool rounds its
        // keys (DeepSeek's fp8 indexer), through mma.sync e4m3 as in float32: products of
        // e4m3 codes are exact, so only the order of the float32 sums differs. The bf16 tensor
        // cores round the queries and keys of the other pools to bf16.
        for (dtype, tolerance) in [
            (KvDtype::Float32, 1e-4),
            (KvDtype::Bfloat16, 1e-4),
            (KvDtype::Fp8, 1e-4),
            (KvDtype::Fp8Ue8m0, 1e-4),
        ] {
            // The tensor cores' own sums may keep fewer bits than float32 (bf16 roundings aside;
            // DeepSeek-V3's report gives about 14 for Hopper's fp8 wgmma): within 2e-3 either way.
            let tolerance = if tensor_cores { 2e-3 } else { tolerance };
            let keys = noise(n_keys * dim);
            let (q, w) = (
                noise(positions.len() * heads * dim),
                noise(positions.len() * heads),
            );
            let mut scored = q.clone();
            if dtype.is_fp8() {
                fp8_round_rows(&mut scored, dim, dtype == KvDtype::Fp8Ue8m0);
            }
            let mut cpu_store = Cpu.kv_store(pool_rows, dim, dtype).unwrap();
            Cpu.write_rows(
                &mut cpu_store,
                &slots,
                &Cpu.tensor(n_keys, dim, keys.clone()),
            );
            let widened = Cpu.to_host(&Cpu.gather_rows(&cpu_store, &slots));
            let mut store = cuda.kv_store(pool_rows, dim, dtype).unwrap();
            cuda.write_rows(&mut store, &slots, &cuda.tensor(n_keys, dim, keys));
            let seq = IndexerSeq {
                first: 0,
                positions: &positions,
                table,
            };
            let picked = cuda
                .indexer_select_paged(
                    &cuda.tensor(positions.len(), heads * dim, q.clone()),
                    &cuda.tensor(positions.len(), heads, w.clone()),
                    &store,
                    &[seq],
                    k,
                    scale,
                )
                .remove(0);
            for (r, (&p, got)) in positions.iter().zip(&picked).enumerate() {
                let case = format!(
                    "{heads} heads of {dim}, {dtype:?}, tensor cores {tensor_cores}, row {r}"
                );
                if p < k {
                    assert_eq!(*got, (0..=p as u32).collect::<Vec<_>>(), "{case}");
                    continue;
                }
                let score = |s| indexer_score(&scored, &w, &widened, (r, s), heads, scale);
                let mut all: Vec<f64> = (0..=p).map(score).collect();
                let largest = all.iter().fold(0f64, |m, v| m.max(v.abs()));
                all.sort_by(|a, b| b.total_cmp(a));
                let kth = all[k - 1];
                // Ascending, as topk_rows writes them, so dedup finds any repeat.
                assert!(got.is_sorted(), "{case}: picks out of order: {got:?}");
                let mut distinct = got.clone();
                distinct.dedup();
                assert_eq!(distinct.len(), k, "{case}: picked {got:?}");
                let mut worst = 0f64;
                for &s in got {
                    assert!(s as usize <= p, "{case}: key {s} is past position {p}");
                    let v = score(s as usize);
                    worst = worst.max((kth - v) / largest);
                    assert!(
                        v >= kth - tolerance * largest,
                        "{case}: key {s} scores {v:.6}, below the {k}-th best {kth:.6}"
                    );
                }
                eprintln!("{case}: picks trail the {k}-th best by {worst:.2e} of the largest");
            }
        }
    }
    // One scores launch a call on the tensor cores: 2 head counts × 4 dtypes at 128 values;
    // at 132, 2 × 2 and the 80 heads' over each fp8 pool (its keys gathered as float32 rows,
    // scored on the bf16 tensor cores), where 64 heads take the float32 in-place kernel.
    assert_eq!(cuda.tensor_core_launches(), 8 + 6);
}

/// The indexer's rows of several sequences in one pool are one launch
/// (`indexer_select_paged`): each row reads its own sequence's block table. Three sequences
/// with tables over scattered, disjoint blocks of one pool and rows in an order that leaves a
/// gap (a batch row no sequence names), one of them all early rows (at most k keys each,
/// answered without a launch), pick exactly what each sequence picks on its own, for every KV
/// dtype, in float32 and on the tensor cores; kept on the device
/// (`indexer_keep_paged`), they are those picks' pool rows.
#[test]
fn the_indexer_takes_a_batch_of_sequences_in_one_launch() {
    let Some(cuda) = gpu("the_indexer_takes_a_batch_of_sequences_in_one_launch") else {
        return;
    };
    let (heads, dim, k, scale, block) = (16, 32, 24, 0.17_f32, 4);
    let mut noise = noise(11);
    // Tokens, each sequence's table (blocks 3s + 1 + 3b mod 150: disjoint between sequences),
    // and its query rows' positions and first batch row.
    let tokens = [130, 70, 20];
    let tables: Vec<Vec<u32>> = tokens
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            let n: usize = n;
            (0..n.div_ceil(block))
                .map(|b| ((3 * b + s + 1) % 150) as u32)
                .collect()
        })
        .collect();
    let positions: [&[usize]; 3] = [&[125, 126, 127, 128, 129], &[69], &[3, 19]];
    let firsts = [3, 0, 8]; // rows 1 and 2 belong to no sequence
    let batch_rows = 10;
    for tensor_cores in [false, true] {
        cuda.attention_on_tensor_cores(tensor_cores);
        for dtype in [KvDtype::Float32, KvDtype::Bfloat16, KvDtype::Fp8] {
            let mut store = cuda.kv_store(150 * block, dim, dtype).unwrap();
            for (table, &n) in tables.iter().zip(&tokens) {
                let rows = PagedRows::new(table, block, n).rows(0..n);
                cuda.write_rows(&mut store, &rows, &cuda.tensor(n, dim, noise(n * dim)));
            }
            let q = cuda.tensor(batch_rows, heads * dim, noise(batch_rows * heads * dim));
            let w = cuda.tensor(batch_rows, heads, noise(batch_rows * heads));
            let seqs: Vec<IndexerSeq<'_>> = (0..3)
                .map(|s| IndexerSeq {
                    first: firsts[s],
                    positions: positions[s],
                    table: PagedRows::new(&tables[s], block, tokens[s]),
                })
                .collect();
            let launches = cuda.indexer_launches();
            let batched = cuda.indexer_select_paged(&q, &w, &store, &seqs, k, scale);
            let case = format!("{dtype:?}, tensor cores {tensor_cores}");
            assert_eq!(cuda.indexer_launches() - launches, 1, "{case}");
            assert_eq!(batched.len(), 3, "{case}");
            for (s, seq) in seqs.iter().enumerate() {
                let n = seq.positions.len();
                let alone = cuda
                    .indexer_select_paged(
                        &cuda.rows(&q, seq.first, n),
                        &cuda.rows(&w, seq.first, n),
                        &store,
                        &[IndexerSeq { first: 0, ..*seq }],
                        k,
                        scale,
                    )
                    .remove(0);
                assert_eq!(batched[s], alone, "{case}: sequence {s}");
                for (got, &p) in batched[s].iter().zip(seq.positions) {
                    let want_len = (p + 1).min(k);
                    assert_eq!(got.len(), want_len, "{case}: sequence {s}, position {p}");
                    assert!(got.iter().all(|&key| key as usize <= p), "{case}: {got:?}");
                }
            }
            // The early sequence alone launches nothing.
            assert_eq!(
                cuda.indexer_launches() - launches,
                3,
                "{case}: the early rows launched"
            );
            // Kept on the device: the same picks as the pool rows that hold them, the early
            // rows' too (launched then), in one launch.
            let kept = cuda
                .indexer_keep_paged(&q, &w, &store, &seqs, k, scale)
                .expect("the picks of a store's keys are kept");
            assert_eq!(cuda.indexer_launches() - launches, 4, "{case}");
            let kept = kept.to_host();
            for (s, seq) in seqs.iter().enumerate() {
                let want: Vec<Vec<u32>> = batched[s]
                    .iter()
                    .map(|row| {
                        row.iter()
                            .map(|&t| seq.table.row(t as usize) as u32)
                            .collect()
                    })
                    .collect();
                assert_eq!(kept[s], want, "{case}: sequence {s} kept");
            }
            cuda.keep_picks(false);
            assert!(
                cuda.indexer_keep_paged(&q, &w, &store, &seqs, k, scale)
                    .is_none(),
                "{case}: kept though keep_picks is off"
            );
            cuda.keep_picks(true);
        }
    }
}

/// The indexer's top-k split into parts (`topk_parts_f32`, then `topk_merge_f32`: what a
/// decode step of few rows takes on a GPU of many multiprocessors) picks exactly what one
/// block a row picks, for 2, 3, 6 and 16 parts asked (16 takes 8, the most parts of at least
/// k that 4000 keys make), and both pick what float64 scores of the same keys
/// pick: every key above the k-th best, and of the keys tied with it, the lowest indices.
/// Three of every five keys are copies of three rows, so the scores tie in large groups (in
/// three of the rows here, at the k-th best, with some of the tied keys left out); rows of
/// 4000, 3000, 2101 and 1001 visible keys (a part past a row's keys has no candidates) and one
/// of 451, at most k = 500, which keeps them all.
#[test]
fn the_indexer_top_k_splits_rows_into_parts_with_the_same_picks() {
    let Some(cuda) = gpu("the_indexer_top_k_splits_rows_into_parts_with_the_same_picks") else {
        return;
    };
    cuda.attention_on_tensor_cores(false);
    let (n_keys, heads, dim, k, scale) = (4000, 4, 32, 500, 0.177_f32);
    let positions = [n_keys - 1, 2999, 2100, 1000, 450];
    let mut noise = noise(11);
    let copied = noise(3 * dim);
    let mut keys = noise(n_keys * dim);
    for j in 0..n_keys {
        if j % 5 < 3 {
            let t = (j * 7 + j / 5) % 3;
            keys[j * dim..(j + 1) * dim].copy_from_slice(&copied[t * dim..(t + 1) * dim]);
        }
    }
    let (q, w) = (
        noise(positions.len() * heads * dim),
        noise(positions.len() * heads),
    );
    let pick = || {
        let launches = cuda.split_top_k_launches();
        let picked = cuda.indexer_select(
            &cuda.tensor(positions.len(), heads * dim, q.clone()),
            &cuda.tensor(positions.len(), heads, w.clone()),
            &cuda.tensor(n_keys, dim, keys.clone()),
            &positions,
            k,
            scale,
        );
        (picked, cuda.split_top_k_launches() - launches)
    };
    let select = |parts: Option<u32>| {
        cuda.indexer_top_k_parts(parts).unwrap();
        pick()
    };
    let (whole, splits) = select(Some(1));
    assert_eq!(splits, 0, "one block a row");
    for parts in [2, 3, 6, 16] {
        let (picked, splits) = select(Some(parts));
        assert_eq!(splits, 1, "{parts} parts: one split launch");
        assert_eq!(picked, whole, "{parts} parts");
    }
    // Out of range: refused, and the setting is unchanged (a split launch still).
    for parts in [0, launch::TOPK_MAX_PARTS + 1] {
        let err = cuda.indexer_top_k_parts(Some(parts)).unwrap_err();
        assert!(err.to_string().contains("indexer top-k parts"), "{err}");
    }
    assert_eq!(pick(), (whole.clone(), 1));
    cuda.indexer_top_k_parts(None).unwrap();

    let mut tied_rows = 0;
    for (r, (&p, got)) in positions.iter().zip(&whole).enumerate() {
        if p < k {
            assert_eq!(*got, (0..=p as u32).collect::<Vec<_>>(), "row {r}");
            continue;
        }
        let scores: Vec<f64> = (0..=p)
            .map(|s| indexer_score(&q, &w, &keys, (r, s), heads, scale))
            .collect();
        let mut order: Vec<usize> = (0..=p).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let kth = scores[order[k - 1]];
        let largest = scores.iter().fold(0f64, |m, v| m.max(v.abs()));
        let near = |s: usize| (scores[s] - kth).abs() <= 1e-4 * largest;
        assert!(got.is_sorted(), "row {r}: picks out of order");
        let mut distinct = got.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), k, "row {r}");
        let picked: std::collections::HashSet<usize> = got.iter().map(|&s| s as usize).collect();
        // Clear of the k-th best by more than float32 rounding: in exactly when above it.
        for s in (0..=p).filter(|&s| !near(s)) {
            assert_eq!(picked.contains(&s), scores[s] > kth, "row {r}: key {s}");
        }
        // Tied with it exactly (copies of one row): the lowest indices win.
        let tied: Vec<usize> = (0..=p).filter(|&s| scores[s] == kth).collect();
        let won = tied.iter().filter(|s| picked.contains(s)).count();
        assert!(won > 0, "row {r}: no key tied at the k-th picked");
        assert!(
            tied[..won].iter().all(|s| picked.contains(s)),
            "row {r}: tied keys won out of index order"
        );
        eprintln!(
            "row {r}: {won} of the {} keys tied at the k-th best picked",
            tied.len()
        );
        if won < tied.len() {
            tied_rows += 1;
        }
    }
    assert!(
        tied_rows >= 2,
        "the case must tie at the k-th with keys left out, in {tied_rows} rows"
    );
}

/// A `kv_b` of `d`'s shape from `noise`, its absorbed query weight `uk_t`, and both uploaded to
/// `cuda`.
fn mla_weights(
    cuda: &Cuda,
    d: MlaDims,
    noise: &mut impl FnMut(usize) -> Vec<f32>,
) -> (
    Matrix,
    Matrix,
    <Cuda as Backend>::Weight,
    <Cuda as Backend>::Weight,
) {
    let kv_b = Matrix::from_f32(
        d.heads * (d.nope + d.v),
        d.latent,
        noise(d.heads * (d.nope + d.v) * d.latent),
    );
    let uk_t = absorbed_query_weight(&kv_b, d);
    let (kv_b_d, uk_t_d) = (
        cuda.upload(kv_b.clone()).unwrap(),
        cuda.upload(uk_t.clone()).unwrap(),
    );
    (kv_b, uk_t, kv_b_d, uk_t_d)
}

/// The same KV store on the CPU and on `cuda`: `rows` rows of `cols` in `dtype`, with each
/// write's values (`slots.len()` rows) at its slots.
fn store_on_both(
    cuda: &Cuda,
    rows: usize,
    cols: usize,
    dtype: KvDtype,
    writes: &[(Vec<usize>, Vec<f32>)],
) -> (<Cpu as Backend>::Store, <Cuda as Backend>::Store) {
    let mut on_cpu = Cpu.kv_store(rows, cols, dtype).unwrap();
    let mut on_gpu = cuda.kv_store(rows, cols, dtype).unwrap();
    for (slots, values) in writes {
        let n = slots.len();
        Cpu.write_rows(&mut on_cpu, slots, &Cpu.tensor(n, cols, values.clone()));
        cuda.write_rows(&mut on_gpu, slots, &cuda.tensor(n, cols, values.clone()));
    }
    (on_cpu, on_gpu)
}

/// Absorbed attention over a paged pool's latent and RoPE-key stores read in place
/// (`mla_latent_attention_{f32, bf16_bits, fp8}` through the block table's rows), for each KV
/// dtype, against the CPU backend over the same rows as it stores and widens them: tokens
/// scattered over the pool, dense rows and top-k selections, DeepSeek's widths (latent 512,
/// RoPE 64) with 20 heads (a partial second block of heads) and widths with partial fp8 blocks.
/// Float32 attention within 1e-5. The same on the tensor cores (`mla_latent_attention_tc_*`,
/// which round the queries, the keys and the probabilities to bf16, 2^-9 relative each, and sum
/// in float32; 200 + 24 is padded to 224 + 24 + 8 in shared memory) within 5e-3: on the CPU
/// emulator these cases measure 0.8e-3 to 2.0e-3 (least from a bf16 pool, whose keys need no
/// rounding), while the query's RoPE part misplaced in the padded row measures 2.7e-2. Every
/// case runs whole and with each row's keys split in three (flash decoding: the dense rows'
/// 150, 81 and 6 keys in splits of 64, so the last row has two empty splits; the top-k rows' up
/// to 40 in splits of 32), to the same bounds.
#[test]
fn attention_reads_each_kv_store_in_place() {
    let Some(cuda) = gpu("attention_reads_each_kv_store_in_place") else {
        return;
    };
    let (pool_rows, tokens) = (304, 150);
    // Blocks of 4 rows; the sequence's 38 blocks are blocks (7b + 3) mod 76 of the pool's.
    let blocks: Vec<u32> = (0..38).map(|b| (b * 7 + 3) % 76).collect();
    let table = PagedRows::new(&blocks, 4, tokens);
    let slots = table.rows(0..tokens);
    let positions = [tokens - 1, 80, 5];
    // Row i picks every third visible token, up to 40 of them.
    let picked: Vec<Vec<u32>> = positions
        .iter()
        .map(|&p| (0..=p as u32).step_by(3).take(40).collect())
        .collect();
    let mut noise = noise(5);
    // 20 heads: a block of 16 and one of 4.
    for (latent, rope, heads) in [(512, 64, 20), (200, 24, 3)] {
        let d = MlaDims {
            heads,
            nope: 16,
            rope,
            v: 24,
            latent,
        };
        let (kv_b, uk_t, kv_b_d, uk_t_d) = mla_weights(&cuda, d, &mut noise);
        let q = noise(positions.len() * d.heads * (d.nope + d.rope));
        let (lat, pe) = (noise(tokens * latent), noise(tokens * rope));
        for dtype in [KvDtype::Float32, KvDtype::Bfloat16, KvDtype::Fp8] {
            // The pool's stores: an fp8 pool keeps its RoPE keys in bf16.
            let stores = [(latent, &lat, dtype), (rope, &pe, dtype.rope_keys())].map(
                |(cols, rows, dtype)| {
                    store_on_both(
                        &cuda,
                        pool_rows,
                        cols,
                        dtype,
                        &[(slots.clone(), rows.clone())],
                    )
                },
            );
            let [(cpu_lat, gpu_lat), (cpu_pe, gpu_pe)] = &stores;
            // The tensor-core blocks take 1, 2 or 4 groups of 16 heads, one per dtype: 20 heads
            // are two blocks of one group (the second partial), one of two, one of four (the
            // last 44 heads empty).
            let groups = match dtype {
                KvDtype::Float32 => 1,
                KvDtype::Bfloat16 => 2,
                KvDtype::Fp8 | KvDtype::Fp8Ue8m0 => 4,
            };
            cuda.attention_head_groups(Some(groups)).unwrap();
            for ((selection, tensor_cores), splits) in [None, Some(picked.as_slice())]
                .into_iter()
                .flat_map(|s| [(s, false), (s, true)])
                .flat_map(|c| [(c, 1), (c, 3)])
            {
                cuda.attention_on_tensor_cores(tensor_cores);
                cuda.attention_key_splits(Some(splits)).unwrap();
                let case = format!(
                    "latent {latent}, rope {rope}, {heads} heads, {dtype:?}, {}{}, keys in \
                     {splits} split(s)",
                    if selection.is_some() {
                        "top-k"
                    } else {
                        "dense"
                    },
                    if tensor_cores {
                        format!(", tensor cores, {groups} group(s) a block")
                    } else {
                        String::new()
                    }
                );
                fn seq<'a, T, S, P>(
                    (latent, k_pe): (&'a S, &'a S),
                    positions: &'a [usize],
                    selection: Option<&'a [Vec<u32>]>,
                    rows: PagedRows<'a>,
                ) -> MlaSeq<'a, T, S, P> {
                    MlaSeq {
                        first: 0,
                        cached: CachedRows::Stores { latent, k_pe },
                        positions,
                        selection: selection.map(Selection::Listed),
                        rows: Some(rows),
                        form: AttentionForm::Absorbed,
                    }
                }
                let want = Cpu.to_host(&Cpu.mla_attention(
                    &Cpu.tensor(positions.len(), q.len() / positions.len(), q.clone()),
                    &[seq((cpu_lat, cpu_pe), &positions, selection, table)],
                    MlaWeights {
                        kv_b: &kv_b,
                        uk_t: &uk_t,
                    },
                    d,
                    0.07,
                ));
                let got = cuda.to_host(&cuda.mla_attention(
                    &cuda.tensor(positions.len(), q.len() / positions.len(), q.clone()),
                    &[seq((gpu_lat, gpu_pe), &positions, selection, table)],
                    MlaWeights {
                        kv_b: &kv_b_d,
                        uk_t: &uk_t_d,
                    },
                    d,
                    0.07,
                ));
                assert!(want.iter().any(|&x| x != 0.0), "{case}: zero reference");
                let err = rel_l2(&want, &got);
                let bound = if tensor_cores { 5e-3 } else { 1e-5 };
                eprintln!("{case}: relative L2 {err:.2e}");
                assert!(err < bound, "{case}: relative L2 {err:.2e}");
            }
        }
    }
    // 2 width sets × 3 dtypes × 2 selections × 2 splittings, one launch each; the 3-way
    // splits, on the tensor cores or not, are followed by a combine.
    assert_eq!(cuda.tensor_core_launches(), 24);
    assert_eq!(cuda.split_attention_launches(), 24);
    for bad in [0, 3, 8] {
        let err = cuda.attention_head_groups(Some(bad)).unwrap_err();
        assert!(err.to_string().contains("1, 2 or 4"), "{bad}: {err}");
    }
    for bad in [0, 33] {
        let err = cuda.attention_key_splits(Some(bad)).unwrap_err();
        assert!(err.to_string().contains("from 1 to 32"), "{bad}: {err}");
    }
    cuda.attention_key_splits(None).unwrap();
}

/// One attention call over several sequences (a decode step's batch), against the CPU backend:
/// two sequences in one paged pool, each through its own block table, with a row between them
/// that no sequence names; one that reads cached tensors of its own; one more in the pool. The
/// pool's sequences next to each other share a launch: on the tensor cores (bf16 pool, 128
/// heads, blocks of as many groups of heads as the device fills, 4 on the emulator) three
/// launches; the unnamed row's output is zero.
#[test]
fn attention_over_a_batch_of_sequences_shares_launches() {
    let Some(cuda) = gpu("attention_over_a_batch_of_sequences_shares_launches") else {
        return;
    };
    let d = MlaDims {
        heads: 128,
        nope: 8,
        rope: 64,
        v: 8,
        latent: 512,
    };
    let mut noise = noise(11);
    let (kv_b, uk_t, kv_b_d, uk_t_d) = mla_weights(&cuda, d, &mut noise);
    // Two sequences of 40 and 24 tokens in a pool of 32 blocks of 4 rows.
    let (pool_rows, block) = (128, 4);
    let blocks_a: Vec<u32> = (0..10).map(|b| 31 - 3 * b).collect();
    let blocks_b: Vec<u32> = (0..6).map(|b| 3 * b).collect();
    let (table_a, table_b) = (
        PagedRows::new(&blocks_a, block, 40),
        PagedRows::new(&blocks_b, block, 24),
    );
    let pools = [d.latent, d.rope].map(|cols| {
        let writes = [&table_a, &table_b]
            .map(|table| (table.rows(0..table.tokens()), noise(table.tokens() * cols)));
        store_on_both(&cuda, pool_rows, cols, KvDtype::Bfloat16, &writes)
    });
    let [(cpu_lat, gpu_lat), (cpu_pe, gpu_pe)] = &pools;
    // The sequence with cached tensors of its own: 12 tokens.
    let (own_lat, own_pe) = (noise(12 * d.latent), noise(12 * d.rope));
    let (cpu_own, gpu_own) = (
        (
            Cpu.tensor(12, d.latent, own_lat.clone()),
            Cpu.tensor(12, d.rope, own_pe.clone()),
        ),
        (
            cuda.tensor(12, d.latent, own_lat),
            cuda.tensor(12, d.rope, own_pe),
        ),
    );
    // Rows: 0-1 sequence A (positions 38, 39), 2 none, 3 B (23, top-k), 4 the tensors (11),
    // 5 A again (a second query of A's, as a later step's would be: its own launch).
    let (pos_a, pos_b, pos_own, pos_a2) = ([38, 39], [23], [11], [30]);
    let picked_b: Vec<Vec<u32>> = vec![(0..=23).step_by(2).collect()];
    let q = noise(6 * d.heads * (d.nope + d.rope));
    fn seqs<'a, T, S, P>(
        (lat, pe): (&'a S, &'a S),
        (own_lat, own_pe): (&'a T, &'a T),
        (table_a, table_b): (PagedRows<'a>, PagedRows<'a>),
        positions: [&'a [usize]; 4],
        picked_b: &'a [Vec<u32>],
    ) -> Vec<MlaSeq<'a, T, S, P>> {
        let pool = CachedRows::Stores {
            latent: lat,
            k_pe: pe,
        };
        let in_pool = |first, positions, selection, table| MlaSeq {
            first,
            cached: pool,
            positions,
            selection,
            rows: Some(table),
            form: AttentionForm::Absorbed,
        };
        vec![
            in_pool(0, positions[0], None, table_a),
            in_pool(3, positions[1], Some(Selection::Listed(picked_b)), table_b),
            MlaSeq {
                first: 4,
                cached: CachedRows::Tensors {
                    latent: own_lat,
                    k_pe: own_pe,
                },
                positions: positions[2],
                selection: None,
                rows: None,
                form: AttentionForm::Absorbed,
            },
            in_pool(5, positions[3], None, table_a),
        ]
    }
    let positions: [&[usize]; 4] = [&pos_a, &pos_b, &pos_own, &pos_a2];
    let want = Cpu.to_host(&Cpu.mla_attention(
        &Cpu.tensor(6, q.len() / 6, q.clone()),
        &seqs(
            (cpu_lat, cpu_pe),
            (&cpu_own.0, &cpu_own.1),
            (table_a, table_b),
            positions,
            &picked_b,
        ),
        MlaWeights {
            kv_b: &kv_b,
            uk_t: &uk_t,
        },
        d,
        0.05,
    ));
    let width = d.heads * d.v;
    assert!(want[2 * width..3 * width].iter().all(|&x| x == 0.0));
    for tensor_cores in [false, true] {
        cuda.attention_on_tensor_cores(tensor_cores);
        let launches = cuda.tensor_core_launches();
        let got = cuda.to_host(&cuda.mla_attention(
            &cuda.tensor(6, q.len() / 6, q.clone()),
            &seqs(
                (gpu_lat, gpu_pe),
                (&gpu_own.0, &gpu_own.1),
                (table_a, table_b),
                positions,
                &picked_b,
            ),
            MlaWeights {
                kv_b: &kv_b_d,
                uk_t: &uk_t_d,
            },
            d,
            0.05,
        ));
        let case = if tensor_cores {
            "tensor cores"
        } else {
            "float32"
        };
        assert!(
            got[2 * width..3 * width].iter().all(|&x| x == 0.0),
            "{case}: the row no sequence names"
        );
        for (r, (want, got)) in want.chunks(width).zip(got.chunks(width)).enumerate() {
            if r == 2 {
                continue;
            }
            let err = rel_l2(want, got);
            eprintln!("{case}, row {r}: relative L2 {err:.2e}");
            assert!(
                err < if tensor_cores { 5e-3 } else { 1e-5 },
                "{case}, row {r}: relative L2 {err:.2e}"
            );
        }
        // Rows 0-3 (the pool's A and B, row 2 between them), 4 (its own tensors), 5 (A once
        // more, after the tensors): three launches.
        let expect = if tensor_cores { 3 } else { 0 };
        assert_eq!(cuda.tensor_core_launches() - launches, expect, "{case}");
    }
}

/// Attention the kernels cannot run is refused when a model loads, saying why: DeepSeek's
/// widths pass, a latent wider than the kernel's 512 does not.
#[test]
fn attention_beyond_the_kernels_limits_is_refused_at_load() {
    let Some(cuda) = gpu("attention_beyond_the_kernels_limits_is_refused_at_load") else {
        return;
    };
    // On the tensor cores, which every GPU's shared memory holds at DeepSeek's widths (the
    // float32 kernel's 108 KB is more than sm_86/89/120 allow: a unit test checks that case).
    cuda.attention_on_tensor_cores(true);
    let deepseek = MlaDims {
        heads: 128,
        nope: 128,
        rope: 64,
        v: 128,
        latent: 512,
    };
    cuda.check_attention(deepseek).unwrap();
    let err = cuda
        .check_attention(MlaDims {
            latent: 1024,
            ..deepseek
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kv_lora_rank") && err.contains("1024 + 64"),
        "{err}"
    );
}

/// The backend's row operations one by one against the CPU backend's, on shapes the fixture
/// models do not reach: a single value, widths just past a block of threads (257, 1000, 3000),
/// a width above the largest block, products with one output column, KV stores of a width
/// with a partial fp8 block. Float32 results within 1e-5 (relative L2; the order of a sum may
/// differ); KV stores read back bit for bit (both round the same float32 values the same way).
#[test]
fn row_operations_match_the_cpu_backend_at_edge_shapes() {
    let Some(cuda) = gpu("row_operations_match_the_cpu_backend_at_edge_shapes") else {
        return;
    };
    let mut noise = noise(11);
    let close = |what: &str, want: Vec<f32>, got: Vec<f32>| {
        assert_eq!(want.len(), got.len(), "{what}: sizes");
        let err = rel_l2(&want, &got);
        assert!(err < 1e-5, "{what}: relative L2 {err:.2e}");
    };
    for (rows, cols) in [(1, 1), (3, 33), (2, 257), (5, 1000), (1, 3000)] {
        let x = noise(rows * cols);
        let (w, bias) = (noise(cols), noise(cols));
        let on_cpu = Cpu.tensor(rows, cols, x.clone());
        let on_gpu = cuda.tensor(rows, cols, x.clone());
        let case = format!("[{rows}, {cols}]");
        close(
            &format!("rms_norm {case}"),
            Cpu.to_host(&Cpu.rms_norm(&on_cpu, &Cpu.tensor(1, cols, w.clone()), 1e-6)),
            cuda.to_host(&cuda.rms_norm(&on_gpu, &cuda.tensor(1, cols, w.clone()), 1e-6)),
        );
        close(
            &format!("layer_norm {case}"),
            Cpu.to_host(&Cpu.layer_norm(
                &on_cpu,
                &Cpu.tensor(1, cols, w.clone()),
                &Cpu.tensor(1, cols, bias.clone()),
                1e-6,
            )),
            cuda.to_host(&cuda.layer_norm(
                &on_gpu,
                &cuda.tensor(1, cols, w.clone()),
                &cuda.tensor(1, cols, bias.clone()),
                1e-6,
            )),
        );
        let (start, len) = (cols / 3, cols - cols / 3);
        close(
            &format!("columns {case}"),
            Cpu.to_host(&Cpu.columns(&on_cpu, start, len)),
            cuda.to_host(&cuda.columns(&on_gpu, start, len)),
        );
        for out in [1, 17, 300] {
            let weight = noise(out * cols);
            let weight = || Matrix::from_f32(out, cols, weight.clone());
            close(
                &format!("linear {case} -> {out}"),
                Cpu.to_host(&Cpu.linear(&on_cpu, &Cpu.upload(weight()).unwrap())),
                cuda.to_host(&cuda.linear(&on_gpu, &cuda.upload(weight()).unwrap())),
            );
        }
        // A pool of 9 rows; the rows written to scattered slots, read back in another order.
        let slots: Vec<usize> = (0..rows).map(|r| (r * 5 + 2) % 9).collect();
        let read: Vec<usize> = slots.iter().rev().copied().collect();
        for dtype in [
            KvDtype::Float32,
            KvDtype::Bfloat16,
            KvDtype::Fp8,
            KvDtype::Fp8Ue8m0,
        ] {
            let mut a = Cpu.kv_store(9, cols, dtype).unwrap();
            Cpu.write_rows(&mut a, &slots, &on_cpu);
            let mut b = cuda.kv_store(9, cols, dtype).unwrap();
            cuda.write_rows(&mut b, &slots, &on_gpu);
            let (want, got) = (
                Cpu.to_host(&Cpu.gather_rows(&a, &read)),
                cuda.to_host(&cuda.gather_rows(&b, &read)),
            );
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(w, g)| w.to_bits() == g.to_bits()),
                "{dtype:?} store {case}: rows read back differ"
            );
        }
    }
    // The indexer's Hadamard rotation of every `dim` values of a row: heads of 128 (the
    // model's), one value, and a width past the kernel's threads (2048 = 16 passes of 64).
    for (rows, cols, dim) in [
        (3, 64 * 128, 128),
        (2, 128, 128),
        (4, 8, 1),
        (1, 4096, 2048),
    ] {
        let x = noise(rows * cols);
        let (mut on_cpu, mut on_gpu) = (
            Cpu.tensor(rows, cols, x.clone()),
            cuda.tensor(rows, cols, x),
        );
        Cpu.hadamard(&mut on_cpu, dim);
        cuda.hadamard(&mut on_gpu, dim);
        close(
            &format!("hadamard [{rows}, {cols}] by {dim}"),
            Cpu.to_host(&on_cpu),
            cuda.to_host(&on_gpu),
        );
    }
}

/// The `v32_sparse_moe` fixture on `cuda` with the indexer keeping 8 keys, so that
/// [`paged_run`]'s sequences outgrow it.
fn sparse_moe_top8(cuda: &Cuda, attention: AttentionMode) -> Model<Cuda> {
    let options = ModelOptions {
        index_topk: Some(8),
        attention,
        ..ModelOptions::default()
    };
    Model::load(&fixture("v32_sparse_moe"), cuda.clone(), options).unwrap()
}

/// Each output of `got` is `want`'s, bit for bit (`case` says what differs between them).
fn assert_same_bits(want: &[Vec<f32>], got: &[Vec<f32>], case: &str) {
    assert_eq!(want.len(), got.len(), "{case}: outputs");
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        assert!(
            w.len() == g.len() && w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case}: output {i} differs"
        );
    }
}

/// The indexer's picks kept on the device (`Cuda::keep_picks`, `indexer_keep_paged`) and read
/// there by the attention give the logits, bit for bit, of the picks copied to the host and
/// the attention's key lists copied back, through prefill chunks (rows with fewer than k keys
/// among them) and decode steps of two sequences in one pool, for each KV dtype, with fewer
/// copies to the device. With `--attention auto` the chunk whose rows cross `dense_below`
/// lists its picks on the host (its early rows attend to every key), and the steps after it
/// keep them.
#[test]
fn kept_picks_give_the_logits_of_listed_picks() {
    let Some(cuda) = gpu("kept_picks_give_the_logits_of_listed_picks") else {
        return;
    };
    // One launch a layer in each of the 10 steps after the first (the first sequence has more
    // than k tokens from its second prefill chunk on; the second sequence joins its launch in
    // the last 3 steps, when it has too); with auto attention from 12 tokens on, not in the
    // second step, whose chunk (positions 7 to 13) crosses it.
    for (attention, kept_steps) in [
        (AttentionMode::Sparse, 10),
        (AttentionMode::Auto { dense_below: 12 }, 9),
    ] {
        let gpu = sparse_moe_top8(&cuda, attention);
        for dtype in [KvDtype::Float32, KvDtype::Bfloat16, KvDtype::Fp8] {
            kept_against_listed(&cuda, &gpu, dtype, kept_steps, &format!("{attention:?}"));
        }
    }
    cuda.keep_picks(true);
}

/// [`kept_picks_give_the_logits_of_listed_picks`] for one model and KV dtype: `kept_steps` of
/// [`paged_run`]'s steps keep their picks.
fn kept_against_listed(
    cuda: &Cuda,
    gpu: &Model<Cuda>,
    dtype: KvDtype,
    kept_steps: u64,
    mode: &str,
) {
    let case = format!("{mode}, {dtype:?}");
    let mut runs = Vec::new();
    for keep in [false, true] {
        cuda.keep_picks(keep);
        let (copies, _) = cuda.upload_counts();
        let kept = cuda.kept_pick_launches();
        let logits = paged_run(gpu, dtype);
        let (after, _) = cuda.upload_counts();
        runs.push((logits, after - copies, cuda.kept_pick_launches() - kept));
    }
    let [(want, listed_copies, none), (got, kept_copies, kept)] = &runs[..] else {
        unreachable!("two runs")
    };
    eprintln!(
        "{case}: {listed_copies} copies listing the picks, {kept_copies} keeping them ({kept} \
         attention launches read kept picks)"
    );
    assert_eq!(*none, 0, "{case}: kept picks read with keep_picks off");
    let layers = gpu.config.num_layers as u64;
    assert_eq!(
        *kept,
        kept_steps * layers,
        "{case}: launches that read kept picks"
    );
    assert!(
        kept_copies < listed_copies,
        "{case}: {kept_copies} copies keeping the picks, {listed_copies} without"
    );
    assert_same_bits(want, got, &format!("{case}, the picks kept"));
}

/// Read-only arrays a step gives every layer (RoPE angles, cache slots, the indexer's block
/// tables, attention offsets and dense keys) are copied to the device once and then reused
/// (`Cuda::reuse_uploads`): the same logits, bit for bit, as copying each array every time it
/// is used, with far fewer copies.
#[test]
fn repeated_uploads_are_copied_once() {
    let Some(cuda) = gpu("repeated_uploads_are_copied_once") else {
        return;
    };
    let gpu = sparse_moe_top8(&cuda, AttentionMode::Sparse);
    let mut runs = Vec::new();
    for reuse in [false, true] {
        cuda.reuse_uploads(reuse);
        let (copies, reused) = cuda.upload_counts();
        let logits = paged_run(&gpu, KvDtype::Bfloat16);
        let (after, reused_after) = cuda.upload_counts();
        runs.push((logits, after - copies, reused_after - reused));
    }
    let [(want, copied_each_time, none), (got, copied, reused)] = &runs[..] else {
        unreachable!("two runs")
    };
    let steps_layers = 11 * gpu.config.num_layers as u64;
    eprintln!(
        "uploads a layer a step: {:.1} copying each time, {:.1} reusing ({:.1} reused)",
        *copied_each_time as f64 / steps_layers as f64,
        *copied as f64 / steps_layers as f64,
        *reused as f64 / steps_layers as f64,
    );
    assert_eq!(*none, 0, "nothing is reused with reuse off");
    assert_eq!(
        copied + reused,
        *copied_each_time,
        "every array is copied or reused"
    );
    assert!(
        copied * 2 < *copied_each_time,
        "{copied} copies reusing, {copied_each_time} without"
    );
    assert_same_bits(want, got, "uploads reused");
}

/// Fixture model `name` with its large weights as fp8, and as the bf16 values those stand for
/// ([`support::fp8_and_dequantised`]).
fn fp8_and_bf16(name: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    support::fp8_and_dequantised(name, |values| {
        let bits = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        (safetensors::Dtype::BF16, bits)
    })
}

/// An `n × k` fp8 weight of random e4m3 codes (any but the NaNs) and block scales of
/// DeepSeek's size.
fn random_fp8(rand: &mut impl FnMut(usize) -> Vec<f32>, n: usize, k: usize) -> Matrix {
    let codes: Vec<u8> = rand(n * k)
        .into_iter()
        .map(|v| match ((v + 0.5) * 256.0) as u8 {
            c if c & 0x7f == 0x7f => 0x3e,
            c => c,
        })
        .collect();
    let scale_inv: Vec<f32> = rand(n.div_ceil(128) * k.div_ceil(128))
        .into_iter()
        .map(|v| 0.001 + (v + 0.5) * 0.004)
        .collect();
    Matrix::from_fp8(n, k, codes, scale_inv)
}

/// A MoE layer routed on the device (`Backend::moe_routed`: `moe_route_f32`, `moe_expert_slots`,
/// the grouped products over every expert, `combine_rows`) against the same layer routed on
/// the host by `moe::route` and run by `moe_experts`, for routing rules from one group to
/// DeepSeek-V3's (256 experts in 8 groups, 4 kept, top 8), with and without normalised
/// weights, and 512 experts (the kernels' limit), with fp8 experts (`fp8_grouped_tc`) and, for
/// three of the rules, bf16 experts (`bf16_grouped_tc`, at widths it reads value by value):
/// the same experts chosen (the counts
/// added to the load's row, and only to it; the load made by the call when the step has none
/// yet), and the same outputs within float32 rounding (the device's `expf` may round the
/// sigmoid differently; on the emulator they are the same bits). Rows of NaN and infinite
/// logits route without fault, to the host's experts. fp8 experts route on the device at any
/// rows (300 rows: experts with several 64-row tiles each, and top-8 pairs over more than one
/// of `moe_expert_slots`' 256-pair tiles). bf16 experts past `in_place_rows` route on the
/// device too where their widths suit cuBLAS (multiples of 8): their counts come back to the
/// host (one copy), and experts of at most `in_place_rows` rows still run in place, more on
/// cuBLAS's grouped products, as the host's routing would run them. Other widths past
/// `in_place_rows` are left to the host, and so are experts of mixed dtypes.
/// How far a row of router logits is from a tie where the router draws its lines: between
/// the last group kept and the first dropped (by the sum of a group's top two biased scores),
/// and between the last expert chosen from the kept groups and the next (in float64).
fn routing_margin(logits: &[f32], bias: &[f32], r: &sparsemoe_engine::moe::RouterConfig) -> f64 {
    let biased: Vec<f64> = logits
        .iter()
        .zip(bias)
        .map(|(&l, &b)| 1.0 / (1.0 + (-f64::from(l)).exp()) + f64::from(b))
        .collect();
    let descending = |v: &mut Vec<(f64, usize)>| v.sort_by(|a, b| b.0.total_cmp(&a.0));
    let gap = |v: &[(f64, usize)], keep: usize| match keep < v.len() {
        true => v[keep - 1].0 - v[keep].0,
        false => f64::INFINITY,
    };
    let size = r.n_experts / r.n_group;
    let mut groups: Vec<(f64, usize)> = (0..r.n_group)
        .map(|g| {
            let mut group: Vec<(f64, usize)> = biased[g * size..(g + 1) * size]
                .iter()
                .map(|&s| (s, 0))
                .collect();
            descending(&mut group);
            (group[0].0 + group.get(1).map_or(0.0, |s| s.0), g)
        })
        .collect();
    descending(&mut groups);
    let mut candidates: Vec<(f64, usize)> = groups[..r.topk_group]
        .iter()
        .flat_map(|&(_, g)| (g * size..(g + 1) * size).map(|e| (biased[e], e)))
        .collect();
    descending(&mut candidates);
    let groups_gap = match r.n_group > 1 {
        true => gap(&groups, r.topk_group),
        false => f64::INFINITY,
    };
    groups_gap.min(gap(&candidates, r.top_k))
}

#[test]
fn routing_on_the_device_matches_the_host() {
    use sparsemoe_engine::backend::{Expert, Routing};
    use sparsemoe_engine::moe::{RouterConfig, route};
    let test = "routing_on_the_device_matches_the_host";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    let mut rand = noise(29);
    let (hidden, inter) = (64, 32);
    // (experts, top-k, groups, groups kept, normalised, scale, expert weights).
    let rules = [
        (8, 2, 4, 2, true, 2.5, "fp8"),
        (8, 2, 4, 2, true, 2.5, "bf16"),
        (16, 2, 1, 1, false, 1.0, "fp8"),
        (64, 6, 8, 3, false, 1.5, "fp8"),
        (64, 6, 8, 3, false, 1.5, "bf16"),
        (256, 8, 8, 4, true, 2.5, "fp8"),
        (256, 8, 8, 4, true, 2.5, "bf16"),
        (512, 8, 16, 4, true, 2.5, "fp8"),
        // bf16 widths cuBLAS takes: at 300 rows, about 75 rows an expert (cuBLAS) and about 9
        // (in place); at 65, about 16 and 2 (in place).
        (8, 2, 4, 2, true, 2.5, "bf16 x8"),
        (256, 8, 8, 4, true, 2.5, "bf16 x8"),
    ];
    for (n_experts, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, dtype) in
        rules
    {
        // bf16: widths not a multiple of 4, so bf16_grouped_tc reads the values one by one.
        let (hidden, inter) = if dtype == "bf16" {
            (66, 30)
        } else {
            (hidden, inter)
        };
        let router = RouterConfig {
            n_experts,
            top_k,
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        };
        // fp8 weights stay fp8 under bf16; float32 ones are rounded to bf16 at upload.
        // Each weight on the GPU, and as the CPU backend holds it (a reference that shares
        // no kernel with the GPU's two ways).
        let mut weight = |n: usize, k: usize| {
            let matrix = match dtype {
                "fp8" => random_fp8(&mut rand, n, k),
                _ => Matrix::from_f32(n, k, rand(n * k).iter().map(|v| v * 0.2).collect()),
            };
            (
                cuda.upload(matrix.clone()).unwrap(),
                Cpu.upload(matrix).unwrap(),
            )
        };
        let (experts, cpu_experts): (Vec<Expert<_>>, Vec<Expert<_>>) = (0..n_experts)
            .map(|_| {
                let (gate, up, down) = (
                    weight(inter, hidden),
                    weight(inter, hidden),
                    weight(hidden, inter),
                );
                (
                    Expert {
                        gate: gate.0,
                        up: up.0,
                        down: down.0,
                    },
                    Expert {
                        gate: gate.1,
                        up: up.1,
                        down: down.1,
                    },
                )
            })
            .unzip();
        let bias: Vec<f32> = rand(n_experts).iter().map(|b| b * 0.2).collect();
        let bias_row = cuda.tensor(1, n_experts, bias.clone());
        // (rows, whether row 0's logits hold a NaN and infinities, whether the step's load is
        // still to be made).
        let cases = [
            (1, false, false),
            (5, false, true),
            (64, false, false),
            (65, false, false),
            (300, false, false),
            (6, true, false),
        ];
        for (rows, poisoned, fresh) in cases {
            let case = format!(
                "{dtype} {n_experts} experts, top {top_k}, {topk_group} of {n_group} groups, \
                 {rows} rows{}",
                if poisoned {
                    ", NaN and infinite logits"
                } else {
                    ""
                }
            );
            let x_host = rand(rows * hidden);
            let x = cuda.tensor(rows, hidden, x_host.clone());
            let mut logits_host: Vec<f32> =
                rand(rows * n_experts).iter().map(|v| v * 6.0).collect();
            // The GPU's expf may differ from the host's exp by an ulp or two: a row that near
            // a tie could rightly choose differently, so rows are drawn until none is.
            for row in logits_host.chunks_mut(n_experts) {
                while routing_margin(row, &bias, &router) < 1e-4 {
                    let fresh: Vec<f32> = rand(n_experts).iter().map(|v| v * 6.0).collect();
                    row.copy_from_slice(&fresh);
                }
            }
            if poisoned {
                // Row 0 all NaN; row 1 a NaN and infinities among numbers.
                logits_host[..n_experts].fill(f32::NAN);
                logits_host[n_experts..n_experts + 3].copy_from_slice(&[
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                ]);
            }
            let logits = cuda.tensor(rows, n_experts, logits_host.clone());
            let base = if fresh { 0.0 } else { 1.0 };
            let mut routing = Routing::default();
            let mut counts = vec![base; 3 * n_experts];
            for row in logits_host.chunks(n_experts) {
                let (ids, weights) = route(row, &bias, &router);
                for &e in &ids {
                    counts[n_experts + e] += 1.0;
                }
                routing.experts.push(ids);
                routing.weights.push(weights);
            }
            // The most rows an expert has: past in_place_rows (64), bf16 experts run on cuBLAS.
            let most = (0..n_experts)
                .map(|e| {
                    routing
                        .experts
                        .iter()
                        .filter(|ids| ids.contains(&e))
                        .count()
                })
                .max()
                .unwrap_or(0);
            let bf16_launches = cuda.bf16_grouped_products();
            let want = cuda.to_host(&cuda.moe_experts(&x, &routing, &experts));
            if !poisoned {
                // The host's routing on the GPU against the CPU backend: within bf16 rounding
                // (the GPU's products read x, the SiLU-and-mul outputs and, for float32
                // weights, the weights rounded to bf16; the CPU's keep float32).
                let x_cpu = Cpu.tensor(rows, hidden, x_host.clone());
                let cpu = Cpu.to_host(&Cpu.moe_experts(&x_cpu, &routing, &cpu_experts));
                let err = rel_l2(&cpu, &want);
                eprintln!("{test}: {case}: against the CPU backend: relative L2 {err:.2e}");
                assert!(
                    err < 1e-2,
                    "{case}: against the CPU backend: relative L2 {err:.2e}"
                );
            }
            let mut load = (!fresh).then(|| cuda.tensor(3, n_experts, vec![1.0; 3 * n_experts]));
            let (before, reads) = (cuda.routed_on_device(), cuda.host_reads());
            let got = cuda.moe_routed(
                &x,
                &logits,
                &bias_row,
                &router,
                &experts,
                &mut load,
                (1, 3),
                None,
            );
            let by_counts = dtype == "bf16 x8" && rows > 64;
            let on_device = dtype == "fp8" || rows <= 64 || by_counts;
            let Some(got) = got else {
                assert!(!on_device, "{case}: not routed on the device");
                assert_eq!(cuda.routed_on_device(), before, "{case}");
                let load = load.as_ref().map(|load| cuda.to_host(load));
                assert_eq!(
                    load,
                    Some(counts.iter().map(|_| 1.0).collect()),
                    "{case}: load changed"
                );
                continue;
            };
            assert!(
                on_device,
                "{case}: bf16 routed on the device past in_place_rows"
            );
            assert_eq!(cuda.routed_on_device(), before + 1, "{case}");
            // Only bf16 experts past in_place_rows read their counts back.
            assert_eq!(
                cuda.host_reads() - reads,
                u64::from(by_counts),
                "{case}: copies to the host"
            );
            // Three grouped launches each way (gate, up, down), on bf16_grouped_tc for bf16
            // experts of at most 64 rows, on cuBLAS for more.
            assert_eq!(
                cuda.bf16_grouped_products() - bf16_launches,
                if dtype != "fp8" && most <= 64 { 6 } else { 0 },
                "{case}: bf16_grouped_tc launches (at most {most} rows an expert)"
            );
            let load = cuda.to_host(load.as_ref().expect("the load, made by the routed layer"));
            let got = cuda.to_host(&got);
            assert_eq!(load, counts, "{case}: the experts' counts");
            if poisoned {
                // Rows 0 and 1 chose a NaN-scored expert: their outputs are NaN both ways (a NaN
                // ranks the same on the GPU as on the host, whatever its sign: `moe::canonical`).
                let nan_rows = |v: &[f32]| -> Vec<bool> {
                    v.chunks(hidden)
                        .map(|r| r.iter().any(|x| x.is_nan()))
                        .collect()
                };
                assert_eq!(nan_rows(&want), nan_rows(&got), "{case}: NaN rows");
                let err = rel_l2(&want[2 * hidden..], &got[2 * hidden..]);
                eprintln!("{test}: {case}: rows 2.. relative L2 {err:.2e}");
                assert!(err < 1e-6, "{case}: rows 2..: relative L2 {err:.2e}");
                continue;
            }

            let err = rel_l2(&want, &got);
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            eprintln!("{test}: {case}: relative L2 {err:.2e} (same bits: {same})");
            assert!(err < 1e-6, "{case}: relative L2 {err:.2e}");
        }
    }

    // fp8 experts but one bf16: no one kernel runs them all, so the host routes.
    let router = RouterConfig {
        n_experts: 4,
        top_k: 2,
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
    };
    let experts: Vec<Expert<_>> = (0..4)
        .map(|e| {
            let mut weight = |n: usize, k: usize| match e {
                2 => Matrix::from_f32(n, k, rand(n * k)),
                _ => random_fp8(&mut rand, n, k),
            };
            Expert {
                gate: cuda.upload(weight(inter, hidden)).unwrap(),
                up: cuda.upload(weight(inter, hidden)).unwrap(),
                down: cuda.upload(weight(hidden, inter)).unwrap(),
            }
        })
        .collect();
    let x = cuda.tensor(2, hidden, rand(2 * hidden));
    let logits = cuda.tensor(2, 4, rand(8));
    let bias = cuda.tensor(1, 4, vec![0.0; 4]);
    let mut load = None;
    let routed = cuda.moe_routed(
        &x,
        &logits,
        &bias,
        &router,
        &experts,
        &mut load,
        (0, 1),
        None,
    );
    assert!(
        routed.is_none(),
        "mixed fp8 and bf16 experts routed on the device"
    );
    assert!(
        load.is_none(),
        "a load made for a layer not routed on the device"
    );
}

/// A layer of bf16 experts routed on the device past `in_place_rows` whose cuBLAS grouped
/// product is refused (`refuse_next_grouped_product`, as cuBLAS refuses one) still gives the
/// layer's outputs: each expert's products one at a time, the same as the host routing's
/// expert-by-expert path, with the experts counted once; later layers route on the host.
#[test]
fn a_refused_grouped_product_runs_the_layer_expert_by_expert() {
    use sparsemoe_engine::backend::{Expert, Routing};
    use sparsemoe_engine::moe::{RouterConfig, route};
    let test = "a_refused_grouped_product_runs_the_layer_expert_by_expert";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    let mut rand = noise(31);
    let (hidden, inter, n_experts, rows) = (64, 32, 8, 300);
    let router = RouterConfig {
        n_experts,
        top_k: 2,
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let mut weight = |n: usize, k: usize| {
        let values = rand(n * k).iter().map(|v| v * 0.2).collect();
        cuda.upload(Matrix::from_f32(n, k, values)).unwrap()
    };
    let experts: Vec<Expert<_>> = (0..n_experts)
        .map(|_| Expert {
            gate: weight(inter, hidden),
            up: weight(inter, hidden),
            down: weight(hidden, inter),
        })
        .collect();
    let bias: Vec<f32> = rand(n_experts).iter().map(|b| b * 0.2).collect();
    let logits_host: Vec<f32> = rand(rows * n_experts).iter().map(|v| v * 6.0).collect();
    let x = cuda.tensor(rows, hidden, rand(rows * hidden));
    let (logits, bias_row) = (
        cuda.tensor(rows, n_experts, logits_host.clone()),
        cuda.tensor(1, n_experts, bias.clone()),
    );
    let mut routing = Routing::default();
    let mut counts = vec![0.0; n_experts];
    for row in logits_host.chunks(n_experts) {
        let (ids, weights) = route(row, &bias, &router);
        ids.iter().for_each(|&e| counts[e] += 1.0);
        routing.experts.push(ids);
        routing.weights.push(weights);
    }
    // About 75 rows an expert: past in_place_rows (64), so cuBLAS's turn.
    assert!(counts.iter().any(|&c| c > 64.0), "{counts:?}");
    cuda.refuse_next_grouped_product();
    let mut load = None;
    let layer = |load: &mut Option<_>| {
        cuda.moe_routed(
            &x,
            &logits,
            &bias_row,
            &router,
            &experts,
            load,
            (0, 1),
            None,
        )
    };
    let got = layer(&mut load).expect("routed on the device");
    assert!(!cuda.experts_grouped(), "the refusal turned grouping off");
    assert_eq!(
        cuda.to_host(load.as_ref().unwrap()),
        counts,
        "the experts' counts"
    );
    // The host routing's expert-by-expert path, now that grouping is off.
    let want = cuda.to_host(&cuda.moe_experts(&x, &routing, &experts));
    let err = rel_l2(&want, &cuda.to_host(&got));
    eprintln!("{test}: against the host routing, expert by expert: relative L2 {err:.2e}");
    assert!(err < 1e-6, "relative L2 {err:.2e}");
    assert!(
        layer(&mut None).is_none(),
        "a layer routed on the device after the refusal"
    );
}

/// A model whose routed experts are fp8 routes every step's MoE layers on the device (the
/// prefill chunks of `paged_run` too), and the same model with bf16 weights those of steps of
/// at most `in_place_rows` rows (its decode steps): the same logits as routing every layer on
/// the host (within float32 rounding; the same bits on the emulator), the same expert counts,
/// and a copy to the host saved per layer routed on the device, less one a step for reading
/// back the step's counts.
#[test]
fn decode_steps_route_on_the_device() {
    let test = "decode_steps_route_on_the_device";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    let (fp8, bf16) = fp8_and_bf16("v32_sparse_moe");
    // paged_run's 2 prefill steps have 8 rows, its 9 decode steps 2.
    cuda.in_place_rows(4);
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    for (weights, dir) in [("fp8", fp8.path()), ("bf16", bf16.path())] {
        let mut runs = Vec::new();
        let mut moe_layers = 0;
        for on_device in [false, true] {
            cuda.route_on_device(on_device);
            let model = Model::load(dir, cuda.clone(), options.clone()).unwrap();
            moe_layers = model.config.moe_layers.iter().filter(|&&moe| moe).count() as u64;
            let (reads, routed) = (cuda.host_reads(), cuda.routed_on_device());
            let logits = paged_run(&model, KvDtype::Bfloat16);
            let load = model.expert_load().snapshot();
            runs.push((
                logits,
                load,
                cuda.host_reads() - reads,
                cuda.routed_on_device() - routed,
            ));
        }
        cuda.route_on_device(true);
        let [
            (want, host_load, host_reads, none),
            (got, device_load, reads, routed),
        ] = &runs[..]
        else {
            unreachable!("two runs")
        };
        eprintln!(
            "{test}: {weights} experts: {routed} MoE layers routed on the device; {host_reads} \
             copies to the host routing on the host, {reads} on the device"
        );
        assert_eq!(
            *none, 0,
            "{weights}: routed on the device with route_on_device off"
        );
        // Every step routes on the device; the bf16 experts' 2 prefill steps, past
        // in_place_rows, read each MoE layer's expert counts back.
        let steps = 11;
        let by_counts = if weights == "bf16" { 2 * moe_layers } else { 0 };
        assert_eq!(
            *routed,
            steps * moe_layers,
            "{weights}: the MoE layers of {steps} steps"
        );
        assert_eq!(
            *reads,
            host_reads - routed + steps + by_counts,
            "{weights}: copies to the host"
        );
        assert_eq!(device_load, host_load, "{weights}: the expert counts");
        assert!(
            host_load.iter().flatten().sum::<u64>() > 0,
            "{weights}: no expert counted"
        );
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            let err = rel_l2(w, g);
            assert!(err < 1e-5, "{weights}: output {i}: relative L2 {err:.2e}");
        }
        let same = want
            .iter()
            .zip(got)
            .all(|(w, g)| w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()));
        eprintln!("{test}: {weights} experts: logits the same bits: {same}");
    }
}

/// CUDA graphs of the MLP blocks: `paged_run`'s 9 decode steps have 2 rows, its 2 prefill
/// steps 8. With `graph_rows(2)`, each layer's block runs as it is in the first decode step,
/// is captured in the second and replayed from then on; prefill steps, past the limit, never
/// are. A graph launches the same kernels on the same values, so the logits and the expert
/// counts must be those of the run without graphs to the bit, for fp8 and bf16 experts. With
/// the routing on the host (its logits copied to the host every step), the MoE layers' blocks
/// are never captured, the dense layers' still are.
#[test]
fn mlp_blocks_replay_as_cuda_graphs() {
    let test = "mlp_blocks_replay_as_cuda_graphs";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    let (fp8, bf16) = fp8_and_bf16("v32_sparse_moe");
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let run = |dir: &std::path::Path, rows: usize| {
        cuda.graph_rows(rows);
        let model = Model::load(dir, cuda.clone(), options.clone()).unwrap();
        let before = cuda.graph_counts();
        let logits = paged_run(&model, KvDtype::Bfloat16);
        let counts = cuda.graph_counts() - before;
        let layers = model.config.num_layers as u64;
        let moe = model.config.moe_layers.iter().filter(|&&m| m).count() as u64;
        (logits, model.expert_load().snapshot(), counts, layers, moe)
    };
    for (weights, dir) in [("fp8", fp8.path()), ("bf16", bf16.path())] {
        cuda.route_on_device(true);
        let (want, want_load, none, ..) = run(dir, 0);
        assert_eq!(none, GraphCounts::default(), "{weights}: graphs while off");
        let (got, load, counts, layers, moe) = run(dir, 2);
        eprintln!("{test}: {weights} experts, {layers} layers ({moe} MoE): {counts:?}");
        assert!(
            moe > 0 && moe < layers,
            "{weights}: the fixture mixes dense and MoE layers"
        );
        assert_same_bits(&want, &got, &format!("{weights} experts with graphs"));
        assert_eq!(load, want_load, "{weights}: the expert counts with graphs");
        assert_eq!(
            counts,
            GraphCounts {
                captured: layers,
                replayed: 8 * layers,
                ..GraphCounts::default()
            },
            "{weights}: every layer captured in the second decode step, replayed from it on"
        );

        cuda.route_on_device(false);
        let (want, want_load, ..) = run(dir, 0);
        let (got, load, counts, ..) = run(dir, 2);
        assert_same_bits(
            &want,
            &got,
            &format!("{weights} experts routed on the host"),
        );
        assert_eq!(
            load, want_load,
            "{weights}: the host's expert counts with graphs"
        );
        let dense = layers - moe;
        assert_eq!(
            counts,
            GraphCounts {
                captured: dense,
                replayed: 8 * dense,
                ..GraphCounts::default()
            },
            "{weights}: only the dense layers' blocks, which copy nothing to the host"
        );
    }
    cuda.route_on_device(true);
    cuda.graph_rows(0);
    // `/metrics` exports the lane's counters as they stand.
    let metrics = sparsemoe_engine::metrics::Metrics::new();
    metrics.set_graph_counts(
        cuda.graph_counts_source()
            .expect("the CUDA backend's graphs"),
    );
    let total = cuda.graph_counts();
    assert!(total.replayed > 0);
    let text = metrics.render();
    for (name, value) in [
        ("captures", total.captured),
        ("replays", total.replayed),
        ("spoiled_captures", total.spoiled),
        ("ungraphed_blocks", total.eager),
    ] {
        let line = format!("sparsemoe_cuda_graph_{name}_total {value}\n");
        assert!(text.contains(&line), "{line:?} missing from:\n{text}");
    }
}

/// A capture that needs a copy is spoiled, not launched: one sequence decodes a token a step
/// with `graph_rows(1)`, and the lane forgets its cached uploads (`forget_uploads`, as an
/// eviction would) before some decode steps, so a MoE block captured in that step finds its
/// experts' address table gone and would copy it. That capture is dropped, the block runs as it
/// is, and it is captured again after a clean run; spoiled three times, it runs without a
/// graph for good. The dense layers' blocks, which read no cached upload, are captured in the
/// second decode step either way. The logits must be those of the same steps without graphs.
#[test]
fn a_capture_that_needs_a_copy_is_tried_again_then_given_up() {
    let test = "a_capture_that_needs_a_copy_is_tried_again_then_given_up";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    let (_fp8, bf16) = fp8_and_bf16("v32_sparse_moe");
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let prompt: Vec<u32> = (0..8).map(|i| (i * 29 % 250 + 2) as u32).collect();
    let decode = 8;
    // The logits of every step, and the graphs' counts, forgetting uploads before the decode
    // steps (1-based) in `forget`.
    let run = |graph_rows: usize, forget: &[usize]| {
        cuda.graph_rows(graph_rows);
        let model = Model::load(bf16.path(), cuda.clone(), options.clone()).unwrap();
        let before = cuda.graph_counts();
        let mut cache = model.new_cache();
        let mut logits = Vec::new();
        let mut tokens = prompt.clone();
        for step in 0..=decode {
            if forget.contains(&step) {
                cuda.forget_uploads();
            }
            let mut batch = [SeqStep {
                tokens: &tokens,
                cache: &mut cache,
                logits: LogitRows::Last,
            }];
            let out = model.forward(&mut batch, None).unwrap().remove(0);
            tokens = vec![(step as u32 * 53 + 7) % 250 + 2];
            logits.push(out);
        }
        let moe = model.config.moe_layers.iter().filter(|&&m| m).count() as u64;
        let dense = model.config.num_layers as u64 - moe;
        (logits, cuda.graph_counts() - before, moe, dense)
    };
    // Spoiled once: captured after the next clean run (decode step 4), replayed from then on.
    let (want, none, ..) = run(0, &[2]);
    assert_eq!(none, GraphCounts::default(), "graphs while off");
    let (got, counts, moe, dense) = run(1, &[2]);
    eprintln!("{test}: spoiled once: {counts:?} ({moe} MoE, {dense} dense layers)");
    assert!(
        moe > 0 && dense > 0,
        "the fixture mixes dense and MoE layers"
    );
    assert_same_bits(&want, &got, "spoiled once");
    let d = decode as u64;
    assert_eq!(
        counts,
        GraphCounts {
            captured: moe + dense,
            replayed: (d - 1) * dense + (d - 3) * moe,
            spoiled: moe,
            eager: 0,
        },
        "spoiled once"
    );
    // Spoiled three times: given up.
    let (want, ..) = run(0, &[2, 4, 6]);
    let (got, counts, ..) = run(1, &[2, 4, 6]);
    eprintln!("{test}: spoiled three times: {counts:?}");
    assert_same_bits(&want, &got, "spoiled three times");
    assert_eq!(
        counts,
        GraphCounts {
            captured: dense,
            replayed: (d - 1) * dense,
            spoiled: 3 * moe,
            eager: moe,
        },
        "spoiled three times"
    );
    cuda.graph_rows(0);
}

/// `Backend::mlp_block` on the CUDA backend with blocks of the test's own: `h += h` (a copy
/// of `h` added to it) runs, is captured, and is replayed, doubling `h` each time; a block
/// that copies to the host only while it is captured spoils that capture and runs as it is
/// instead; a block that panics while it is captured leaves the stream out of the capture, so
/// the work after it runs (and `h` as it was). Steps of more than `graph_rows` rows are never
/// captured.
#[test]
fn mlp_blocks_are_captured_replayed_spoiled_and_abandoned_safely() {
    let test = "mlp_blocks_are_captured_replayed_spoiled_and_abandoned_safely";
    let Some(cuda) = gpus(test, &[0], Dtype::Bfloat16) else {
        return;
    };
    cuda.graph_rows(4);
    let (rows, cols) = (3, 40);
    let start = noise(7)(rows * cols);
    let twice = |v: &[f32]| v.iter().map(|x| x * 2.0).collect::<Vec<f32>>();
    let id = |layer| BlockId {
        model: u64::MAX,
        layer,
    };
    let doubling = |h: &mut CudaTensor, _: &mut Option<CudaTensor>| {
        let copy = cuda.columns(h, 0, cols);
        cuda.add(h, &copy);
    };

    // Run, captured, replayed: h doubles each time.
    let before = cuda.graph_counts();
    let mut h = cuda.tensor(rows, cols, start.clone());
    let mut want = start.clone();
    for _ in 0..4 {
        cuda.mlp_block(id(0), &mut h, &mut None, &mut |h, l| doubling(h, l));
        want = twice(&want);
        assert_eq!(cuda.to_host(&h), want, "doubled once a call");
    }
    let counts = cuda.graph_counts() - before;
    assert_eq!((counts.captured, counts.replayed), (1, 3), "{counts:?}");

    // More rows than graph_rows: never captured.
    let before = cuda.graph_counts();
    let mut wide = cuda.tensor(5, cols, noise(9)(5 * cols));
    for _ in 0..3 {
        cuda.mlp_block(id(0), &mut wide, &mut None, &mut |h, l| doubling(h, l));
    }
    assert_eq!(cuda.graph_counts() - before, GraphCounts::default());

    // A copy to the host only while captured: spoiled, then run as it is.
    let before = cuda.graph_counts();
    let mut h = cuda.tensor(rows, cols, start.clone());
    let mut calls = 0;
    for _ in 0..2 {
        cuda.mlp_block(id(1), &mut h, &mut None, &mut |h, l| {
            calls += 1;
            if calls == 2 {
                let _ = cuda.to_host(h);
            }
            doubling(h, l)
        });
    }
    assert_eq!(
        cuda.to_host(&h),
        twice(&twice(&start)),
        "a spoiled capture ran as it is"
    );
    let counts = cuda.graph_counts() - before;
    assert_eq!((counts.captured, counts.spoiled), (0, 1), "{counts:?}");
    assert_eq!(calls, 3, "run, captured, run again as it is");

    // A panic while captured: the stream leaves the capture; h is as it was.
    let mut h = cuda.tensor(rows, cols, start.clone());
    let mut calls = 0;
    cuda.mlp_block(id(2), &mut h, &mut None, &mut |h, l| doubling(h, l));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cuda.mlp_block(id(2), &mut h, &mut None, &mut |h, l| {
            calls += 1;
            doubling(h, l);
            panic!("a block that fails while captured");
        })
    }));
    assert!(
        caught.is_err() && calls == 1,
        "the block panicked in its capture"
    );
    assert_eq!(
        cuda.to_host(&h),
        twice(&start),
        "h as the first run left it"
    );
    cuda.mlp_block(id(3), &mut h, &mut None, &mut |h, l| doubling(h, l));
    assert_eq!(cuda.to_host(&h), twice(&twice(&start)), "later work runs");
    cuda.graph_rows(0);
}

/// Expert shards with the routing on the device: on two lanes (each shard's experts only
/// there), then three with redundant copies of hot experts, for fp8 and for bf16 experts, every
/// step of `paged_run` (8 and 2 rows) routes each MoE layer on the main lane and the shards
/// deal themselves their pairs (`moe_shard_pairs`). The logits must be those of the host's
/// routing and dispatch (so every pair was computed once), the expert counts the same, each
/// shard's count of pairs the same (the host counts the device's from the experts' counts), and
/// the only copies to the host that remain are the logits and one read of the counts a step,
/// and, for bf16 experts past `in_place_rows`, each shard lane's read of its experts' offsets.
/// Which shard computed a pair the logits cannot tell: `kernels/gpu_check.py` checks
/// `moe_shard_pairs`' dealing against the rule exactly.
#[test]
fn sharded_steps_route_on_the_device() {
    let test = "sharded_steps_route_on_the_device";
    let (fp8, bf16) = fp8_and_bf16("v32_sparse_moe");
    let config = ModelConfig::from_dir(fp8.path()).unwrap();
    let moe_layers = config.moe_layers.iter().filter(|&&moe| moe).count() as u64;
    let plan_dir = tempfile::tempdir().unwrap();
    let redundant = support::write_redundant_plan(plan_dir.path());
    let setups: [(&[usize], Option<&Path>); 2] = [(&[0, 0], None), (&[0, 0, 0], Some(&redundant))];
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    // paged_run's steps: 2 of 8 rows, then 9 of 2.
    let steps = 11;
    for (ordinals, placement) in setups {
        let Some(cuda) = gpus(test, ordinals, Dtype::Bfloat16) else {
            return;
        };
        // At in_place_rows 8 every step runs in place; at 2 the bf16 experts' prefill steps of 8
        // rows read each shard's expert counts back (and run in place or on cuBLAS from them).
        let cases = [
            ("fp8", fp8.path(), 8),
            ("bf16", bf16.path(), 8),
            ("bf16 past in_place_rows", bf16.path(), 2),
        ];
        // The device runs' bf16_grouped_tc launches: the bf16 case's, then this case's.
        let (mut all_in_place, mut in_place_launches) = (0, 0);
        for (weights, dir, in_place_rows) in cases {
            cuda.in_place_rows(in_place_rows);
            let mut runs = Vec::new();
            for on_device in [false, true] {
                cuda.route_on_device(on_device);
                let shards = ExpertShards::from_options(&config, None, placement, ordinals.len())
                    .unwrap()
                    .map(Arc::new);
                let sharded = ModelOptions {
                    expert_shards: shards.clone(),
                    ..options.clone()
                };
                let model = Model::load(dir, cuda.clone(), sharded).unwrap();
                let (reads, routed) = (cuda.host_reads(), cuda.routed_on_device());
                let in_place = cuda.bf16_grouped_products();
                let logits = paged_run(&model, KvDtype::Bfloat16);
                in_place_launches = cuda.bf16_grouped_products() - in_place;
                runs.push((
                    logits,
                    model.expert_load().snapshot(),
                    shards.unwrap().computed(),
                    cuda.host_reads() - reads,
                    cuda.routed_on_device() - routed,
                ));
            }
            cuda.route_on_device(true);
            let [
                (want, host_load, host_computed, host_reads, none),
                (got, device_load, device_computed, reads, routed),
            ] = &runs[..]
            else {
                unreachable!("two runs")
            };
            let case = format!("{ordinals:?} {weights}");
            eprintln!(
                "{test}: {case}: {routed} MoE layers routed on the device; pairs per shard \
                 {device_computed:?}; {host_reads} copies to the host routing on the host, \
                 {reads} on the device; {in_place_launches} bf16_grouped_tc launches"
            );
            match in_place_rows {
                8 => all_in_place = in_place_launches,
                // Some shard's experts had more rows than 2 at some layer: cuBLAS took them (no
                // lane was refused, so none ran one by one).
                _ => {
                    assert!(
                        in_place_launches < all_in_place,
                        "{case}: no layer of a shard on cuBLAS ({in_place_launches} in-place \
                         launches, {all_in_place} with every step in place)"
                    );
                    assert!(cuda.experts_grouped(), "{case}: a lane ran one by one");
                }
            }
            assert_eq!(
                *none, 0,
                "{case}: routed on the device with route_on_device off"
            );
            assert_eq!(*routed, steps * moe_layers, "{case}: MoE layers routed");
            // Past in_place_rows, each shard's lane reads its counts back at every MoE layer of
            // the 2 prefill steps.
            let by_counts = if in_place_rows < 8 {
                2 * moe_layers * ordinals.len() as u64
            } else {
                0
            };
            assert_eq!(
                *reads,
                host_reads - routed + steps + by_counts,
                "{case}: copies to the host"
            );
            assert_eq!(device_load, host_load, "{case}: the expert counts");
            assert_eq!(device_computed, host_computed, "{case}: pairs per shard");
            assert!(
                device_computed.iter().all(|&c| c > 0),
                "{case}: an idle shard: {device_computed:?}"
            );
            for (i, (w, g)) in want.iter().zip(got).enumerate() {
                let err = rel_l2(w, g);
                assert!(err < 1e-5, "{case}: output {i}: relative L2 {err:.2e}");
            }
        }
    }
}
