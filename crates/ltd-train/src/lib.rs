//! Training for ltd: imagefolder datasets, the synthetic make-shapes dataset and its analytic
//! checker, AdamW with saveable state, atomic checkpoints, and the VAE and U-Net training
//! loops that write diffusers-layout folders.
//!
//! **Architecture Invariant:** this crate knows the model crates and nothing above them (not
//! the pipeline, not the CLI); it never prints, and reports progress through
//! [`progress::Event`]s that the caller renders.

pub mod checkpoint;
pub mod common;
pub mod data;
pub mod driver;
pub mod error;
pub mod export;
pub mod history;
pub mod images;
pub mod init;
pub mod latents;
pub mod optim;
pub mod preview;
pub mod progress;
pub mod rng;
pub mod shape_check;
pub mod shapes;
pub mod shards;
pub mod text_encoder;
pub mod timestep_bias;
pub mod train_unet;
pub mod train_vae;

pub use error::{Result, TrainError};

/// How a run is driven, apart from what it computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunControl {
    /// Continue from the newest checkpoint in the output folder (with its saved options).
    pub resume: bool,
    /// Return after this many steps in total (the weights are not exported): a run cut short
    /// on purpose, as the resume tests do to stand in for a kill.
    pub stop_after: Option<usize>,
}
