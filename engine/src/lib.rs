//! sparsemoe-engine: DeepSeek-V3.2 / V3 inference (sparse MLA attention + MoE) with a CPU
//! reference backend.

pub mod api;
pub mod backend;
pub mod bench;
pub mod chat_encoding;
pub mod config;
pub mod demo;
pub mod error;
pub mod expert_load;
pub mod expert_shards;
pub mod generate;
pub mod host_memory;
pub mod json_text;
pub mod kv_cache;
pub mod linalg;
pub mod metrics;
pub mod model;
pub mod moe;
pub mod rope;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod server;
pub mod tokenizer;
pub mod tool_calls;
pub mod weights;

pub use error::{EngineError, Result};
