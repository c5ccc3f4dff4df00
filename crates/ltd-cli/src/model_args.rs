//! The flags that choose and place a model (and how its attention runs), shared by `ltd-gen`
//! and `ltd-serve` (flattened into each one's arguments), and the loading they describe.
//!
//! Two groups rather than one so that `ltd-gen --help` keeps its order: the model near the
//! top, the device at the end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ltd_nn::attention::{AttentionImpl, AttentionOptions};
use ltd_nn::{default_dtype, parse_dtype, DeviceChoice, Quantization, RuntimeOptions};
use ltd_pipeline::{LoadOptions, ModelSource, Pipeline};

use crate::default_model;

/// `--model`, `--config`, `--vae`, `--prediction-type`, `--variant`, `--quantize`,
/// `--quantized-unet`.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelArgs {
    /// Model: a local diffusers folder, a single-file checkpoint (.safetensors in the original
    /// layout of A1111/ComfyUI/civitai: SD 1.x, 2.x or XL, recognised from its keys), or a
    /// Hugging Face hub repo id (owner/name[@revision]), fetched into the hub cache (honours
    /// HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT). Default: the embedded default model.
    #[arg(short, long, value_name = "FOLDER|FILE|REPO")]
    pub model: Option<String>,

    /// For a single-file --model: a diffusers folder whose configs and tokenizers to use
    /// (diffusers' from_single_file(config=...)), for fine-tunes of unusual shape. Default: the
    /// official configs of the checkpoint's family.
    #[arg(long, value_name = "FOLDER")]
    pub config: Option<PathBuf>,

    /// Replace the model's VAE: a diffusers vae/ folder, or a single .safetensors VAE (original
    /// or diffusers layout) of the model's VAE architecture.
    #[arg(long, value_name = "FOLDER|FILE")]
    pub vae: Option<PathBuf>,

    /// Override the scheduler's prediction type: epsilon, v_prediction or sample (e.g. for a
    /// 512-pixel SD 2.x epsilon checkpoint, which is indistinguishable from 2.1 768-v by keys).
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,

    /// Weights variant to load, e.g. fp16 (reads *.fp16.safetensors where present).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,

    /// Quantize the U-Net's transformer linear layers after loading, as stable-diffusion.cpp's
    /// --type does: q8_0 (ggml's 8-bit blocks; CPU). Convolutions stay in --dtype.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,

    /// Load the U-Net's weights from this GGUF file (written by ltd-gen --save-quantized-unet)
    /// instead of the model folder's; the architecture stays the folder's unet/config.json.
    #[arg(long, value_name = "FILE")]
    pub quantized_unet: Option<PathBuf>,
}

/// `--device`, `--dtype`, `--attention`.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: f32, f16, bf16. Default: f16 on a GPU, f32 on the CPU.
    #[arg(long)]
    pub dtype: Option<String>,

    /// Attention implementation: auto (FlashAttention on CUDA in f16/bf16 when built with
    /// `flash-attn`, else the fused CPU kernel or the memory-bounded path), flash, chunked, naive.
    #[arg(long, default_value = "auto", value_name = "IMPL")]
    pub attention: String,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        Self { device: "auto".into(), dtype: None, attention: "auto".into() }
    }
}

impl DeviceArgs {
    /// Opens the device and picks the dtype; errors name the flag.
    pub fn load_options(&self, variant: Option<String>) -> Result<LoadOptions> {
        let device = self.device.parse::<DeviceChoice>().context("--device")?.open()?;
        let dtype = match &self.dtype {
            Some(d) => parse_dtype(d).context("--dtype")?,
            None => default_dtype(&device),
        };
        let attention: AttentionImpl =
            self.attention.parse().map_err(anyhow::Error::msg).context("--attention")?;
        // Checked here, before anything loads, so `--attention flash` where it cannot run is one
        // line naming the flag rather than a failure inside the first attention layer.
        attention
            .check(&device, dtype)
            .map_err(|e| anyhow::anyhow!("--attention {attention}: {e}"))?;
        let runtime = RuntimeOptions::with_attention(AttentionOptions {
            implementation: attention,
            ..Default::default()
        });
        Ok(LoadOptions { device, dtype, variant, runtime, ..Default::default() })
    }
}

impl ModelArgs {
    /// Where the model is, and the name images record (`Model:` in their parameters): the
    /// `--model` value, or the embedded default model (extracted on first use).
    pub fn source(&self) -> Result<(ModelSource, String)> {
        Ok(match &self.model {
            // A checkpoint file is named by its stem, as A1111 names it (`Model: dreamshaper_8`).
            Some(m) if Path::new(m).is_file() => {
                let stem = Path::new(m).file_stem().map(|s| s.to_string_lossy().into_owned());
                (ModelSource::parse(m), stem.unwrap_or_else(|| m.clone()))
            }
            Some(m) => (ModelSource::parse(m), m.clone()),
            None => (
                ModelSource::Local(default_model::folder()?),
                default_model::name().unwrap_or_default().to_string(),
            ),
        })
    }

    /// The `--quantize` format, checked.
    pub fn quantization(&self) -> Result<Option<Quantization>> {
        self.quantize.as_deref().map(str::parse::<Quantization>).transpose().context("--quantize")
    }

    /// Loads the model these flags name onto the device `device` names.
    pub fn load(&self, device: &DeviceArgs) -> Result<Pipeline> {
        self.load_with(&device.load_options(self.variant.clone())?)
    }

    /// Loads the model these flags name with `options` (shared with other pipelines of the
    /// same run, such as an SDXL refiner, so that all of them are on one device) and these
    /// flags' single-file settings.
    pub fn load_with(&self, options: &LoadOptions) -> Result<Pipeline> {
        let (source, name) = self.source()?;
        // A single-file checkpoint without --config takes the CLIP vocabulary of the embedded
        // model (the built-in official configs hold none).
        let vocabulary = match (&source, &self.config) {
            (ModelSource::Local(p), None) if p.is_file() && default_model::name().is_some() => {
                Some(default_model::folder()?.join("tokenizer"))
            }
            _ => None,
        };
        let options = LoadOptions {
            config: self.config.clone(),
            vae: self.vae.clone(),
            prediction_type: self.prediction_type.clone(),
            vocabulary,
            quantize: self.quantization()?,
            quantized_unet: self.quantized_unet.clone(),
            ..options.clone()
        };
        Ok(Pipeline::load(&source, &options)
            .with_context(|| format!("loading the model {source}"))?
            .with_name(name))
    }
}
