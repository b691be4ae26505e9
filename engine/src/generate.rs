//! Single-sequence generation: prefill the prompt, then decode until a stop token or the limit.

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::model::{LogitRows, Model, SeqStep};
use crate::sampling::Sampler;

/// Why generation ended (OpenAI `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Generates up to `max_tokens` tokens after `prompt`, and no further than the model's context
/// (`max_position_embeddings` tokens, prompt included: `Length` there too); stops early on any
/// of `stop_tokens` (which is not included in the output). `on_token` sees each token as it is
/// produced.
pub fn generate<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_tokens: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, FinishReason)> {
    if prompt.is_empty() {
        return Err(EngineError::input("the prompt is empty"));
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() >= context {
        return Err(EngineError::input(format!(
            "the prompt has {} tokens; the model's context (max_position_embeddings) is {context}, \
             which leaves no room for output",
            prompt.len()
        )));
    }
    let max_tokens = max_tokens.min(context - prompt.len());
    let mut cache = model.new_cache();
    let mut output = Vec::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    while output.len() < max_tokens {
        let mut step = [SeqStep {
            tokens: &next_input,
            cache: &mut cache,
            logits: LogitRows::Last,
        }];
        let logits = model.forward(&mut step, None)?.remove(0);
        let token = sampler.sample(&logits, &[]);
        if stop_tokens.contains(&token) {
            return Ok((output, FinishReason::Stop));
        }
        output.push(token);
        on_token(token);
        next_input = vec![token];
    }
    Ok((output, FinishReason::Length))
}
