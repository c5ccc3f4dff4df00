//! The training crate's error type: every message names the file, option or tensor at fault.

use std::path::PathBuf;

/// Result alias of the training crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Errors from reading datasets, training and writing models.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The dataset is missing, empty or unusable.
    #[error("dataset {}: {message}", path.display())]
    Dataset {
        /// The dataset folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A training option is out of range; `option` is spelled as its command-line flag.
    #[error("--{option}: {message}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A checkpoint is missing, incomplete or from a different run.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Loading or building a model failed.
    #[error(transparent)]
    Model(#[from] ltd_nn::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An image could not be encoded or written.
    #[error("{}: {source}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// The codec's error.
        #[source]
        source: image::ImageError,
    },
    /// Training diverged (a non-finite loss).
    #[error("training diverged at step {step}: the loss is {loss}; lower --learning-rate")]
    Diverged {
        /// The step.
        step: usize,
        /// The loss value.
        loss: f32,
    },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

impl TrainError {
    /// An error with a ready-made message.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Msg(message.into())
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    /// An option out of range.
    pub fn option(option: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidOption { option, message: message.into() }
    }

    /// A dataset problem.
    pub fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Dataset { path: path.into(), message: message.into() }
    }

    /// A checkpoint problem.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint { path: path.into(), message: message.into() }
    }
}
