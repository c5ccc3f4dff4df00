//! diffusers' `AutoencoderKL`, the VAE of Stable Diffusion 1.x, 2.x and XL, built from
//! `vae/config.json`: encoder, decoder, diagonal-Gaussian posterior, latent scaling constants,
//! and tiled encoding/decoding for images larger than memory allows.

pub mod autoencoder_kl;
pub mod config;
pub mod tiling;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, DiagonalGaussian};
pub use config::{AutoencoderKLConfig, VaeConfig};
pub use tiling::TilingOptions;
