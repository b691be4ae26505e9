//! The built-in demo model (engine/demo-model) reproduces transformers' greedy output exactly,
//! and our tokenizer and chat template give the same prompt ids as transformers'.

use std::path::Path;

use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::generate::{FinishReason, generate};
use sparsemoe_engine::model::{Model, ModelOptions};
use sparsemoe_engine::sampling::{Sampler, SamplingParams};
use sparsemoe_engine::tokenizer::{ChatMessage, Tokenizer};

/// Generation stops at the model's context, prompt included, with `Length`; a prompt that
/// fills it is refused, saying so.
#[test]
fn generation_stops_at_the_models_context() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-model");
    let mut model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
    model.config.max_position_embeddings = 10;
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let (out, reason) = generate(&model, &[5, 6, 7, 8], 100, &mut sampler, &[], |_| {}).unwrap();
    assert_eq!((out.len(), reason), (6, FinishReason::Length));
    let err = generate(&model, &[5; 10], 1, &mut sampler, &[], |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10 tokens") && err.contains("context"),
        "{err}"
    );
}

/// The demo model's directory, and what transformers gave for it (`reference.json`).
fn demo_and_reference() -> (std::path::PathBuf, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo-model");
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

#[test]
fn greedy_continuations_and_prompt_ids_match_transformers() {
    let (dir, reference) = demo_and_reference();
    let model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let prompt_ids = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let text = case["prompt"].as_str().unwrap();
        let ours = match case["kind"].as_str().unwrap() {
            "chat" => {
                let messages: Vec<ChatMessage> = case["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        ChatMessage::new(
                            m["role"].as_str().unwrap(),
                            m["content"].as_str().unwrap(),
                        )
                    })
                    .collect();
                tokenizer
                    .encode(
                        &tokenizer
                            .apply_chat_template(&messages, true, &Default::default(), &[])
                            .unwrap(),
                    )
                    .unwrap()
            }
            _ => {
                let mut v = vec![tokenizer.bos_token_id().unwrap()];
                v.extend(tokenizer.encode(text).unwrap());
                v
            }
        };
        assert_eq!(ours, prompt_ids, "prompt ids of {text:?}");
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let (got, _) =
            generate(&model, &prompt_ids, want.len(), &mut sampler, &[], |_| {}).unwrap();
        assert_eq!(got, want, "greedy continuation of {text:?}");
    }
}

/// `sparsemoe-engine generate` prints the prompt and then, token by token, the greedy
/// continuation transformers gives: the same text as decoding it whole.
#[test]
fn the_generate_command_prints_the_greedy_continuation() {
    let (dir, reference) = demo_and_reference();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "completion")
        .expect("a completion case");
    let prompt = case["prompt"].as_str().unwrap();
    let want: Vec<u32> = case["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sparsemoe-engine"))
        .args(["generate", "--prompt", prompt, "--max-tokens"])
        .arg(want.len().to_string())
        .arg("--model")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let continuation = tokenizer.decode(&want).unwrap();
    assert!(!continuation.is_empty());
    assert_eq!(printed, format!("{prompt}{continuation}\n"));
}
