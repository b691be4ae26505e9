//! Broken model directories and inputs give errors that name the file, field or tensor;
//! nothing panics. Also: fp8 block-scaled weights load and dequantise exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::model::{Model, ModelOptions};
use sparsemoe_engine::weights::fp8_e4m3_to_f32;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of a fixture's config and weights in a temporary directory.
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

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

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> Tensors {
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

fn write_tensors(path: &Path, tensors: &Tensors) {
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

#[test]
fn out_of_range_tokens_are_rejected_with_the_limit() {
    let model = Model::load(&fixture("v32_sparse_moe"), Cpu, ModelOptions::default()).unwrap();
    let err = model.logits(&[3, 999_999], None).unwrap_err().to_string();
    assert!(err.contains("999999") && err.contains("256"), "{err}");
    let err = model.logits(&[], None).unwrap_err().to_string();
    assert!(err.contains("no new tokens"), "{err}");
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

/// DeepSeek's fp8 format: every projection weight as e4m3 with one f32 `weight_scale_inv` per
/// 128×128 block. The fp8 model must equal an f32 model holding the dequantised weights.
#[test]
fn fp8_block_scaled_weights_dequantise_exactly() {
    let fp8 = copy_of("v32_sparse_moe");
    let dequantised = copy_of("v32_sparse_moe");
    let mut fp8_tensors = read_tensors(&fp8.path().join("model.safetensors"));
    let mut f32_tensors = fp8_tensors.clone();
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
        let (_, shape, data) = fp8_tensors[name].clone();
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
        let restored: Vec<u8> = codes
            .iter()
            .enumerate()
            .flat_map(|(i, &q)| (fp8_e4m3_to_f32(q) * scales[block(i)]).to_le_bytes())
            .collect();
        f32_tensors.get_mut(name).unwrap().2 = restored;
        fp8_tensors.insert(name.clone(), (Dtype::F8_E4M3, shape, codes));
        let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        fp8_tensors.insert(
            format!("{name}_scale_inv"),
            (Dtype::F32, vec![brows, bcols], scale_bytes),
        );
    }
    write_tensors(&fp8.path().join("model.safetensors"), &fp8_tensors);
    write_tensors(&dequantised.path().join("model.safetensors"), &f32_tensors);

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
