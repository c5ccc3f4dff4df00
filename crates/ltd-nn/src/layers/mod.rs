//! The neural-network layers the U-Net and the VAE share, written once, with module paths equal
//! to diffusers' checkpoint keys. Each constructor only fetches tensors from its `VarBuilder`
//! (memory-mapped weights for inference, a `VarMap` for training); all computing happens in
//! `forward`.

pub mod activation;
mod conv_cpu;
pub(crate) mod cpu;
pub(crate) use cpu::threads as cpu_threads;
pub mod cross_attention;
pub mod embeddings;
pub mod linear;
pub mod mid_block;
pub mod norm;
pub mod resnet;
pub mod sampling;
pub mod transformer;

pub use activation::Activation;
pub use cpu::Data as CpuData;
pub use cross_attention::{Attention, AttentionConfig, SpatialSelfAttention};
pub use embeddings::{timestep_embedding, TimestepEmbedding, Timesteps};
pub use linear::{Conv2d, Linear};
pub use mid_block::{UNetMidBlock2D, UNetMidBlock2DConfig};
pub use norm::{GroupNorm, LayerNorm};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm};
pub use sampling::{Downsample2D, Upsample2D};
pub use transformer::{
    BasicTransformerBlock, FeedForward, Transformer2DConfig, Transformer2DModel,
};
