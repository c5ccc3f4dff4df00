//! The error type shared by the model crates.

use std::path::PathBuf;

use crate::weights::LoadReport;

/// Result alias used across the model crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration value we cannot use, before the file it came from is known.
///
/// Model crates validate configs without doing I/O; the loader attaches the file path
/// (see [`crate::config::load_config`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct ConfigError {
    /// The JSON field, as spelled in `config.json` (`down_block_types[2]`, `attention_head_dim`).
    pub field: String,
    /// What is wrong with it, quoting the value.
    pub message: String,
}

impl ConfigError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// "unsupported value" with the value quoted.
    pub fn unsupported(field: impl Into<String>, value: impl std::fmt::Debug) -> Self {
        Self::new(field, format!("unsupported value {value:?}"))
    }
}

/// Errors from loading configs and weights and from running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or has a field of the wrong type.
    #[error("{}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the field path where it is known.
        message: String,
    },
    /// A config field has a value we do not support, or is missing.
    #[error("{}: {source}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        #[source]
        source: ConfigError,
    },
    /// A config that did not come from a file is invalid.
    #[error("invalid config: {0}")]
    InvalidConfig(#[from] ConfigError),
    /// A pickle checkpoint was offered; we never unpickle.
    #[error(
        "{}: refusing to load a pickle checkpoint (.bin/.ckpt/.pt/.pth): unpickling can run \
         arbitrary code. Convert it to .safetensors first (for example with diffusers' \
         `save_pretrained(..., safe_serialization=True)`)",
        path.display()
    )]
    Pickle {
        /// The file.
        path: PathBuf,
    },
    /// A safetensors file is truncated or malformed.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Tensors were missing, mis-shaped or of an unusable dtype.
    #[error("{0}")]
    Load(Box<LoadReport>),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An error with a ready-made message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Msg(message.into())
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
