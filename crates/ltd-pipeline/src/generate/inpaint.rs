//! Inpainting, as diffusers' `StableDiffusionInpaintPipeline` and
//! `StableDiffusionXLInpaintPipeline` run it, in their order of random draws:
//!
//! 1. the mask (white repaints) is resized to the picture, blurred when asked, and with
//!    `padding_mask_crop` picture and mask are cut to the mask's padded bounding box and
//!    resized to the generation size (`VaeImageProcessor`'s `fill` mode);
//! 2. the mask is binarized at 50% (`mask_condition`) and the masked picture is the picture
//!    with the repainted part set to 0 (mid-gray);
//! 3. starting latents: the picture's latents are drawn first (a 4-channel U-Net, or
//!    `strength` < 1), then the noise; at `strength` 1 the latents are that noise scaled, else
//!    the picture's latents noised to the first timestep; then the masked picture's latents;
//! 4. each step a 9-channel U-Net sees `[latents, mask, masked-image latents]` concatenated on
//!    channels (the mask nearest-sampled to latent size), while for a regular 4-channel U-Net
//!    the known region is put back after every step: `(1 − m)·x₀' + m·x`, `x₀'` the picture's
//!    latents noised to the next timestep (not noised after the last);
//! 5. after decoding, the picture is pasted back where the mask is black (`apply_overlay`)
//!    with `padding_mask_crop` (and when the request asks for it, as outpainting does).

use candle_core::Tensor;
use ltd_scheduler::Scheduler;

use super::{Plan, Sampling};
use crate::error::{PipelineError, Result};
use crate::image::RgbImage;
use crate::image_processor::{apply_overlay, get_crop_region, Bitmap};
use crate::pipeline::Pipeline;
use crate::request::GenerateRequest;

/// Crop box `(x1, y1, x2, y2)` in the picture's pixels.
type Region = (i64, i64, i64, i64);

/// What the denoising loop and the paste-back need of an inpainting run.
pub(super) struct InpaintState {
    /// 9-channel U-Net: the mask at latent size `[R, 1, h, w]` and the masked picture's latents
    /// `[R, C, h, w]`, `R` the U-Net's rows (doubled under guidance).
    condition: Option<(Tensor, Tensor)>,
    /// 4-channel U-Net: what puts the known region back after each step.
    blend: Option<Blend>,
    /// The paste-back after decoding.
    overlay: Option<Overlay>,
}

/// The known region of a 4-channel run.
struct Blend {
    /// The picture's clean latents, `[B, C, h, w]`.
    image_latents: Tensor,
    /// The starting noise, `[B, C, h, w]`.
    noise: Tensor,
    /// 1 where repainted, `[B, 1, h, w]`.
    mask: Tensor,
}

/// diffusers' `apply_overlay` inputs.
struct Overlay {
    /// The (resized, blurred) mask at the picture's size.
    mask: Bitmap,
    original: Bitmap,
    crop: Option<Region>,
}

impl InpaintState {
    /// The U-Net input of a step: the 9-channel concatenation, or the latents as they are.
    pub(super) fn unet_input(&self, x: &Tensor) -> Result<Tensor> {
        match &self.condition {
            Some((mask, masked)) => Ok(Tensor::cat(&[x, mask, masked], 1)?),
            None => Ok(x.clone()),
        }
    }

    /// After a sampler step: a 4-channel run puts the known region back, noised to the next
    /// timestep (`None` after the last step: the clean latents).
    pub(super) fn blend(
        &self,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        next: Option<f64>,
    ) -> Result<Tensor> {
        let Some(b) = &self.blend else { return Ok(latents.clone()) };
        let proper = match next {
            Some(t) => scheduler.add_noise(&b.image_latents, &b.noise, t)?,
            None => b.image_latents.clone(),
        };
        let keep = b.mask.affine(-1.0, 1.0)?;
        Ok((keep.broadcast_mul(&proper)? + b.mask.broadcast_mul(latents)?)?)
    }

    /// The decoded images, with the picture pasted back where the request keeps it.
    pub(super) fn paste_back(&self, images: Vec<RgbImage>) -> Result<Vec<RgbImage>> {
        let Some(o) = &self.overlay else { return Ok(images) };
        images
            .iter()
            .map(|img| {
                Ok(apply_overlay(&o.mask, &o.original, &Bitmap::from_rgb(img), o.crop)?.to_rgb())
            })
            .collect()
    }
}

/// torch's `interpolate(mode="nearest")` of a `[H, W]` plane to `[h, w]`.
fn nearest(plane: &[f32], (h_in, w_in): (usize, usize), (h, w): (usize, usize)) -> Vec<f32> {
    let (sy, sx) = (h_in as f32 / h as f32, w_in as f32 / w as f32);
    let src = |d: usize, s: f32, n: usize| ((d as f32 * s).floor() as usize).min(n - 1);
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| plane[src(y, sy, h_in) * w_in + src(x, sx, w_in)])
        .collect()
}

impl Pipeline {
    /// An inpainting U-Net cannot make pictures from nothing: it needs the mask inputs.
    pub(super) fn check_inpaint(&self, req: &GenerateRequest) -> Result<()> {
        let channels = self.unet.config().in_channels;
        if channels != self.sample_channels()
            && req.inpaint.is_none()
            && !self.index.kind.is_deepfloyd()
        {
            return Err(PipelineError::invalid(
                "mask",
                format!(
                    "this is an inpainting model (its U-Net takes {channels} input channels): \
                     give --init-image and --mask"
                ),
            ));
        }
        Ok(())
    }

    /// Phase 4 of an inpainting run: steps 1 to 3 of the module's list.
    pub(super) fn prepare_inpaint(
        &self,
        plan: &Plan<'_>,
        sampling: &mut Sampling,
    ) -> Result<(Tensor, InpaintState)> {
        let req = plan.req;
        let (Some(inpaint), Some(init)) = (&req.inpaint, &req.init_image) else {
            return Err(PipelineError::invalid("mask", "needs --init-image"));
        };
        let original = Bitmap::from_rgb(&init.image);
        let mut mask = Bitmap::from_rgb(&inpaint.mask).to_luma();
        if (mask.width, mask.height) != (original.width, original.height) {
            mask = mask.resize(original.width, original.height, None);
        }
        if inpaint.mask_blur > 0.0 {
            mask = mask.gaussian_blur(inpaint.mask_blur);
        }
        let (w, h) = (plan.width, plan.height);
        let crop =
            inpaint.padding_mask_crop.map(|pad| get_crop_region(&mask, w, h, pad)).transpose()?;
        let (image, mask_in) = match crop {
            Some(c) => (original.crop(c).resize_and_fill(w, h), mask.crop(c).resize_and_fill(w, h)),
            None => (original.resize(w, h, None), mask.resize(w, h, None)),
        };
        let _span = tracing::info_span!("inpaint", ?crop).entered();

        // diffusers' mask processor: bytes / 255, binarized at 0.5.
        let condition: Vec<f32> =
            mask_in.data.iter().map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 }).collect();
        let dev = &self.device;
        let picture = image.to_rgb().to_tensor(dev)?;
        let keep: Vec<f32> = condition.iter().map(|&m| if m < 0.5 { 1.0 } else { 0.0 }).collect();
        let masked = picture.broadcast_mul(&Tensor::from_vec(keep, (1, 1, h, w), dev)?)?;

        let latent_channels = self.sample_channels();
        let nine = self.unet.config().in_channels != latent_channels;
        let at_max = init.strength == 1.0;
        let f = self.vae_scale_factor();
        let (hl, wl) = (h / f, w / f);
        let Sampling { scheduler, timesteps, generator, .. } = sampling;
        let repeat = |t: Tensor| -> Result<Tensor> { Ok(t.repeat((plan.batch, 1, 1, 1))?) };
        // One generator per image (`--seed-mode a1111`) encodes one copy per image, each with
        // its own posterior sample, as diffusers does with a list of generators.
        let copies = generator.posterior_batch();
        let per_copy = |z: Tensor| -> Result<Tensor> {
            Ok(z.to_dtype(self.dtype)?.repeat((plan.batch / copies, 1, 1, 1))?)
        };
        let image_latents = if !nine || !at_max {
            let x = picture.repeat((copies, 1, 1, 1))?;
            Some(per_copy(self.encode_pixels(&x, generator, req.vae_tiling)?)?)
        } else {
            None
        };
        let noise =
            generator.initial_noise(&[plan.batch, latent_channels, hl, wl], self.dtype, dev)?;
        let latents = match (&image_latents, at_max) {
            (Some(z), false) => {
                let first = *timesteps.first().ok_or_else(|| {
                    PipelineError::invalid("strength", "leaves no denoising step")
                })?;
                scheduler.add_noise(z, &noise, first)?
            }
            _ => (&noise * scheduler.init_noise_sigma())?,
        };
        let mask_latent =
            Tensor::from_vec(nearest(&condition, (h, w), (hl, wl)), (1, 1, hl, wl), dev)?
                .to_dtype(self.dtype)?;
        let x = masked.repeat((copies, 1, 1, 1))?;
        let masked_latents = per_copy(self.encode_pixels(&x, generator, req.vae_tiling)?)?;
        let mask_latent = repeat(mask_latent)?;

        let double = |t: &Tensor| -> Result<Tensor> {
            Ok(if plan.do_cfg { Tensor::cat(&[t, t], 0)? } else { t.clone() })
        };
        let condition =
            nine.then(|| Ok::<_, PipelineError>((double(&mask_latent)?, double(&masked_latents)?)));
        let blend = match (nine, image_latents) {
            (false, Some(image_latents)) => {
                Some(Blend { image_latents, noise: noise.clone(), mask: mask_latent })
            }
            _ => None,
        };
        let overlay =
            (crop.is_some() || inpaint.keep_unmasked).then_some(Overlay { mask, original, crop });
        Ok((latents, InpaintState { condition: condition.transpose()?, blend, overlay }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_takes_the_top_left_pixel_of_each_block_as_torch() {
        let plane: Vec<f32> = (0..16 * 8).map(|i| i as f32).collect();
        assert_eq!(nearest(&plane, (8, 16), (2, 2)), [0.0, 8.0, 64.0, 72.0]);
    }
}
