//! The SDXL refiner, alone and after the base ("ensemble of expert denoisers", Podell et al.
//! 2023, §2.5), as diffusers' `StableDiffusionXLImg2ImgPipeline` runs it.
//!
//! A refiner folder (stabilityai/stable-diffusion-xl-refiner-1.0's layout) has no first text
//! encoder (`text_encoder`/`tokenizer` are `[null, null]`): only the OpenCLIP encoder
//! conditions its U-Net. With `requires_aesthetics_score` its 5 time ids are
//! `(original h, w, crop top, left, aesthetic score)`: 6.0 for the conditional rows and 2.5
//! for the unconditional ones (diffusers' `aesthetic_score` / `negative_aesthetic_score`
//! defaults), instead of the base's 6 `(original, crop, target)`. It only refines: as `--model`
//! it needs `--init-image` (image-to-image, `--strength` as usual).
//!
//! The hand-off ([`Pipeline::generate_refined`], `--refiner DIR --refiner-switch S`): the base
//! runs its schedule up to `denoising_end = S` — the timesteps `t ≥ round(T − S·T)` with `T` the
//! training steps — and returns its still-noisy latents undecoded; the refiner sets the same
//! number of steps, starts at `denoising_start = S` — the timesteps `t < round(T − S·T)`, one
//! more for a second-order sampler whose count comes out even, so that it does not start
//! between a Heun pair — and denoises those latents as they are (no VAE round trip, no fresh
//! noise). Each stage draws its sampler noise from a fresh generator of the request's seed,
//! as diffusers does when each pipeline is given a generator seeded alike.

use crate::error::{PipelineError, Result};
use crate::generate::{Generation, Progress, Stage};
use crate::model_index::{ModelIndex, PipelineKind};
use crate::params::fmt_number;
use crate::pipeline::Pipeline;
use crate::request::GenerateRequest;

/// diffusers' `aesthetic_score` default.
pub const AESTHETIC_SCORE: f64 = 6.0;
/// diffusers' `negative_aesthetic_score` default.
pub const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

/// How many time ids the U-Net's added conditioning takes (diffusers' `_get_add_time_ids`).
pub(crate) fn time_id_count(index: &ModelIndex) -> usize {
    if index.requires_aesthetics_score {
        5
    } else {
        6
    }
}

/// The hint diffusers gives when the U-Net expects one time id more or fewer than the
/// pipeline's `requires_aesthetics_score` makes.
pub(crate) fn aesthetics_hint(
    index: &ModelIndex,
    expected: usize,
    passed: usize,
    time_dim: usize,
) -> &'static str {
    if expected == passed + time_dim && !index.requires_aesthetics_score {
        " (a refiner U-Net: set \"requires_aesthetics_score\": true in model_index.json)"
    } else if passed == expected + time_dim && index.requires_aesthetics_score {
        " (not a refiner U-Net: drop \"requires_aesthetics_score\" from model_index.json)"
    } else {
        ""
    }
}

/// SDXL's time ids for an image of `width × height`, `(unconditional, conditional)` rows
/// (diffusers' `add_neg_time_ids`, `add_time_ids`; no crop, original size = target size).
pub(crate) fn time_ids(index: &ModelIndex, width: usize, height: usize) -> (Vec<f32>, Vec<f32>) {
    let (h, w) = (height as f32, width as f32);
    if index.requires_aesthetics_score {
        (
            vec![h, w, 0.0, 0.0, NEGATIVE_AESTHETIC_SCORE as f32],
            vec![h, w, 0.0, 0.0, AESTHETIC_SCORE as f32],
        )
    } else {
        (vec![h, w, 0.0, 0.0, h, w], vec![h, w, 0.0, 0.0, h, w])
    }
}

/// diffusers' `discrete_timestep_cutoff` for a fraction of the schedule.
fn cutoff(fraction: f64, train_steps: usize) -> f64 {
    let t = train_steps as f64;
    (t - fraction * t).round()
}

/// `denoising_end`: how many of `timesteps` run (those `≥` the cutoff).
pub(crate) fn end_count(timesteps: &[f64], end: f64, train_steps: usize) -> usize {
    let c = cutoff(end, train_steps);
    timesteps.iter().filter(|&&t| t >= c).count()
}

/// `denoising_start` (diffusers' `get_timesteps`): `(begin index, evaluations)` of the tail
/// `t < cutoff`, one longer for a second-order sampler when the count is even.
pub(crate) fn start_index(
    timesteps: &[f64],
    start: f64,
    train_steps: usize,
    order: usize,
) -> (usize, usize) {
    let c = cutoff(start, train_steps);
    let mut n = timesteps.iter().filter(|&&t| t < c).count();
    if order == 2 && n % 2 == 0 {
        n += 1;
    }
    let n = n.min(timesteps.len());
    (timesteps.len() - n, n)
}

/// Checks what a stage needs of the model: a refiner only refines, and given latents must have
/// the size of the image.
pub(crate) fn check_stage(
    pipe: &Pipeline,
    req: &GenerateRequest,
    stage: &Stage<'_>,
    (width, height): (usize, usize),
) -> Result<()> {
    if pipe.index.refiner && req.init_image.is_none() && stage.latents.is_none() {
        return Err(PipelineError::invalid(
            "init-image",
            format!(
                "{} is an SDXL refiner (no first text encoder): it only refines an image; give \
                 --init-image, or use it as --refiner after an SDXL base model",
                pipe.name()
            ),
        ));
    }
    if let Some(z) = stage.latents {
        let f = pipe.vae_scale_factor();
        let (_, _, h, w) = z.dims4()?;
        if (h * f, w * f) != (height, width) {
            return Err(PipelineError::msg(format!(
                "latents of {}x{} pixels for a {width}x{height} image",
                w * f,
                h * f
            )));
        }
    }
    Ok(())
}

/// Refuses a switch point outside (0, 1), naming `--refiner-switch`.
pub fn check_switch(switch: f64) -> Result<()> {
    if !(switch > 0.0 && switch < 1.0) {
        return Err(PipelineError::invalid(
            "refiner-switch",
            format!("must be in (0, 1) (the fraction of the schedule the base runs), got {switch}"),
        ));
    }
    Ok(())
}

impl Pipeline {
    /// Whether this is an SDXL refiner folder (no first text encoder).
    pub fn is_refiner(&self) -> bool {
        self.index.refiner
    }

    /// Text-to-image with this SDXL base for the first `switch` of the schedule, finished by
    /// `refiner` from the base's latents (see the module docs). One image per prompt and
    /// `num_images`; their parameters are the base's, with A1111's `Refiner` and
    /// `Refiner switch at`.
    pub fn generate_refined(
        &self,
        refiner: &Pipeline,
        switch: f64,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        check_switch(switch)?;
        if self.kind() != PipelineKind::StableDiffusionXl || self.is_refiner() {
            return Err(PipelineError::invalid(
                "refiner",
                format!("the base model {} must be an SDXL text-to-image model", self.name()),
            ));
        }
        if refiner.kind() != PipelineKind::StableDiffusionXl {
            return Err(PipelineError::invalid(
                "refiner",
                format!("{} is not an SDXL model", refiner.name()),
            ));
        }
        if req.init_image.is_some() {
            return Err(PipelineError::invalid(
                "refiner",
                "the base→refiner hand-off starts from text; drop --init-image (or refine an \
                 image with --model <refiner> --init-image)",
            ));
        }
        let base_stage =
            Stage { denoising_end: Some(switch), skip_decode: true, ..Stage::default() };
        let base = self.run_stage(req, base_stage, on_step)?;
        let (_, _, h, w) = base.latents.dims4()?;
        let f = self.vae_scale_factor();
        let refine_req = GenerateRequest { width: Some(w * f), height: Some(h * f), ..req.clone() };
        let stage = Stage {
            latents: Some(&base.latents),
            denoising_start: Some(switch),
            ..Stage::default()
        };
        let mut out = refiner.run_stage(&refine_req, stage, on_step)?;
        out.params = base.params;
        for p in &mut out.params {
            p.extra.push(("Refiner".into(), refiner.name().to_string()));
            p.extra.push(("Refiner switch at".into(), fmt_number(switch)));
        }
        out.timings.encode += base.timings.encode;
        out.timings.denoise += base.timings.denoise;
        out.steps += base.steps;
        out.evaluations += base.evaluations;
        out.into_generation(req.num_images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Euler's 10-step SDXL schedule ("leading", steps_offset 1), as integers.
    const TEN: [f64; 10] = [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0];

    #[test]
    fn splits_the_schedule_where_diffusers_does() {
        // Base to 0.8: t ≥ 200 runs (8 steps); refiner from 0.8: t < 200 (2 steps).
        assert_eq!(end_count(&TEN, 0.8, 1000), 8);
        assert_eq!(start_index(&TEN, 0.8, 1000, 1), (8, 2));
        // The split always covers the schedule exactly once for a first-order sampler.
        for s in [0.05, 0.3, 0.5, 0.79, 0.99] {
            assert_eq!(end_count(&TEN, s, 1000) + start_index(&TEN, s, 1000, 1).1, 10, "{s}");
        }
        // Heun's doubled timesteps: an even tail gets one more (the pair's second half).
        let heun = [901.0, 801.0, 801.0, 701.0, 701.0, 601.0, 601.0];
        assert_eq!(start_index(&heun, 0.3, 1000, 2), (4, 3));
        assert_eq!(start_index(&heun, 0.25, 1000, 2), (2, 5));
    }

    #[test]
    fn switch_points_outside_the_open_interval_are_refused() {
        for bad in [0.0, 1.0, -0.5, 1.2, f64::NAN] {
            let e = check_switch(bad).unwrap_err().to_string();
            assert!(e.starts_with("--refiner-switch: must be in (0, 1)"), "{e}");
        }
        check_switch(0.8).unwrap();
    }
}
