//! The built-in demo model (engine/demo-model, embedded at build time when present).

/// The demo model's files.
#[derive(Debug, Clone, Copy)]
pub struct DemoFiles {
    pub config: &'static str,
    pub weights: &'static [u8],
    pub tokenizer: &'static [u8],
    pub tokenizer_config: &'static str,
}

/// The embedded demo model, if this binary was built with engine/demo-model present.
#[cfg(sparsemoe_demo_model)]
pub const DEMO: Option<DemoFiles> = Some(DemoFiles {
    config: include_str!("../demo-model/config.json"),
    weights: include_bytes!("../demo-model/model.safetensors"),
    tokenizer: include_bytes!("../demo-model/tokenizer.json"),
    tokenizer_config: include_str!("../demo-model/tokenizer_config.json"),
});

/// The embedded demo model, if this binary was built with engine/demo-model present.
#[cfg(not(sparsemoe_demo_model))]
pub const DEMO: Option<DemoFiles> = None;

/// The name the demo model is served under.
pub const DEMO_NAME: &str = "sparsemoe-demo";
