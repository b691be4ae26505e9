//! One error type for the engine; every variant names the file, field or tensor at fault.

use std::path::Path;

/// Engine result.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: field `{field}`: {message}")]
    Config {
        file: String,
        field: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Weights { file: String, message: String },
    #[error("tensor `{name}` ({file}): {message}")]
    Tensor {
        name: String,
        file: String,
        message: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("device: {0}")]
    Device(String),
}

impl EngineError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub fn config(file: &str, field: &str, message: impl Into<String>) -> Self {
        Self::Config {
            file: file.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn weights(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Weights {
            file: file.into(),
            message: message.into(),
        }
    }

    pub fn tensor(name: &str, file: &str, message: impl Into<String>) -> Self {
        Self::Tensor {
            name: name.to_string(),
            file: file.to_string(),
            message: message.into(),
        }
    }

    pub fn input(message: impl Into<String>) -> Self {
        Self::Input(message.into())
    }
}
