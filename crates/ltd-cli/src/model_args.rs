//! The flags that choose and place a model, shared by `ltd-gen` and `ltd-serve` (flattened
//! into each one's arguments), and the loading they describe.
//!
//! Two groups rather than one so that `ltd-gen --help` keeps its order: the model near the
//! top, the device at the end.

use anyhow::{Context, Result};
use clap::Args;
use ltd_nn::{default_dtype, parse_dtype, DeviceChoice};
use ltd_pipeline::{LoadOptions, ModelSource, Pipeline};

use crate::default_model;

/// `--model`, `--variant`.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelArgs {
    /// Model: a local diffusers folder, or a Hugging Face hub repo id (owner/name[@revision]),
    /// fetched into the hub cache (honours HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT).
    /// Default: the embedded default model.
    #[arg(short, long, value_name = "FOLDER|REPO")]
    pub model: Option<String>,

    /// Weights variant to load, e.g. fp16 (reads *.fp16.safetensors where present).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
}

/// `--device`, `--dtype`.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: f32, f16, bf16. Default: f16 on a GPU, f32 on the CPU.
    #[arg(long)]
    pub dtype: Option<String>,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        Self { device: "auto".into(), dtype: None }
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
        Ok(LoadOptions { device, dtype, variant, ..Default::default() })
    }
}

impl ModelArgs {
    /// Where the model is, and the name images record (`Model:` in their parameters): the
    /// `--model` value, or the embedded default model (extracted on first use).
    pub fn source(&self) -> Result<(ModelSource, String)> {
        Ok(match &self.model {
            Some(m) => (ModelSource::parse(m), m.clone()),
            None => (
                ModelSource::Local(default_model::folder()?),
                default_model::name().unwrap_or_default().to_string(),
            ),
        })
    }

    /// Loads the model these flags name onto the device `device` names.
    pub fn load(&self, device: &DeviceArgs) -> Result<Pipeline> {
        self.load_with(&device.load_options(self.variant.clone())?)
    }

    /// Loads the model these flags name with `options` (shared with other pipelines of the
    /// same run, such as an SDXL refiner, so that all of them are on one device).
    pub fn load_with(&self, options: &LoadOptions) -> Result<Pipeline> {
        let (source, name) = self.source()?;
        Ok(Pipeline::load(&source, options)
            .with_context(|| format!("loading the model {source}"))?
            .with_name(name))
    }
}
