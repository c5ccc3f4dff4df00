//! diffusers' `UNet2DConditionModel` (the latent denoiser with cross-attention of Stable
//! Diffusion 1.x, 2.x and XL), built from `unet/config.json` with no per-version code.
//!
//! [`UNet2DConditionModelConfig`] mirrors the JSON; [`UNetConfig`] is the validated
//! architecture (unsupported values are a [`ltd_nn::ConfigError`] naming field and value);
//! [`UNet2DConditionModel`] runs it, from memory-mapped weights or a `VarMap` alike.

pub mod blocks;
pub mod config;
pub mod unet_2d_condition;

pub use config::{ClassEmbedding, UNet2DConditionModelConfig, UNetConfig};
pub use unet_2d_condition::{UNet2DConditionModel, UNetConditioning};
