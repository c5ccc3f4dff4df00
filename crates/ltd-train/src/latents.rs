//! The latent cache of U-Net training: every training image is encoded once by the frozen VAE
//! and its posterior `N(μ, σ²)` kept, so that each step only draws `z = μ + σ·ε` (as diffusers'
//! training script does with `latent_dist.sample()`) instead of running the encoder. With random
//! flipping the mirrored images are encoded too.

use candle_core::{DType, Device, Tensor};
use ltd_vae::AutoencoderKL;

use crate::data::{Augment, ImageFolder};
use crate::error::Result;

/// Images encoded at once.
const ENCODE_BATCH: usize = 16;

/// Posterior means and standard deviations of a whole dataset.
#[derive(Debug)]
pub struct LatentCache {
    /// `[N, C, h, w]`, then (with flips) the mirrored images' `[N, C, h, w]`.
    mean: Tensor,
    std: Tensor,
    n: usize,
    flipped: bool,
}

impl LatentCache {
    /// Encodes every example of `data` (and its mirror image when `flips`).
    pub fn build(
        vae: &AutoencoderKL,
        data: &ImageFolder,
        flips: bool,
        device: &Device,
    ) -> Result<Self> {
        let n = data.len();
        let mut means = Vec::new();
        let mut stds = Vec::new();
        for flip in [false, true].into_iter().take(1 + usize::from(flips)) {
            let all: Vec<usize> = (0..n).collect();
            for chunk in all.chunks(ENCODE_BATCH) {
                let aug = vec![Augment { flip, ..Augment::default() }; chunk.len()];
                let x = data.batch_augmented(chunk, &aug, data.resolution(), device)?;
                let post = vae.encode(&x)?;
                means.push(post.mean.to_dtype(DType::F32)?.detach());
                stds.push(post.std()?.to_dtype(DType::F32)?.detach());
            }
        }
        let mean = Tensor::cat(&means, 0)?.contiguous()?;
        let std = Tensor::cat(&stds, 0)?.contiguous()?;
        Ok(Self { mean, std, n, flipped: flips })
    }

    /// `[C, h, w]` of one latent.
    pub fn latent_dims(&self) -> Vec<usize> {
        self.mean.dims()[1..].to_vec()
    }

    /// Posterior samples `μ + σ·noise` for `indices`, mirrored where `flips` says (ignored when
    /// the cache holds no mirrored latents); `noise` has the batch's latent shape.
    pub fn sample(&self, indices: &[usize], flips: &[bool], noise: &Tensor) -> Result<Tensor> {
        let rows: Vec<u32> = indices
            .iter()
            .enumerate()
            .map(|(b, &i)| {
                let mirrored = self.flipped && flips.get(b).copied().unwrap_or(false);
                (i + if mirrored { self.n } else { 0 }) as u32
            })
            .collect();
        let rows = Tensor::from_vec(rows, indices.len(), self.mean.device())?;
        let mean = self.mean.index_select(&rows, 0)?;
        let std = self.std.index_select(&rows, 0)?;
        Ok((mean + (std * noise)?)?)
    }

    /// The posterior means of `indices` (unflipped).
    pub fn means(&self, indices: &[usize]) -> Result<Tensor> {
        let rows: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let rows = Tensor::from_vec(rows, indices.len(), self.mean.device())?;
        Ok(self.mean.index_select(&rows, 0)?)
    }
}
