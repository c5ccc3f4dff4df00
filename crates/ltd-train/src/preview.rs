//! Preview samples written with each U-Net checkpoint: a few training captions generated
//! with the scheduler the model ships, classifier-free guidance and a fixed seed, so that
//! successive previews show the same prompts and noise as training progresses.
//!
//! This is the plain denoising loop of `ltd_scheduler`'s documentation, kept minimal on
//! purpose (no negative prompts, no image-to-image, no callbacks): generation proper is the
//! pipeline's business, and ltd-train does not depend on the pipeline.

use candle_core::{DType, Device, Tensor};
use ltd_nn::rng::TorchRng;
use ltd_nn::NoiseSource;
use ltd_scheduler::{SamplerOptions, SchedulerConfig};
use ltd_text::Encoded;
use ltd_unet::{UNet2DConditionModel, UNetConditioning};
use ltd_vae::AutoencoderKL;

use crate::error::Result;
use crate::text_encoder::TextEncoder;

/// How previews are drawn.
#[derive(Debug, Clone, Copy)]
pub struct PreviewSettings {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
}

impl Default for PreviewSettings {
    fn default() -> Self {
        Self { steps: 20, guidance: 5.0, seed: 0 }
    }
}

/// The models a preview runs.
pub struct PreviewModels<'a> {
    /// The denoiser.
    pub unet: &'a UNet2DConditionModel,
    /// The text encoder.
    pub text_encoder: &'a TextEncoder,
    /// The frozen VAE.
    pub vae: &'a AutoencoderKL,
    /// The scheduler config the model ships.
    pub scheduler: &'a SchedulerConfig,
    /// The device they are on.
    pub device: &'a Device,
}

/// Images `[P, 3, H, W]` in [-1, 1] for the `P` tokenized `prompts`, `uncond` being the empty
/// prompt; latents of `latent_dims` (`[C, h, w]`).
pub fn generate(
    m: &PreviewModels<'_>,
    prompts: &[Encoded],
    uncond: &Encoded,
    latent_dims: &[usize],
    s: PreviewSettings,
) -> Result<Tensor> {
    let p = prompts.len();
    let device = m.device;
    let cond = m.text_encoder.forward(prompts, device)?.detach();
    let uncond = m.text_encoder.forward(std::slice::from_ref(uncond), device)?;
    let uncond = uncond.detach().repeat((p, 1, 1))?;
    let context = Tensor::cat(&[&uncond, &cond], 0)?;
    let mut sched = ltd_scheduler::build(m.scheduler, None, &SamplerOptions::default())?;
    sched.set_timesteps(s.steps)?;
    let mut rng = TorchRng::new(s.seed);
    let mut shape = vec![p];
    shape.extend_from_slice(latent_dims);
    let mut x = (rng.randn(&shape, DType::F32, device)? * sched.init_noise_sigma())?;
    for &t in sched.timesteps().to_vec().iter() {
        let x_in = sched.scale_model_input(&Tensor::cat(&[&x, &x], 0)?, t)?;
        let ts = Tensor::new(vec![t as f32; 2 * p], device)?;
        let e = m.unet.forward(&x_in, &ts, &context, &UNetConditioning::default())?.detach();
        let (e_u, e_c) = (e.narrow(0, 0, p)?, e.narrow(0, p, p)?);
        let guided = (&e_u + ((&e_c - &e_u)? * s.guidance)?)?;
        x = sched.step(&guided, t, &x, &mut rng)?.detach();
    }
    let z = m.vae.config().unscale_latents(&x)?;
    Ok(m.vae.decode(&z)?.detach())
}
