//! diffusers' `AutoencoderKL` (Rombach et al. 2022, §3; Kingma & Welling 2014): images to a
//! diagonal-Gaussian posterior over latents and latents back to images.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::layers::Conv2d;
use ltd_nn::{NoiseSource, RuntimeOptions, SafetensorsFiles};

use crate::config::{AutoencoderKLConfig, VaeConfig};
use crate::vae::{Decoder, Encoder};

/// The encoder's posterior `N(mean, exp(logvar))` per latent element (diffusers'
/// `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `[B, latent_channels, h, w]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [−30, 20] as in diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments `[B, 2C, h, w]` into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// Variance `exp(logvar)`.
    pub fn var(&self) -> Result<Tensor> {
        self.logvar.exp()
    }

    /// `mean + std · noise` for standard-normal `noise` of the mean's shape.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        &self.mean + (self.std()? * noise)?
    }

    /// A sample, drawing the noise as diffusers' `randn_tensor(mean.shape, generator, dtype)`.
    pub fn sample(&self, rng: &mut dyn NoiseSource) -> Result<Tensor> {
        let noise = rng.randn(self.mean.dims(), self.mean.dtype(), self.mean.device())?;
        self.sample_with(&noise)
    }

    /// The mode (the mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `KL(N(mean, var) ‖ N(0, 1))` summed over channels and pixels: `[B]`.
    pub fn kl(&self) -> Result<Tensor> {
        let terms = ((self.mean.sqr()? + self.var()?)? - 1.0)?.sub(&self.logvar)?;
        (terms.sum((1, 2, 3))? * 0.5)?.contiguous()
    }
}

/// The VAE: `encode` images to a [`DiagonalGaussian`], `decode` latents to images, both also
/// tiled (see [`crate::tiling`]) for images larger than memory allows.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub(crate) encoder: Encoder,
    pub(crate) decoder: Decoder,
    pub(crate) quant_conv: Option<Conv2d>,
    pub(crate) post_quant_conv: Option<Conv2d>,
    cfg: VaeConfig,
    dtype: DType,
}

impl AutoencoderKL {
    /// Builds the model from `vb` (memory-mapped weights or a `VarMap`), fetching every tensor
    /// under diffusers' key names. The dtype of `vb` is the one it computes in; see
    /// [`VaeConfig::compute_dtype`] for `force_upcast`.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, opts: &RuntimeOptions) -> Result<Self> {
        let l = cfg.latent_channels;
        let att = &opts.attention;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg, att)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg, att)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 0, 1)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 0, 1)?)
            } else {
                None
            },
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and
    /// `diffusion_pytorch_model[.{variant}].safetensors`, checking every tensor. Pass
    /// `config.compute_dtype(dtype)` as `dtype` to honour `force_upcast`; [`AutoencoderKL::load`]
    /// does not second-guess the caller.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        opts: &RuntimeOptions,
    ) -> ltd_nn::Result<Self> {
        let cfg = Self::load_config(dir)?;
        let files = ltd_nn::weights::component_weights(dir, &["diffusion_pytorch_model"], variant)?;
        let files = Arc::new(SafetensorsFiles::open(&files)?);
        ltd_nn::load_checked(files, dtype, device, |vb| Self::new(vb, &cfg, opts))
    }

    /// Reads and validates `dir/config.json` (to choose the dtype before loading).
    pub fn load_config(dir: &Path) -> ltd_nn::Result<VaeConfig> {
        ltd_nn::load_config::<AutoencoderKLConfig, VaeConfig>(&dir.join("config.json"))
    }

    /// The validated architecture and latent constants.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The dtype the model computes in; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The encoder moments `[B, 2·latent_channels, H/f, W/f]` of images in [−1, 1].
    pub(crate) fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.encoder.forward(&x.to_dtype(self.dtype)?)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }

    /// The posterior over latents of images `[B, in_channels, H, W]` in [−1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        DiagonalGaussian::from_moments(&self.encode_moments(x)?)
    }

    /// Images (roughly in [−1, 1]) from latents `[B, latent_channels, h, w]` in the VAE's scale
    /// (see [`VaeConfig::unscale_latents`]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}
