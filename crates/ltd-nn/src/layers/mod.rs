//! The neural-network layers that at least two model crates share, written once, with module
//! paths equal to diffusers' checkpoint keys. Each constructor only fetches tensors from its
//! `VarBuilder` (memory-mapped weights for inference, a `VarMap` for training); all computing
//! happens in `forward`, through the CPU kernels of `kernels/` where they apply.
//!
//! A block only one model crate uses lives in that crate (the U-Net's `Transformer2DModel` and
//! timestep embeddings are in ltd-unet); `xtask/tests/tidy.rs` checks that every module here is
//! used, directly or through another layer, by at least two model crates.

pub mod activation;
pub mod attention_processor;
pub mod conv;
pub mod linear;
pub mod mid_block;
pub mod norm;
pub mod resnet;
pub mod sampling;

pub use activation::{geglu, Activation};
pub use attention_processor::{Attention, AttentionConfig, SpatialSelfAttention};
pub use conv::Conv2d;
pub use linear::Linear;
pub use mid_block::{UNetMidBlock2D, UNetMidBlock2DConfig};
pub use norm::{GroupNorm, LayerNorm};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm};
pub use sampling::{Downsample2D, Upsample2D};
