//! Training an `AutoencoderKL` from a diffusers config (Rombach et al. 2022, §3 and App. G).
//!
//! Per step, for a batch `x` in [-1, 1] (optionally random crops, random flips):
//!
//! 1. posterior `q(z|x) = N(μ, σ²)` from the encoder, `z = μ + σ·ε`;
//! 2. `x̂ = decode(z)`;
//! 3. `loss = w₁·mean(m·|x̂ − x|) + w₂·mean(m·(x̂ − x)²) + w_kl·KL(q ‖ N(0, I)) / (C·H·W)`.
//!
//! The pixel weight `m` is 1 unless `object_weight` is set: then pixels that differ from their
//! image's background (the per-channel median of the image's border, or of the crop's when
//! training on crops), and those within `object_margin` pixels of them, weigh `object_weight`.
//! On plain-background data (make-shapes, sprites, product shots) a small object is a few
//! percent of the pixels, so an unweighted loss is content to blur its colour into the
//! background's; measured on make-shapes, a VAE trained without it decoded green objects as
//! grey-purple and red as orange.
//!
//! The KL term is summed over the latent elements of an image and divided by the image's
//! element count, so the balance matches LDM's per-image sums: `kl_weight = 1e-6` means what it
//! means there. At the end the latent `scaling_factor` is set to `1 / std(z)` over (up to) 256
//! training images, as LDM does, and the reconstruction PSNR of held-out images is measured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ltd_nn::rng::TorchRng;
use ltd_nn::{NoiseSource, RuntimeOptions};
use ltd_vae::{AutoencoderKL, AutoencoderKLConfig, VaeConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::{split, OptimOptions};
use crate::data::{Augment, ImageFolder};
use crate::driver::{Driver, Loss, Task};
use crate::error::{Result, TrainError};
use crate::export::write_diffusers_model;
use crate::images::{border_median, grid, psnr, save, to_images};
use crate::progress::{Event, Sink};
use crate::rng::derive_seed;
use crate::shards::Shard;
use crate::RunControl;

/// Images used to measure the latent standard deviation.
const SCALE_IMAGES: usize = 256;
/// Images per row of the reconstruction previews.
const PREVIEW_IMAGES: usize = 8;
/// Images encoded at once outside the training step.
const EVAL_BATCH: usize = 16;

/// Options of `train-vae`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeTrainOptions {
    /// Optimisation.
    #[serde(flatten)]
    pub optim: OptimOptions,
    /// Side of the training images (default: the config's `sample_size`).
    pub resolution: Option<usize>,
    /// Train on random square crops of this side (a multiple of the VAE's scale factor):
    /// the VAE is convolutional, and crops make steps cheaper.
    pub crop: Option<usize>,
    /// Weight of the L1 reconstruction term.
    pub l1_weight: f64,
    /// Weight of the squared-error reconstruction term.
    pub mse_weight: f64,
    /// Weight of the KL term (per image element, as LDM's `kl_weight`).
    pub kl_weight: f64,
    /// Weight of object pixels (those unlike their image's border) in the reconstruction terms;
    /// 1 weighs every pixel alike.
    pub object_weight: f64,
    /// Pixels within this many pixels (Chebyshev distance) of an object pixel weigh
    /// `object_weight` too: the background just outside an outline is where a blurred shape
    /// spills, and without the margin it costs only the background's weight.
    pub object_margin: usize,
    /// Mirror training images left–right at random.
    pub random_flip: bool,
    /// Images held out of training for the final PSNR and the previews.
    pub eval_images: usize,
}

impl Default for VaeTrainOptions {
    fn default() -> Self {
        Self {
            optim: OptimOptions { learning_rate: 1e-3, ..OptimOptions::default() },
            resolution: None,
            crop: None,
            l1_weight: 1.0,
            mse_weight: 0.0,
            kl_weight: 1e-6,
            object_weight: 1.0,
            object_margin: 0,
            random_flip: false,
            eval_images: 64,
        }
    }
}

/// What a `train-vae` run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeOutcome {
    /// Steps done (less than the total when stopped early).
    pub steps_done: usize,
    /// Whether the run stopped before its last step (nothing was exported then).
    pub stopped: bool,
    /// The latent scaling factor written to `config.json`.
    pub scaling_factor: Option<f64>,
    /// Mean reconstruction PSNR of the held-out images, in dB.
    pub psnr: Option<f64>,
    /// How many images the PSNR was measured on.
    pub psnr_images: usize,
    /// Whether those were held out (`false`: the dataset was too small, training images).
    pub psnr_held_out: bool,
    /// Mean loss of the last 50 steps.
    pub final_loss: Option<f32>,
}

/// The model config as given, and validated.
fn read_config(raw: &Value) -> Result<VaeConfig> {
    let parsed: AutoencoderKLConfig = serde_json::from_value(raw.clone())
        .map_err(|e| TrainError::msg(format!("VAE config: {e}")))?;
    VaeConfig::try_from(parsed).map_err(|e| TrainError::Model(e.into()))
}

/// A `train-vae` run: dataset, config, output folder and options.
pub struct VaeTrainer<'a> {
    /// The dataset folder.
    pub data: &'a Path,
    /// The diffusers `AutoencoderKL` config (JSON) to train from scratch.
    pub config: &'a Value,
    /// The output folder (model files at its root, run files in `train/`).
    pub out: &'a Path,
    /// The options (ignored on resume in favour of the checkpoint's).
    pub options: VaeTrainOptions,
    /// The device.
    pub device: Device,
}

#[derive(Clone, Serialize, Deserialize)]
struct VaeSaved {
    #[serde(flatten)]
    options: VaeTrainOptions,
    /// The model config the run was started with.
    config: Value,
}

impl VaeTrainer<'_> {
    /// Trains, checkpointing and reporting through `sink`; exports the model at the end.
    pub fn run(&self, control: &RunControl, sink: Sink) -> Result<VaeOutcome> {
        let dev = &self.device;
        let mut driver = Driver::new(self.out, "vae", *control, dev);
        // The dataset's size is needed before the options are final: read it at the
        // resolution the (possibly saved) options ask for.
        let saved = driver
            .options(|| VaeSaved { options: self.options.clone(), config: self.config.clone() })?;
        let cfg = read_config(&saved.config)?;
        let o = &saved.options;
        o.optim.check()?;
        if !(o.object_weight.is_finite() && o.object_weight > 0.0) {
            return Err(TrainError::option(
                "object-weight",
                format!("{} is not a positive number", o.object_weight),
            ));
        }
        let res = o.resolution.unwrap_or(cfg.sample_size);
        let fs = cfg.scale_factor();
        let size = o.crop.unwrap_or(res);
        if res % fs != 0 || size % fs != 0 || size > res || size == 0 {
            return Err(TrainError::option(
                "crop",
                format!(
                    "resolution {res} and crop {size} must be multiples of the VAE's scale \
                     factor {fs}, the crop no larger than the resolution"
                ),
            ));
        }
        sink(Event::Phase(format!("reading {} at {res}x{res}", self.data.display())));
        let data = ImageFolder::open(self.data, res)?;
        driver.start(data.len(), sink)?;
        let (train, eval) = split(data.len(), o.eval_images, o.optim.seed);
        let preview: Vec<usize> = if eval.is_empty() {
            train.iter().take(PREVIEW_IMAGES).copied().collect()
        } else {
            eval.iter().take(PREVIEW_IMAGES).copied().collect()
        };

        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let vae = AutoencoderKL::new(vb, &cfg, &RuntimeOptions::default())?;
        let mut task = VaeTask {
            saved: &saved,
            out: self.out,
            device: dev,
            data,
            vae,
            train,
            eval,
            preview,
            res,
            size,
        };
        let trained = driver.train(&saved, &varmap, &mut task, sink)?;
        let eval = trained.exported;
        Ok(VaeOutcome {
            steps_done: trained.steps_done,
            stopped: eval.is_none(),
            scaling_factor: eval.map(|e| e.scaling_factor),
            psnr: eval.map(|e| e.psnr),
            psnr_images: eval.map_or(0, |e| e.psnr_images),
            psnr_held_out: eval.is_some_and(|e| e.psnr_held_out),
            final_loss: trained.final_loss,
        })
    }
}

/// A `train-vae` run's side of the [`Driver`]: the dataset, its split and the model.
struct VaeTask<'a> {
    /// The run's options and config.
    saved: &'a VaeSaved,
    out: &'a Path,
    device: &'a Device,
    data: ImageFolder,
    vae: AutoencoderKL,
    /// Training and held-out examples, and those the previews reconstruct.
    train: Vec<usize>,
    eval: Vec<usize>,
    preview: Vec<usize>,
    /// The image side, and the side of the training crops.
    res: usize,
    size: usize,
}

/// What the end of a `train-vae` run measured.
#[derive(Debug, Clone, Copy)]
struct VaeEval {
    scaling_factor: f64,
    psnr: f64,
    psnr_images: usize,
    psnr_held_out: bool,
}

/// A `train-vae` batch made ready: its pixels, loss weights and posterior noise.
struct VaeBatch {
    /// The images, `[B, 3, size, size]` in [-1, 1].
    x: Tensor,
    /// The object weights `[B, 1, size, size]`, with an `object_weight` other than 1.
    weights: Option<Tensor>,
    /// The posterior's noise, `[B, latent_channels, h, w]`.
    noise: Tensor,
}

impl Task for VaeTask<'_> {
    type Exported = VaeEval;
    type Batch = VaeBatch;

    fn optim(&self) -> &OptimOptions {
        &self.saved.options.optim
    }

    fn train_indices(&self) -> &[usize] {
        &self.train
    }

    fn prepare(&mut self, idx: &[usize], rng: &mut TorchRng) -> Result<VaeBatch> {
        let (o, dev, size) = (&self.saved.options, self.device, self.size);
        // Draw order (fixed, so a resumed run draws the same): crops and flips, then the
        // posterior's noise, of the latents' shape (each downsampling halves a side, rounding
        // down, as the encoder's strided convolutions do).
        let augments = draw_augments(rng, idx.len(), self.res, size, o.random_flip);
        let pixels = self.data.batch_pixels(idx, &augments, size)?;
        let shape = (idx.len(), 3, size, size);
        // The object mask comes from the host pixels, before upload: no copy back per step.
        let weights = (o.object_weight != 1.0)
            .then(|| object_weights(&pixels, shape, o.object_weight, o.object_margin))
            .map(|m| Tensor::from_vec(m, (idx.len(), 1, size, size), dev))
            .transpose()?;
        let x = Tensor::from_vec(pixels, shape, dev)?;
        let cfg = self.vae.config();
        let side = (1..cfg.block_out_channels.len()).fold(size, |s, _| s / 2);
        let noise = rng.randn(&[idx.len(), cfg.latent_channels, side, side], DType::F32, dev)?;
        Ok(VaeBatch { x, weights, noise })
    }

    fn loss(&self, batch: &VaeBatch, shard: &Shard) -> Result<Loss> {
        let (o, size) = (&self.saved.options, self.size);
        let x = shard.rows(&batch.x)?;
        let post = self.vae.encode(&x)?;
        let noise = shard.rows(&batch.noise)?;
        if noise.dims() != post.mean.dims() {
            return Err(TrainError::Msg(format!(
                "the posterior's noise has shape {:?}, the latents {:?}",
                noise.dims(),
                post.mean.dims()
            )));
        }
        let z = post.sample_with(&noise)?;
        let diff = (self.vae.decode(&z)? - &x)?;
        let elems = (3 * size * size) as f64;
        let (l1, mse) = match &batch.weights {
            None => (diff.abs()?.mean_all()?, diff.sqr()?.mean_all()?),
            Some(m) => {
                let m = shard.rows(m)?;
                (
                    diff.abs()?.broadcast_mul(&m)?.mean_all()?,
                    diff.sqr()?.broadcast_mul(&m)?.mean_all()?,
                )
            }
        };
        let kl = post.kl()?.mean_all()?;
        let (l1, mse, kl) = (shard.weighted(l1)?, shard.weighted(mse)?, shard.weighted(kl)?);
        let total = ((l1.affine(o.l1_weight, 0.0)? + mse.affine(o.mse_weight, 0.0)?)?
            + kl.affine(o.kl_weight / elems, 0.0)?)?;
        let terms = vec![
            ("l1".to_string(), l1.to_scalar::<f32>()?),
            ("mse".to_string(), mse.to_scalar::<f32>()?),
            ("kl".to_string(), kl.to_scalar::<f32>()?),
        ];
        Ok(Loss { total, terms })
    }

    fn preview(&self, path: &Path) -> Result<()> {
        let originals = self.data.batch(&self.preview, self.device)?;
        let recon = reconstruct(&self.vae, &originals)?;
        save(&grid(&[to_images(&originals)?, to_images(&recon)?], 2), path)
    }

    fn export(&self, weights: HashMap<String, Tensor>, sink: Sink) -> Result<VaeEval> {
        let (o, data, dev) = (&self.saved.options, &self.data, self.device);
        sink(Event::Phase("measuring the latent scale".into()));
        let scale_idx: Vec<usize> = self.train.iter().take(SCALE_IMAGES).copied().collect();
        let scaling_factor = latent_scaling_factor(&self.vae, data, &scale_idx, o.optim.seed, dev)?;
        sink(Event::Note(format!("scaling_factor = {scaling_factor:.5} (1 / std of the latents)")));
        let (psnr_set, held_out) =
            if self.eval.is_empty() { (&self.train, false) } else { (&self.eval, true) };
        sink(Event::Phase(format!("reconstructing {} images", psnr_set.len())));
        let psnr = mean_psnr(&self.vae, data, psnr_set, dev)?;

        let mut exported = self.saved.config.clone();
        if let Value::Object(m) = &mut exported {
            m.insert("scaling_factor".into(), serde_json::json!(scaling_factor));
            m.insert("sample_size".into(), serde_json::json!(self.res));
        }
        write_diffusers_model(self.out, "AutoencoderKL", &exported, &weights, DType::F32)?;
        Ok(VaeEval { scaling_factor, psnr, psnr_images: psnr_set.len(), psnr_held_out: held_out })
    }
}

/// A pixel whose largest channel difference from the background exceeds this (in [-1, 1]
/// units, about 13 of 255) belongs to an object: anti-aliased edges count, JPEG-level noise
/// does not.
const OBJECT_THRESHOLD: f32 = 0.1;

/// Per-pixel loss weights, row-major `[B, 1, H, W]`, for images `x` (row-major `[B, C, H, W]`):
/// `weight` where a pixel differs from its image's background (the per-channel median of the
/// border) or lies within `margin` pixels (Chebyshev distance) of such a pixel, else 1.
pub fn object_weights(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    weight: f64,
    margin: usize,
) -> Vec<f32> {
    let mut out = vec![1f32; b * h * w];
    let mut object = vec![false; h * w];
    for (i, img) in x.chunks_exact(c * h * w).enumerate() {
        let bg: Vec<f32> = img
            .chunks_exact(h * w)
            .map(|plane| border_median(w, h, |p| plane[p]).unwrap_or(0.0))
            .collect();
        for (p, o) in object.iter_mut().enumerate() {
            *o = (0..c).any(|ch| (img[ch * h * w + p] - bg[ch]).abs() > OBJECT_THRESHOLD);
        }
        let out = &mut out[i * h * w..(i + 1) * h * w];
        for (p, &o) in object.iter().enumerate() {
            if !o {
                continue;
            }
            let (x, y) = (p % w, p / w);
            for yy in y.saturating_sub(margin)..(y + margin + 1).min(h) {
                for xx in x.saturating_sub(margin)..(x + margin + 1).min(w) {
                    out[yy * w + xx] = weight as f32;
                }
            }
        }
    }
    out
}

/// Random crops and flips for `n` examples, drawn from `rng` in a fixed order (crop corner x,
/// corner y, flip for each example) so that a resumed run draws the same ones.
fn draw_augments(
    rng: &mut TorchRng,
    n: usize,
    res: usize,
    size: usize,
    flip: bool,
) -> Vec<Augment> {
    (0..n)
        .map(|_| {
            let mut a = Augment::default();
            if size < res {
                let span = (res - size + 1) as f64;
                a.x0 = ((rng.uniform_f64() * span) as usize).min(res - size);
                a.y0 = ((rng.uniform_f64() * span) as usize).min(res - size);
            }
            if flip {
                a.flip = rng.uniform_f64() < 0.5;
            }
            a
        })
        .collect()
}

/// Reconstructions through the posterior mean, without building a graph.
pub fn reconstruct(vae: &AutoencoderKL, x: &Tensor) -> Result<Tensor> {
    let mut out = Vec::new();
    for start in (0..x.dim(0)?).step_by(EVAL_BATCH) {
        let n = EVAL_BATCH.min(x.dim(0)? - start);
        let chunk = x.narrow(0, start, n)?;
        let z = vae.encode(&chunk)?.mean.detach();
        out.push(vae.decode(&z)?.detach());
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// `1 / std(z)` over posterior samples of `indices`, with noise from a generator of its own
/// (so the value does not depend on how the run was interrupted).
pub fn latent_scaling_factor(
    vae: &AutoencoderKL,
    data: &ImageFolder,
    indices: &[usize],
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let mut rng = TorchRng::new(derive_seed(seed, 5));
    let (mut sum, mut sum2, mut n) = (0f64, 0f64, 0f64);
    for chunk in indices.chunks(EVAL_BATCH) {
        let post = vae.encode(&data.batch(chunk, device)?)?;
        let noise = rng.randn(post.mean.dims(), DType::F32, device)?;
        let z = post.sample_with(&noise)?.detach().flatten_all()?.to_vec1::<f32>()?;
        for v in z {
            sum += v as f64;
            sum2 += (v as f64).powi(2);
            n += 1.0;
        }
    }
    // torch.std is the unbiased estimate.
    let var = (sum2 - sum * sum / n) / (n - 1.0).max(1.0);
    if !(var > 0.0 && var.is_finite()) {
        return Err(TrainError::msg(format!("the latents have variance {var}: cannot scale them")));
    }
    Ok(1.0 / var.sqrt())
}

/// Mean per-image PSNR of reconstructions (posterior mean) of `indices`.
pub fn mean_psnr(
    vae: &AutoencoderKL,
    data: &ImageFolder,
    indices: &[usize],
    device: &Device,
) -> Result<f64> {
    let mut total = 0.0;
    let mut n = 0usize;
    for chunk in indices.chunks(EVAL_BATCH) {
        let x = data.batch(chunk, device)?;
        let recon = to_images(&reconstruct(vae, &x)?)?;
        for (img, &i) in recon.iter().zip(chunk) {
            if let Some(orig) = data.image(i) {
                // Identical images would give inf; cap at 100 dB so the mean stays finite.
                total += psnr(&orig, img).min(100.0);
                n += 1;
            }
        }
    }
    Ok(if n == 0 { 0.0 } else { total / n as f64 })
}

/// Reads a diffusers VAE config file as JSON (to hand to [`VaeTrainer`]).
pub fn read_vae_config(path: &Path) -> Result<Value> {
    let v = crate::export::read_json(path)?;
    read_config(&v).map_err(|e| TrainError::msg(format!("{}: {e}", path.display())))?;
    Ok(v)
}

/// The files a finished `train-vae` run leaves in its output folder.
pub fn vae_files(out: &Path) -> [PathBuf; 2] {
    [out.join("config.json"), out.join("diffusion_pytorch_model.safetensors")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_weights_mark_pixels_unlike_the_border() {
        // Two 4×4 images: a blue field with a red 2×2 square at (1, 1), and a flat grey one.
        let (s, n) = (4, 16);
        let mut v = vec![0f32; 2 * 3 * n];
        for p in 0..n {
            let inside = (1..3).contains(&(p % s)) && (1..3).contains(&(p / s));
            let rgb = if inside { [0.9, -0.8, -0.8] } else { [-0.8, -0.6, 0.7] };
            for c in 0..3 {
                v[c * n + p] = rgb[c];
                // Grey, with a difference just under the threshold at one pixel.
                v[3 * n + c * n + p] = if p == 5 { 0.05 } else { 0.0 };
            }
        }
        let w = object_weights(&v, (2, 3, s, s), 10.0, 0);
        let expect: Vec<f32> = (0..n)
            .map(|p| if [5, 6, 9, 10].contains(&p) { 10.0 } else { 1.0 })
            .chain(std::iter::repeat_n(1.0, n))
            .collect();
        assert_eq!(w, expect);

        // A margin of one pixel marks the square's neighbours too, diagonals included: all of
        // the 4×4 image except nothing (the 2×2 square at (1, 1) grown by 1 covers it).
        let w = object_weights(&v, (2, 3, s, s), 10.0, 1);
        assert!(w[..n].iter().all(|&m| m == 10.0), "{w:?}");
        assert!(w[n..].iter().all(|&m| m == 1.0), "{w:?}");
        // On a 6×6 field with one object pixel at (1, 1), margin 1 marks (0..3)², not (3, 3).
        let (s, n) = (6, 36);
        let mut v = vec![0f32; 3 * n];
        v[s + 1] = 0.9;
        let w = object_weights(&v, (1, 3, s, s), 5.0, 1);
        let expect: Vec<f32> =
            (0..n).map(|p| if p % s < 3 && p / s < 3 { 5.0 } else { 1.0 }).collect();
        assert_eq!(w, expect);
    }
}
