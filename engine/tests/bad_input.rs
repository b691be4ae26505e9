//! Broken model directories and inputs give errors that name the file, field or tensor;
//! nothing panics. Also: fp8 block-scaled weights load and dequantise exactly.

mod support;

use std::path::Path;

use safetensors::Dtype;
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::model::{Model, ModelOptions};
use support::{Tensors, copy_of, fixture, fp8_and_dequantised, read_tensors, write_tensors};

fn load_err(dir: &Path) -> String {
    match Model::load(dir, Cpu, ModelOptions::default()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Tensors)) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors);
}

#[test]
fn config_problems_name_the_field() {
    let dir = copy_of("v32_sparse_moe");
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("kv_lora_rank");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("kv_lora_rank") && err.contains("missing"),
        "{err}"
    );

    edit_config(dir.path(), |c| c["kv_lora_rank"] = "32".into());
    let err = load_err(dir.path());
    assert!(
        err.contains("kv_lora_rank") && err.contains("integer"),
        "{err}"
    );

    edit_config(dir.path(), |c| {
        c["kv_lora_rank"] = 32.into();
        c["model_type"] = "mixtral".into();
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model_type") && err.contains("mixtral"),
        "{err}"
    );
}

#[test]
fn tensor_problems_name_the_tensor() {
    let dir = copy_of("v32_sparse_moe");
    let victim = "model.layers.1.self_attn.kv_b_proj.weight";
    edit_weights(dir.path(), |t| {
        let entry = t.get_mut(victim).unwrap();
        entry.1 = vec![entry.1[1], entry.1[0]];
    });
    let err = load_err(dir.path());
    assert!(
        err.contains(victim) && err.contains("expected shape"),
        "{err}"
    );

    let dir = copy_of("v32_sparse_moe");
    edit_weights(dir.path(), |t| {
        let entry = t.get_mut("model.norm.weight").unwrap();
        entry.0 = Dtype::I32;
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("unsupported dtype"),
        "{err}"
    );

    let dir = copy_of("v32_sparse_moe");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.0.self_attn.indexer.wk.weight");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("indexer.wk.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn truncated_and_missing_files_are_reported() {
    let dir = copy_of("v32_sparse_moe");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    std::fs::remove_file(&path).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("no *.safetensors"), "{err}");

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
}

/// An untied model without `lm_head.weight` names the directory it looked in; an index whose
/// `weight_map` is empty says so rather than that the directory has no shards.
#[test]
fn a_missing_head_and_an_empty_index_name_where_they_looked() {
    let dir = copy_of("v32_sparse_moe");
    edit_config(dir.path(), |c| c["tie_word_embeddings"] = false.into());
    edit_weights(dir.path(), |t| {
        t.remove("lm_head.weight");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("lm_head.weight")
            && err.contains(&dir.path().display().to_string())
            && err.contains("tie_word_embeddings is false"),
        "{err}"
    );

    let dir = copy_of("v32_sparse_moe");
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {}}"#,
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("names no tensors"),
        "{err}"
    );
}

#[test]
fn out_of_range_tokens_are_rejected_with_the_limit() {
    let model = Model::load(&fixture("v32_sparse_moe"), Cpu, ModelOptions::default()).unwrap();
    let err = model.logits(&[3, 999_999], None).unwrap_err().to_string();
    assert!(err.contains("999999") && err.contains("256"), "{err}");
    let err = model.logits(&[], None).unwrap_err().to_string();
    assert!(err.contains("no new tokens"), "{err}");
}

/// DeepSeek's fp8 format: every projection weight as e4m3 with one f32 `weight_scale_inv` per
/// 128×128 block. The fp8 model must equal an f32 model holding the dequantised weights.
#[test]
fn fp8_block_scaled_weights_dequantise_exactly() {
    let (fp8, dequantised) = fp8_and_dequantised("v32_sparse_moe", |values| {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        (Dtype::F32, bytes)
    });
    let a = Model::load(fp8.path(), Cpu, ModelOptions::default()).unwrap();
    let b = Model::load(dequantised.path(), Cpu, ModelOptions::default()).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 256) as u32).collect();
    let (la, lb) = (
        a.logits(&tokens, None).unwrap(),
        b.logits(&tokens, None).unwrap(),
    );
    let max_diff = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "fp8 vs dequantised f32: {max_diff}");
    assert!(
        a.weight_bytes() < b.weight_bytes(),
        "fp8 files should be smaller"
    );

    // A missing scale tensor is named.
    let victim = "model.layers.0.self_attn.q_a_proj.weight_scale_inv";
    edit_weights(fp8.path(), |t| {
        t.remove(victim);
    });
    let err = load_err(fp8.path());
    assert!(err.contains(victim) && err.contains("missing"), "{err}");
}
