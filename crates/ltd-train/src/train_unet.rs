//! Training a text-conditioned `UNet2DConditionModel` on latents of a frozen VAE (Rombach et
//! al. 2022; diffusers' `train_text_to_image.py`), with a CLIP or T5 text encoder (see
//! [`crate::text_encoder`]) either frozen (loaded from a folder) or trained from scratch
//! together with the U-Net.
//!
//! Per step, for a batch of cached posteriors and captions:
//!
//! 1. `x₀ = scaling_factor · (μ + σ·ε_z)` (see [`crate::latents`]);
//! 2. `t ~ U{0, …, T−1}` (or biased, see [`crate::timestep_bias`]), `ε ~ N(0, I)`, `xₜ = √ᾱₜ x₀ + √(1−ᾱₜ) ε`;
//! 3. each caption replaced by the empty one with probability `caption_dropout` (so the model
//!    also learns the unconditional prediction classifier-free guidance needs);
//! 4. `loss = mean_b w_b · mean(‖unet(xₜ, t, text(c)) − target‖²)`, the target `ε` or
//!    `v = √ᾱₜ ε − √(1−ᾱₜ) x₀` as the scheduler config's `prediction_type` says, and `w_b = 1`
//!    or, with min-SNR-γ (Hang et al. 2023), `min(SNR, γ) / SNR` (ε) or `min(SNR, γ) / (SNR + 1)`
//!    (v);
//! 5. AdamW step, then the EMA of the trained weights.
//!
//! A frozen text encoder (loaded from a folder, or from scratch at `text_encoder_lr` 0) is
//! outside the graph: each caption's text states are computed once, alone (so that they do
//! not depend on which captions shared its batch, and a resumed run sees the same), and
//! cached like the latents; backward and the optimiser see the U-Net only.
//!
//! The output is a complete `StableDiffusionPipeline` folder; with EMA its weights are the
//! averaged ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ltd_nn::rng::TorchRng;
use ltd_nn::{NoiseSource, RuntimeOptions};
use ltd_scheduler::{NoiseSchedule, PredictionType, SchedulerConfig};
use ltd_text::Encoded;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};
use ltd_vae::AutoencoderKL;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::common::OptimOptions;
use crate::data::ImageFolder;
use crate::driver::{Driver, Loss, ParamGroup, Task};
use crate::error::{Result, TrainError};
use crate::export::{copy_files, model_index, write_diffusers_model, write_json};
use crate::images::{grid, save, to_images};
use crate::latents::LatentCache;
use crate::preview::{generate, PreviewModels, PreviewSettings};
use crate::progress::{Event, Sink};
use crate::shards::Shard;
use crate::text_encoder::{write_text_encoder, TextEncoder, TextEncoderKind, TextTokenizer};
use crate::timestep_bias::{self, TimestepBias};
use crate::RunControl;

/// Captions shown in the previews.
const PREVIEW_PROMPTS: usize = 8;

/// Options of `train-unet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UnetTrainOptions {
    /// Optimisation.
    #[serde(flatten)]
    pub optim: OptimOptions,
    /// Side of the training images (default: the VAE's `sample_size`).
    pub resolution: Option<usize>,
    /// Probability of training on the empty caption (for classifier-free guidance).
    pub caption_dropout: f64,
    /// `epsilon` or `v_prediction`, overriding the scheduler config (which is exported with it).
    pub prediction_type: Option<String>,
    /// min-SNR-γ loss weighting (γ = 5 in the paper); `None`: unweighted.
    pub snr_gamma: Option<f64>,
    /// Maximum decay of the EMA of the weights; `None`: no EMA.
    pub ema_decay: Option<f64>,
    /// Mirror training images left–right at random (leave off when captions name sides).
    pub random_flip: bool,
    /// Peak learning rate of a from-scratch text encoder, under the same warm-up and schedule
    /// (`None`: the U-Net's). A from-scratch CLIP at the U-Net's 1e-3 collapses: Adam moves
    /// its 0.02-scale embeddings by their own size in a few dozen steps, the update common to
    /// all tokens swamps the differences between words, and the U-Net stops seeing any word
    /// but the few it already uses (on make-shapes: position words were ignored; 1e-4 keeps
    /// them). `Some(0.0)` leaves it at its seeded random initialisation: a frozen random CLIP
    /// keeps all words apart, and on make-shapes it served the U-Net best.
    pub text_encoder_learning_rate: Option<f64>,
    /// Biased sampling of the training timesteps (default: uniform).
    pub timestep_bias: TimestepBias,
    /// Save the trained text encoder in float16 (halves its size; the token embedding
    /// dominates it).
    pub text_encoder_fp16: bool,
    /// Save the U-Net in float16.
    pub unet_fp16: bool,
    /// Denoising steps of the preview images written with each checkpoint (0: none).
    pub preview_steps: usize,
}

impl Default for UnetTrainOptions {
    fn default() -> Self {
        Self {
            optim: OptimOptions { learning_rate: 1e-4, ..OptimOptions::default() },
            resolution: None,
            caption_dropout: 0.1,
            prediction_type: None,
            snr_gamma: None,
            ema_decay: Some(0.999),
            random_flip: false,
            text_encoder_learning_rate: None,
            timestep_bias: TimestepBias::default(),
            text_encoder_fp16: false,
            unet_fp16: false,
            preview_steps: 20,
        }
    }
}

/// Where the text encoder comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextEncoderSource {
    /// A trained `CLIPTextModel` or `T5EncoderModel` folder, kept frozen.
    Frozen(PathBuf),
    /// A transformers `CLIPTextConfig` or `T5Config` (JSON), trained from scratch with the
    /// U-Net (or left at its seeded initialisation, at text-encoder learning rate 0).
    Scratch(Value),
}

impl TextEncoderSource {
    /// The family of the text encoder (from the folder's or the given config); an error names
    /// the folder's config file or `--text-encoder-config`.
    pub fn kind(&self) -> Result<TextEncoderKind> {
        match self {
            Self::Frozen(dir) => TextEncoderKind::of_folder(dir),
            Self::Scratch(cfg) => TextEncoderKind::of_config(cfg)
                .map_err(|m| TrainError::option("text-encoder-config", m)),
        }
    }
}

/// A `train-unet` run.
pub struct UnetTrainer<'a> {
    /// The dataset folder.
    pub data: &'a Path,
    /// The frozen VAE's folder (diffusers layout).
    pub vae: &'a Path,
    /// The U-Net config (JSON) to train from scratch.
    pub unet_config: &'a Value,
    /// The text encoder.
    pub text_encoder: TextEncoderSource,
    /// The tokenizer folder of the text encoder's family (copied into the pipeline).
    pub tokenizer: &'a Path,
    /// The scheduler config (JSON) the pipeline ships; its betas define the noise schedule.
    pub scheduler_config: &'a Value,
    /// The output folder.
    pub out: &'a Path,
    /// The options (ignored on resume in favour of the checkpoint's).
    pub options: UnetTrainOptions,
    /// The device.
    pub device: Device,
}

/// What a `train-unet` run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetOutcome {
    /// Steps done.
    pub steps_done: usize,
    /// Whether the run stopped before its last step (nothing was exported then).
    pub stopped: bool,
    /// Mean loss of the last 50 steps.
    pub final_loss: Option<f32>,
}

/// What a checkpoint records besides the common state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UnetSaved {
    #[serde(flatten)]
    options: UnetTrainOptions,
    unet_config: Value,
    text_encoder: TextEncoderSource,
    scheduler_config: Value,
    vae: PathBuf,
    tokenizer: PathBuf,
}

fn parse_unet_config(raw: &Value) -> Result<UNetConfig> {
    let parsed: UNet2DConditionModelConfig = serde_json::from_value(raw.clone())
        .map_err(|e| TrainError::msg(format!("U-Net config: {e}")))?;
    UNetConfig::try_from(parsed).map_err(|e| TrainError::Model(e.into()))
}

/// The scheduler config with the requested prediction type written into it.
fn scheduler_with(raw: &Value, prediction: Option<&str>) -> Result<(Value, SchedulerConfig)> {
    let mut v = raw.clone();
    if let (Some(p), Value::Object(m)) = (prediction, &mut v) {
        PredictionType::parse("prediction_type", p)
            .map_err(|e| TrainError::option("prediction-type", e.message))?;
        m.insert("prediction_type".into(), json!(p));
    }
    let cfg = SchedulerConfig::from_json_str(&v.to_string(), Path::new("scheduler_config.json"))?;
    cfg.scheduler_class().map_err(|e| TrainError::Model(e.into()))?;
    Ok((v, cfg))
}

/// Names of variables under `prefix.`, with the prefix removed.
fn strip(tensors: HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let p = format!("{prefix}.");
    tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v)))
        .collect()
}

impl UnetTrainer<'_> {
    /// Trains, checkpointing and reporting through `sink`; writes the pipeline at the end.
    pub fn run(&self, control: &RunControl, sink: Sink) -> Result<UnetOutcome> {
        let dev = &self.device;
        let mut driver = Driver::new(self.out, "unet", *control, dev);
        let saved = driver.options(|| UnetSaved {
            options: self.options.clone(),
            unet_config: self.unet_config.clone(),
            text_encoder: self.text_encoder.clone(),
            scheduler_config: self.scheduler_config.clone(),
            vae: self.vae.to_path_buf(),
            tokenizer: self.tokenizer.to_path_buf(),
        })?;
        let o = &saved.options;
        o.optim.check()?;
        let text_kind = saved.text_encoder.kind()?;
        if !(0.0..1.0).contains(&o.caption_dropout) {
            return Err(TrainError::option("caption-dropout", "must be in [0, 1)"));
        }
        if let Some(lr) = o.text_encoder_learning_rate {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(TrainError::option("text-encoder-lr", "must be finite and ≥ 0"));
            }
            if matches!(saved.text_encoder, TextEncoderSource::Frozen(_)) {
                return Err(TrainError::option(
                    "text-encoder-lr",
                    "only applies to a text encoder trained from scratch (--text-encoder-config)",
                ));
            }
        }
        let rt = RuntimeOptions::default();
        let (scheduler_json, scheduler_cfg) =
            scheduler_with(&saved.scheduler_config, o.prediction_type.as_deref())?;
        let schedule =
            NoiseSchedule::from_config(&scheduler_cfg).map_err(|e| TrainError::Model(e.into()))?;
        let unet_cfg = parse_unet_config(&saved.unet_config)?;
        let t_cdf = o.timestep_bias.cdf(schedule.num_train_timesteps())?;

        sink(Event::Phase(format!("loading the VAE from {}", saved.vae.display())));
        let vae = AutoencoderKL::load(&saved.vae, None, DType::F32, dev, &rt)?;
        let res = o.resolution.unwrap_or(vae.config().sample_size);
        let fs = vae.config().scale_factor();
        if res % fs != 0 {
            return Err(TrainError::option(
                "resolution",
                format!("{res} is not a multiple of the VAE's scale factor {fs}"),
            ));
        }
        if unet_cfg.in_channels != vae.config().latent_channels {
            return Err(TrainError::msg(format!(
                "the U-Net takes {} channels but the VAE's latents have {}",
                unet_cfg.in_channels,
                vae.config().latent_channels
            )));
        }
        sink(Event::Phase(format!("reading {} at {res}x{res}", self.data.display())));
        let data = ImageFolder::open(self.data, res)?;

        let tokenizer = TextTokenizer::load(text_kind, &saved.tokenizer)?;
        let encoded: Vec<Encoded> =
            data.examples().iter().map(|e| tokenizer.encode(&e.text)).collect::<Result<_>>()?;
        let empty = tokenizer.encode("")?;

        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let unet = UNet2DConditionModel::new(vb.pp("unet"), &unet_cfg, &rt)?;
        let text_encoder = match &saved.text_encoder {
            TextEncoderSource::Frozen(dir) => TextEncoder::load(text_kind, dir, dev, &rt)?,
            TextEncoderSource::Scratch(cfg) => TextEncoder::new(vb.pp("text_encoder"), cfg, &rt)?,
        };
        if unet_cfg.encoder_hidden_dim() != text_encoder.width() {
            return Err(TrainError::msg(format!(
                "the U-Net takes text states {} wide (encoder_hid_dim, else \
                 cross_attention_dim) but the text encoder gives {} ({} of its config)",
                unet_cfg.encoder_hidden_dim(),
                text_encoder.width(),
                match text_kind {
                    TextEncoderKind::Clip => "hidden_size",
                    TextEncoderKind::T5 => "d_model",
                }
            )));
        }
        driver.start(data.len(), sink)?;
        sink(Event::Phase(format!("caching the latents of {} images", data.len())));
        let cache = LatentCache::build(&vae, &data, o.random_flip, dev)?;
        let frozen_text = match &saved.text_encoder {
            TextEncoderSource::Frozen(_) => true,
            TextEncoderSource::Scratch(_) => o.text_encoder_learning_rate == Some(0.0),
        };
        let mut task = UnetTask {
            text_cache: frozen_text.then(HashMap::new),
            saved: &saved,
            out: self.out,
            device: dev,
            train: (0..data.len()).collect(),
            preview_prompts: preview_prompts(&data, &encoded),
            latent_dims: cache.latent_dims(),
            latent_size: res / fs,
            vae,
            cache,
            encoded,
            empty,
            unet,
            text_encoder,
            schedule,
            t_cdf,
            scheduler_cfg,
            scheduler_json,
        };
        let trained = driver.train(&saved, &varmap, &mut task, sink)?;
        Ok(UnetOutcome {
            steps_done: trained.steps_done,
            stopped: trained.exported.is_none(),
            final_loss: trained.final_loss,
        })
    }
}

/// A `train-unet` run's side of the [`Driver`]: the frozen VAE's cached latents, the
/// captions, the models and the noise schedule.
struct UnetTask<'a> {
    /// The run's options and configs.
    saved: &'a UnetSaved,
    out: &'a Path,
    device: &'a Device,
    /// Every example trains.
    train: Vec<usize>,
    /// The preview captions, tokenized.
    preview_prompts: Vec<Encoded>,
    /// `[C, h, w]` of one latent.
    latent_dims: Vec<usize>,
    /// The side of the latents (the exported U-Net's `sample_size`).
    latent_size: usize,
    vae: AutoencoderKL,
    cache: LatentCache,
    /// Each example's caption, tokenized, and the empty caption.
    encoded: Vec<Encoded>,
    empty: Encoded,
    unet: UNet2DConditionModel,
    text_encoder: TextEncoder,
    /// A frozen text encoder's states `[tokens, hidden]` per caption's ids, filled as
    /// captions first appear; `None` when the text encoder trains.
    text_cache: Option<HashMap<Vec<u32>, Tensor>>,
    schedule: NoiseSchedule,
    /// The timestep distribution of a `timestep_bias` (`None`: uniform).
    t_cdf: Option<Vec<f64>>,
    /// The scheduler config the pipeline ships, parsed and as JSON.
    scheduler_cfg: SchedulerConfig,
    scheduler_json: Value,
}

/// A `train-unet` batch made ready: everything drawn, the text states of a frozen text
/// encoder looked up.
struct UnetBatch {
    /// The noised latents and the prediction's target, `[B, C, h, w]`.
    noisy: Tensor,
    target: Tensor,
    /// Each example's timestep.
    ts: Vec<usize>,
    /// Each example's caption (the empty one where dropped).
    captions: Vec<Encoded>,
    /// A frozen text encoder's states `[B, tokens, hidden]`; `None` when it trains.
    context: Option<Tensor>,
    /// Each example's min-SNR-γ weight, with `--snr-gamma`.
    snr_weights: Option<Vec<f32>>,
}

impl Task for UnetTask<'_> {
    type Exported = ();
    type Batch = UnetBatch;

    fn optim(&self) -> &OptimOptions {
        &self.saved.options.optim
    }

    fn ema_decay(&self) -> Option<f64> {
        self.saved.options.ema_decay
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        let lr = self.saved.options.text_encoder_learning_rate;
        lr.map(|learning_rate| ParamGroup {
            prefix: "text_encoder.",
            learning_rate,
            option: "text-encoder-lr",
        })
        .into_iter()
        .collect()
    }

    fn train_indices(&self) -> &[usize] {
        &self.train
    }

    fn prepare(&mut self, idx: &[usize], rng: &mut TorchRng) -> Result<UnetBatch> {
        let (o, dev, schedule) = (&self.saved.options, self.device, &self.schedule);
        let b = idx.len();
        // Draw order (fixed, so a resumed run draws the same): flips, posterior noise,
        // diffusion noise, timesteps, caption dropout.
        let flips: Vec<bool> = (0..b).map(|_| o.random_flip && rng.uniform_f64() < 0.5).collect();
        let mut shape = vec![b];
        shape.extend_from_slice(&self.latent_dims);
        let z_noise = rng.randn(&shape, DType::F32, dev)?;
        let x0 = self.vae.config().scale_latents(&self.cache.sample(idx, &flips, &z_noise)?)?;
        let noise = rng.randn(&shape, DType::F32, dev)?;
        let ts: Vec<usize> = match &self.t_cdf {
            None => {
                let t_max = schedule.num_train_timesteps() as i64;
                rng.randint(0, t_max, b)?.into_iter().map(|t| t as usize).collect()
            }
            Some(cdf) => (0..b).map(|_| timestep_bias::sample(cdf, rng.uniform_f64())).collect(),
        };
        let dropped: Vec<bool> = (0..b).map(|_| rng.uniform_f64() < o.caption_dropout).collect();
        let captions: Vec<Encoded> = idx
            .iter()
            .zip(&dropped)
            .map(|(&i, &d)| if d { self.empty.clone() } else { self.encoded[i].clone() })
            .collect();

        let noisy = schedule.add_noise(&x0, &noise, &ts)?;
        let target = schedule.target(&x0, &noise, &ts)?;
        // A frozen text encoder's states come from the cache, for the whole batch; a trained
        // one runs in each shard's graph.
        let context = match &mut self.text_cache {
            Some(cache) => Some(cached_text_states(cache, &self.text_encoder, &captions, dev)?),
            None => None,
        };
        let snr_weights = o.snr_gamma.map(|gamma| snr_weights(schedule, &ts, gamma)).transpose()?;
        Ok(UnetBatch { noisy, target, ts, captions, context, snr_weights })
    }

    fn loss(&self, batch: &UnetBatch, shard: &Shard) -> Result<Loss> {
        let dev = self.device;
        let context = match &batch.context {
            Some(states) => shard.rows(states)?,
            None => self.text_encoder.forward(shard.of(&batch.captions), dev)?,
        };
        let ts = shard.of(&batch.ts);
        let t_in =
            Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), ts.len(), dev)?;
        let (noisy, target) = (shard.rows(&batch.noisy)?, shard.rows(&batch.target)?);
        let pred = self.unet.forward(&noisy, &t_in, &context, &UNetConditioning::default())?;
        let per_sample = (pred - target)?.sqr()?.mean((1, 2, 3))?;
        let mean = match &batch.snr_weights {
            None => per_sample.mean_all()?,
            Some(w) => {
                let w = shard.of(w).to_vec();
                (per_sample * Tensor::from_vec(w, ts.len(), dev)?)?.mean_all()?
            }
        };
        let total = shard.weighted(mean)?;
        // The batch's mean timestep shows in the log what `timestep_bias` drew.
        let mean_t = ts.iter().sum::<usize>() as f32 / shard.batch as f32;
        Ok(Loss { total, terms: vec![("timestep_mean".to_string(), mean_t)] })
    }

    fn previews(&self) -> bool {
        self.saved.options.preview_steps > 0
    }

    fn preview(&self, path: &Path) -> Result<()> {
        let models = PreviewModels {
            unet: &self.unet,
            text_encoder: &self.text_encoder,
            vae: &self.vae,
            scheduler: &self.scheduler_cfg,
            device: self.device,
        };
        let o = &self.saved.options;
        let settings = PreviewSettings {
            steps: o.preview_steps,
            seed: o.optim.seed,
            ..PreviewSettings::default()
        };
        let (prompts, uncond) = (&self.preview_prompts, &self.empty);
        let images = generate(&models, prompts, uncond, &self.latent_dims, settings)?;
        save(&grid(&[to_images(&images)?], 2), path)
    }

    fn export(&self, weights: HashMap<String, Tensor>, sink: Sink) -> Result<()> {
        let (saved, o, out) = (self.saved, &self.saved.options, self.out);
        sink(Event::Phase(format!("writing the pipeline to {}", out.display())));
        let mut unet_json = saved.unet_config.clone();
        if let Value::Object(m) = &mut unet_json {
            m.insert("sample_size".into(), json!(self.latent_size));
        }
        let unet_dtype = if o.unet_fp16 { DType::F16 } else { DType::F32 };
        write_diffusers_model(
            &out.join("unet"),
            "UNet2DConditionModel",
            &unet_json,
            &strip(weights.clone(), "unet"),
            unet_dtype,
        )?;
        match &saved.text_encoder {
            TextEncoderSource::Frozen(dir) => copy_files(dir, &out.join("text_encoder"))?,
            TextEncoderSource::Scratch(cfg) => {
                let dtype = if o.text_encoder_fp16 { DType::F16 } else { DType::F32 };
                let dir = out.join("text_encoder");
                write_text_encoder(&dir, cfg, &strip(weights, "text_encoder"), dtype)?;
            }
        }
        copy_vae(&saved.vae, &out.join("vae"))?;
        copy_files(&saved.tokenizer, &out.join("tokenizer"))?;
        let class = self.scheduler_cfg.class_name.clone().unwrap_or_default();
        let sched_dir = out.join("scheduler");
        std::fs::create_dir_all(&sched_dir).map_err(|e| TrainError::io(&sched_dir, e))?;
        write_json(
            &sched_dir.join("scheduler_config.json"),
            &crate::export::diffusers_config(&class, &self.scheduler_json),
        )?;
        write_json(&out.join("model_index.json"), &model_index(&class, self.text_encoder.kind()))
    }
}

/// The frozen text encoder's states of a batch of captions `[B, tokens, hidden]`, from
/// `cache`, computing (alone, detached) and caching those of captions not seen before.
fn cached_text_states(
    cache: &mut HashMap<Vec<u32>, Tensor>,
    text_encoder: &TextEncoder,
    batch: &[Encoded],
    dev: &Device,
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(batch.len());
    for e in batch {
        let states = match cache.get(&e.ids) {
            Some(s) => s.clone(),
            None => {
                let s = text_encoder.forward(std::slice::from_ref(e), dev)?;
                let s = s.squeeze(0)?.detach();
                cache.insert(e.ids.clone(), s.clone());
                s
            }
        };
        rows.push(states);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// min-SNR-γ weights of diffusers' training script.
fn snr_weights(schedule: &NoiseSchedule, ts: &[usize], gamma: f64) -> Result<Vec<f32>> {
    ts.iter()
        .map(|&t| {
            let snr = schedule.snr(t)?;
            let w = snr.min(gamma);
            Ok(match schedule.prediction_type() {
                PredictionType::VPrediction => w / (snr + 1.0),
                PredictionType::Epsilon => w / snr,
                PredictionType::Sample => w,
            } as f32)
        })
        .collect()
}

/// The first distinct captions of the dataset, tokenized, for the previews.
fn preview_prompts(data: &ImageFolder, encoded: &[Encoded]) -> Vec<Encoded> {
    let mut seen = Vec::new();
    let mut picked = Vec::new();
    for (e, ids) in data.examples().iter().zip(encoded) {
        if !seen.contains(&e.text) {
            seen.push(e.text.clone());
            picked.push(ids.clone());
        }
        if picked.len() == PREVIEW_PROMPTS {
            break;
        }
    }
    picked
}

/// Copies a VAE folder's config and weights (not its training files).
fn copy_vae(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| TrainError::io(dst, e))?;
    for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
        let from = src.join(name);
        let bytes = std::fs::read(&from).map_err(|e| TrainError::io(&from, e))?;
        crate::checkpoint::write_atomic(&dst.join(name), &bytes)?;
    }
    Ok(())
}

/// Reads a JSON config file.
pub fn read_config(path: &Path) -> Result<Value> {
    crate::export::read_json(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(prediction: &str) -> NoiseSchedule {
        let v = json!({"_class_name": "DDPMScheduler", "prediction_type": prediction});
        NoiseSchedule::from_config(&scheduler_with(&v, None).unwrap().1).unwrap()
    }

    #[test]
    fn min_snr_weights_follow_diffusers() {
        let (eps, v) = (schedule("epsilon"), schedule("v_prediction"));
        for t in [0usize, 10, 500, 999] {
            let snr = eps.snr(t).unwrap();
            let w_eps = snr_weights(&eps, &[t], 5.0).unwrap()[0] as f64;
            let w_v = snr_weights(&v, &[t], 5.0).unwrap()[0] as f64;
            // f32 weights: 1e-6 relative.
            assert!((w_eps - snr.min(5.0) / snr).abs() <= 1e-6 * w_eps, "{t}");
            assert!((w_v - snr.min(5.0) / (snr + 1.0)).abs() <= 1e-6 * w_v, "{t}");
        }
        // Low noise (high SNR) is down-weighted, high noise keeps weight 1 for ε.
        assert!(snr_weights(&eps, &[0], 5.0).unwrap()[0] < 0.01);
        assert_eq!(snr_weights(&eps, &[999], 5.0).unwrap()[0], 1.0);
    }

    #[test]
    fn prediction_type_override_is_checked_and_written() {
        let v = json!({"_class_name": "DDIMScheduler", "prediction_type": "epsilon"});
        let (json, cfg) = scheduler_with(&v, Some("v_prediction")).unwrap();
        assert_eq!(json["prediction_type"], "v_prediction");
        assert_eq!(cfg.prediction_type.as_deref(), Some("v_prediction"));
        let err = scheduler_with(&v, Some("x0")).unwrap_err().to_string();
        assert!(err.starts_with("--prediction-type"), "{err}");
    }
}
