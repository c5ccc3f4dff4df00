//! The pipeline's error type: every message is phrased for the user and names the file,
//! field or request parameter at fault.

use std::path::PathBuf;

/// Result alias of the pipeline crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Errors from loading models and generating images.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A request parameter is out of range; `field` is the parameter's name as the CLI spells
    /// its flag (`steps`, `guidance`, `width`, …).
    #[error("--{field}: {message}")]
    InvalidRequest {
        /// The parameter.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// `model_index.json` is malformed or describes something we cannot run.
    #[error("{}: field `{field}`: {message}", path.display())]
    ModelIndex {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Loading or running a model failed.
    #[error(transparent)]
    Model(#[from] ltd_nn::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The step callback asked to stop ([`crate::Progress::cancel`]).
    #[error("cancelled after step {step} of {total}")]
    Cancelled {
        /// Steps done.
        step: usize,
        /// Steps the run had.
        total: usize,
    },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

impl PipelineError {
    /// An error with a ready-made message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Msg(message.into())
    }

    /// A request parameter out of range.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest { field, message: message.into() }
    }
}
