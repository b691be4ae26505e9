//! Engine logits against transformers (float32, CPU) on the tiny random models in
//! tests/fixtures (see its README for how they were made and what each case covers).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::model::{AttentionMode, LogitRows, Model, ModelOptions, SeqStep, Trace};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 7, "conformance fixtures are missing");
    dirs
}

struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn open(dir: &Path) -> Self {
        Self {
            bytes: std::fs::read(dir.join("expected.safetensors")).unwrap(),
        }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn f32s(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let st = self.tensors();
        let view = st.tensor(name).ok()?;
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Some((view.shape().to_vec(), data))
    }

    fn i64s(&self, name: &str) -> Option<(Vec<usize>, Vec<i64>)> {
        let st = self.tensors();
        let view = st.tensor(name).ok()?;
        let data = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Some((view.shape().to_vec(), data))
    }

    fn num_sequences(&self) -> usize {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        meta.metadata().as_ref().unwrap()["num_sequences"]
            .parse()
            .unwrap()
    }

    fn tokens(&self, i: usize) -> Vec<u32> {
        self.i64s(&format!("tokens.{i}"))
            .unwrap()
            .1
            .iter()
            .map(|&t| t as u32)
            .collect()
    }
}

fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax_and_gap(row: &[f32]) -> (usize, f32) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    (idx[0], row[idx[0]] - row[idx[1]])
}

const F32_REL_L2: f64 = 1e-4;

#[test]
fn logits_match_transformers_at_every_position() {
    for dir in cases() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let model = Model::load(&dir, Cpu, ModelOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = Expected::open(&dir);
        let vocab = model.config.vocab_size;
        for i in 0..expected.num_sequences() {
            let tokens = expected.tokens(i);
            let (_, want) = expected.f32s(&format!("logits.{i}")).unwrap();
            let mut trace = Trace::default();
            let got = model.logits(&tokens, Some(&mut trace)).unwrap();
            let err = relative_l2(&got, &want);
            // bf16 weights are upcast exactly, so the f32 bound holds for them too.
            assert!(err <= F32_REL_L2, "{name} seq {i}: relative L2 {err:.2e}");
            for (t, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
                let (want_top, gap) = argmax_and_gap(w);
                if gap > 1e-3 {
                    assert_eq!(
                        argmax_and_gap(g).0,
                        want_top,
                        "{name} seq {i} position {t}: top-1 differs"
                    );
                }
            }
            check_indexer(&name, &expected, i, &trace);
            check_routing(&name, &expected, i, &trace);
            if i == 0 {
                check_hidden(&name, &expected, &trace);
            }
        }
    }
}

fn check_indexer(name: &str, expected: &Expected, seq: usize, trace: &Trace) {
    for (layer, selection) in trace.selections.iter().enumerate() {
        let Some((shape, want)) = expected.i64s(&format!("topk_indices.{seq}.layer{layer}")) else {
            continue;
        };
        let k = shape[1];
        for t in 0..shape[0] {
            let want_set: BTreeSet<u32> = want[t * k..(t + 1) * k]
                .iter()
                .filter(|&&s| s <= t as i64)
                .map(|&s| s as u32)
                .collect();
            let got_set: BTreeSet<u32> = match selection {
                Some(rows) => rows[t].iter().copied().collect(),
                None => (0..=t as u32).collect(),
            };
            assert_eq!(
                got_set, want_set,
                "{name} seq {seq} layer {layer} row {t}: indexer selection"
            );
        }
    }
}

fn check_routing(name: &str, expected: &Expected, seq: usize, trace: &Trace) {
    let mut checked = 0;
    for (layer, routing) in trace.routing.iter().enumerate() {
        let Some(routing) = routing else { continue };
        let (shape, want_ids) = expected
            .i64s(&format!("expert_ids.{seq}.layer{layer}"))
            .unwrap();
        let (_, want_weights) = expected
            .f32s(&format!("expert_weights.{seq}.layer{layer}"))
            .unwrap();
        let k = shape[1];
        for t in 0..shape[0] {
            let ids: Vec<i64> = routing.experts[t].iter().map(|&e| e as i64).collect();
            assert_eq!(
                ids,
                want_ids[t * k..(t + 1) * k],
                "{name} seq {seq} layer {layer} token {t}: experts"
            );
            for (g, w) in routing.weights[t]
                .iter()
                .zip(&want_weights[t * k..(t + 1) * k])
            {
                assert!(
                    (g - w).abs() < 1e-5,
                    "{name} layer {layer} token {t}: weight {g} vs {w}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "{name}: no MoE layer was checked");
}

fn check_hidden(name: &str, expected: &Expected, trace: &Trace) {
    let (_, embed) = expected.f32s("hidden.0.embed").unwrap();
    assert!(
        relative_l2(&trace.hidden[0], &embed) < 1e-6,
        "{name}: embeddings"
    );
    for layer in 0..trace.hidden.len() - 1 {
        let (_, want) = expected.f32s(&format!("hidden.0.layer{layer}")).unwrap();
        let err = relative_l2(&trace.hidden[layer + 1], &want);
        assert!(
            err < F32_REL_L2,
            "{name}: residual after layer {layer}: {err:.2e}"
        );
    }
}

/// Prefill a prefix, then decode one token at a time (absorbed attention over the cache):
/// every decoded position's logits equal the full forward's.
#[test]
fn decode_after_prefill_equals_the_full_forward() {
    for dir in cases() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
        let expected = Expected::open(&dir);
        let seq = expected.num_sequences() - 1;
        let tokens = expected.tokens(seq);
        let tokens = &tokens[..tokens.len().min(80)];
        let full = model.logits(tokens, None).unwrap();
        let vocab = model.config.vocab_size;
        let prefix = tokens.len() / 3;
        let mut cache = model.new_cache();
        let mut step = [SeqStep {
            tokens: &tokens[..prefix],
            cache: &mut cache,
            logits: LogitRows::Last,
        }];
        model.forward(&mut step, None).unwrap();
        for t in prefix..tokens.len() {
            let mut step = [SeqStep {
                tokens: &tokens[t..t + 1],
                cache: &mut cache,
                logits: LogitRows::Last,
            }];
            let got = model.forward(&mut step, None).unwrap().remove(0);
            let err = relative_l2(&got, &full[t * vocab..(t + 1) * vocab]);
            assert!(
                err < F32_REL_L2,
                "{name}: decode at position {t}: relative L2 {err:.2e}"
            );
        }
        assert_eq!(cache.len(), tokens.len());
    }
}

/// `--attention auto`: a row attends densely while its own context is shorter than
/// `dense_below` and sparsely after, however the prompt is chunked. With a threshold above the
/// indexer's top-k, one pass and chunks of 7 give the same logits, and the rows below the
/// threshold equal dense attention's.
#[test]
fn auto_attention_does_not_depend_on_chunking() {
    let dir = fixtures().join("v32_sparse_moe");
    let (topk, dense_below) = (8, 30);
    let load = |attention| {
        let options = ModelOptions {
            attention,
            index_topk: Some(topk),
            ..ModelOptions::default()
        };
        Model::load(&dir, Cpu, options).unwrap()
    };
    let auto = load(AttentionMode::Auto { dense_below });
    let vocab = auto.config.vocab_size;
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let one_pass = auto.logits(&tokens, None).unwrap();

    let mut cache = auto.new_cache();
    let mut chunked = Vec::new();
    for chunk in tokens.chunks(7) {
        let mut step = [SeqStep {
            tokens: chunk,
            cache: &mut cache,
            logits: LogitRows::All,
        }];
        chunked.extend(auto.forward(&mut step, None).unwrap().remove(0));
    }
    for t in 0..tokens.len() {
        let row = t * vocab..(t + 1) * vocab;
        let err = relative_l2(&chunked[row.clone()], &one_pass[row]);
        assert!(
            err < F32_REL_L2,
            "row {t}: chunked vs one pass: relative L2 {err:.2e}"
        );
    }

    let dense = load(AttentionMode::Dense).logits(&tokens, None).unwrap();
    let below = (dense_below - 1) * vocab;
    let err = relative_l2(&one_pass[..below], &dense[..below]);
    assert!(
        err < F32_REL_L2,
        "rows below the threshold vs dense: relative L2 {err:.2e}"
    );
    // The check has teeth: on these rows sparse attention differs from dense.
    let sparse = load(AttentionMode::Sparse).logits(&tokens, None).unwrap();
    let apart = relative_l2(&sparse[..below], &dense[..below]);
    assert!(
        apart > 1e-3,
        "sparse and dense rows differ by only {apart:.2e}"
    );
}

/// Several sequences in one step give the same logits as each alone (continuous batching).
#[test]
fn batched_sequences_match_single_runs() {
    let dir = fixtures().join("v32_sparse_moe");
    let model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
    let expected = Expected::open(&dir);
    let a = expected.tokens(0);
    let b = expected.tokens(1);
    let alone_a = model.logits(&a, None).unwrap();
    let alone_b = model.logits(&b, None).unwrap();
    let (mut ca, mut cb) = (model.new_cache(), model.new_cache());
    let mut batch = [
        SeqStep {
            tokens: &a,
            cache: &mut ca,
            logits: LogitRows::All,
        },
        SeqStep {
            tokens: &b,
            cache: &mut cb,
            logits: LogitRows::Last,
        },
    ];
    let out = model.forward(&mut batch, None).unwrap();
    assert!(relative_l2(&out[0], &alone_a) < 1e-5);
    let vocab = model.config.vocab_size;
    assert!(relative_l2(&out[1], &alone_b[alone_b.len() - vocab..]) < 1e-5);
}
