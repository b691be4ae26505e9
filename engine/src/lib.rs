//! sparsemoe-engine: DeepSeek-V3.2 / V3 inference (sparse MLA attention + MoE) with a CPU
//! reference backend.

pub mod backend;
pub mod bench;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod linalg;
pub mod model;
pub mod moe;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};
