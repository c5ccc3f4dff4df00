//! diffusers' `UNet2DConditionModel` (the latent denoiser with cross-attention of Stable
//! Diffusion 1.x, 2.x and XL, and the pixel-space U-Nets of DeepFloyd IF), built from
//! `unet/config.json` with no per-version code.
//!
//! [`UNet2DConditionModelConfig`] mirrors the JSON; [`UNetConfig`] is the validated
//! architecture (unsupported values are a [`ltd_nn::ConfigError`] naming field and value);
//! [`UNet2DConditionModel`] runs it, from memory-mapped weights or a `VarMap` alike. The blocks
//! only the U-Net has live here (`transformer_2d.rs`, `embeddings.rs`, `blocks.rs`, and
//! DeepFloyd IF's `simple_cross_attn.rs`); those it shares with the VAE come from
//! `ltd_nn::layers`. `gguf.rs` saves and loads the U-Net with quantized weights.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod gguf;
pub mod simple_cross_attn;
pub mod transformer_2d;
pub mod unet_2d_condition;

pub use config::{ClassEmbedding, UNet2DConditionModelConfig, UNetConfig};
pub use unet_2d_condition::{UNet2DConditionModel, UNetConditioning};
