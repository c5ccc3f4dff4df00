//! The error type shared by the model crates, and the load report it carries.
//!
//! This module depends on nothing else in the crate: configs and weights depend on it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Result alias used across the model crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration value we cannot use, before the file it came from is known.
///
/// Model crates validate configs without doing I/O; the loader (`config::load_config`)
/// attaches the file path.
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

/// A tensor whose stored shape differs from the one the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Tensor name.
    pub name: String,
    /// The shape the model asked for.
    pub expected: Vec<usize>,
    /// The shape in the file.
    pub found: Vec<usize>,
}

/// What a load asked for and what it found.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// The files (or "shapes only").
    pub source: String,
    /// Every tensor the model asked for, with the shape it asked for.
    pub requested: BTreeMap<String, Vec<usize>>,
    /// Asked for but absent, with the expected shape.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Present with another shape.
    pub mismatched: Vec<Mismatch>,
    /// Present but unreadable (dtype, …), with the reason.
    pub unreadable: Vec<(String, String)>,
    /// In the files but never asked for.
    pub unused: Vec<String>,
}

impl LoadReport {
    /// True when every requested tensor was found with the right shape and dtype.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty() && self.unreadable.is_empty()
    }
}

impl fmt::Display for LoadReport {
    /// One line: each kind of problem with its count and every tensor's name, then the tensors
    /// in the files that the model never asked for, all of them by name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T>(parts: &mut Vec<String>, what: &str, items: &[T], show: impl Fn(&T) -> String) {
            if !items.is_empty() {
                let names: Vec<String> = items.iter().map(show).collect();
                parts.push(format!("{} {what}: {}", items.len(), names.join(", ")));
            }
        }
        let mut parts = Vec::new();
        list(&mut parts, "missing tensor(s)", &self.missing, |(n, s)| format!("{n} {s:?}"));
        list(&mut parts, "mis-shaped tensor(s)", &self.mismatched, |m| {
            format!("{} expected {:?}, file has {:?}", m.name, m.expected, m.found)
        });
        list(&mut parts, "unreadable tensor(s)", &self.unreadable, |(n, why)| {
            format!("{n}: {why}")
        });
        if parts.is_empty() {
            parts.push("complete".to_string());
        }
        list(&mut parts, "unused tensor(s)", &self.unused, |n| n.clone());
        write!(f, "{}: {} ({} requested)", self.source, parts.join("; "), self.requested.len())
    }
}
