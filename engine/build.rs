//! Embeds the built-in demo model (engine/demo-model) when its files are present, so
//! `sparsemoe-engine serve` with no `--model` needs nothing else.

use std::path::Path;

const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sparsemoe_demo_model)");
    println!("cargo::rerun-if-changed=demo-model");
    for f in FILES {
        println!("cargo::rerun-if-changed=demo-model/{f}");
    }
    let dir = Path::new("demo-model");
    if FILES.iter().all(|f| dir.join(f).is_file()) {
        println!("cargo::rustc-cfg=sparsemoe_demo_model");
    }
}
