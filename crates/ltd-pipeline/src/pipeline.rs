//! A loaded pipeline: the components of a model folder, ready to generate many times.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use ltd_nn::{RuntimeOptions, WeightPatches};
use ltd_scheduler::{SamplerKind, SchedulerConfig};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConfig};
use ltd_vae::AutoencoderKL;

use crate::error::{PipelineError, Result};
use crate::lora::{build_patches, Component, LoadedLora, LoraSpec, Target};
use crate::model_index::{ModelIndex, PipelineKind};
use crate::source::ModelSource;
use crate::text::TextEncoders;
use crate::textual_inversion::{read_embedding, LoadedEmbedding};

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the models run.
    pub device: Device,
    /// The compute dtype of the text encoders and the U-Net (the VAE runs in f32 when its
    /// config says `force_upcast` and this is f16, as in diffusers).
    pub dtype: DType,
    /// Weights variant (`fp16` reads `*.fp16.safetensors` where a component has them).
    pub variant: Option<String>,
    /// Attention implementation and memory budget.
    pub runtime: RuntimeOptions,
    /// LoRAs merged into the weights as they load, in order.
    pub loras: Vec<LoraSpec>,
    /// Textual-inversion embeddings added to the tokenizers and text encoders, in order.
    pub embeddings: Vec<PathBuf>,
    /// A single-file checkpoint's configs and tokenizers: a diffusers folder (diffusers'
    /// `from_single_file(config=…)`); by default the built-in official configs of its family.
    pub config: Option<PathBuf>,
    /// Replaces the model's VAE: a diffusers `vae/` folder or a single VAE file.
    pub vae: Option<PathBuf>,
    /// Overrides the scheduler's `prediction_type` (`epsilon`, `v_prediction`, `sample`).
    pub prediction_type: Option<String>,
    /// A tokenizer folder with the CLIP vocabulary (`vocab.json`, `merges.txt`) for a
    /// single-file checkpoint loaded with the built-in configs, which hold no vocabulary.
    pub vocabulary: Option<PathBuf>,
    /// Quantizes the U-Net's transformer linear layers after loading (`--quantize q8_0`).
    pub quantize: Option<ltd_nn::Quantization>,
    /// Loads the U-Net from this GGUF file of quantized weights instead of the folder's
    /// (`--quantized-unet`; the architecture stays the folder's `unet/config.json`).
    pub quantized_unet: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            runtime: Default::default(),
            loras: Vec::new(),
            embeddings: Vec::new(),
            config: None,
            vae: None,
            prediction_type: None,
            vocabulary: None,
            quantize: None,
            quantized_unet: None,
        }
    }
}

/// A text-to-image pipeline: Stable Diffusion 1.x/2.x or XL, as its `model_index.json` says.
pub struct Pipeline {
    pub(crate) name: String,
    pub(crate) root: PathBuf,
    pub(crate) index: ModelIndex,
    pub(crate) text: TextEncoders,
    pub(crate) unet: UNetSlot,
    /// `None` for a pixel-space model (DeepFloyd IF): the U-Net's samples are the image.
    pub(crate) vae: Option<AutoencoderKL>,
    pub(crate) scheduler_config: SchedulerConfig,
    /// DeepFloyd IF stage II: the config of the `image_noising_scheduler` that noises the
    /// upscaled low-resolution image.
    pub(crate) image_noising: Option<SchedulerConfig>,
    pub(crate) default_sampler: Option<SamplerKind>,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// The LoRAs merged into the weights.
    pub(crate) loras: Vec<LoadedLora>,
    /// The textual-inversion embeddings added.
    pub(crate) embeddings: Vec<LoadedEmbedding>,
    /// A1111's short hash of a single-file checkpoint (`Model hash`).
    pub(crate) model_hash: Option<String>,
}

impl Pipeline {
    /// Loads every component of the model at `source` (fetching hub files first).
    pub fn load(source: &ModelSource, options: &LoadOptions) -> Result<Self> {
        if let ModelSource::Local(path) = source {
            if crate::single_file::is_single_file(path) {
                if options.quantized_unet.is_some() {
                    return Err(PipelineError::msg(
                        "--quantized-unet needs a diffusers model folder (not a single-file \
                         checkpoint)",
                    ));
                }
                let mut pipe = Self::load_single_file(path, options)?;
                if let Some(q) = options.quantize {
                    pipe.quantize_unet(q)?;
                }
                return Ok(pipe);
            }
        }
        let root = source.resolve(options.variant.as_deref())?;
        let mut pipe = Self::load_folder(&root, options)?;
        pipe.name = source.to_string();
        if let Some(q) = options.quantize {
            pipe.quantize_unet(q)?;
        }
        Ok(pipe)
    }

    /// Loads a local diffusers folder.
    pub fn load_folder(root: &Path, options: &LoadOptions) -> Result<Self> {
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(PipelineError::msg(format!(
                "{}: not a diffusers model folder (no model_index.json)",
                root.display()
            )));
        }
        let index = ModelIndex::read(&index_path)?;
        let variant = options.variant.as_deref();
        let (device, dtype, runtime) = (&options.device, options.dtype, &options.runtime);
        let _span = tracing::info_span!("load", model = %root.display()).entered();

        let mut scheduler_config =
            SchedulerConfig::load(&root.join("scheduler/scheduler_config.json"))?;
        if index.kind == PipelineKind::StableDiffusion {
            legacy_scheduler_fixes(&mut scheduler_config);
        }
        // Fails early, naming the file, when the shipped scheduler is not one we have.
        ltd_scheduler::build(&scheduler_config, None, &Default::default()).map_err(
            |e| match e {
                ltd_nn::Error::InvalidConfig(source) => ltd_nn::Error::Config {
                    path: root.join("scheduler/scheduler_config.json"),
                    source,
                },
                other => other,
            },
        )?;
        if let Some(p) = &options.prediction_type {
            crate::single_file::check_prediction_type(p)?;
            scheduler_config.prediction_type = Some(p.clone());
        }
        let default_sampler = default_sampler(&scheduler_config);

        let image_noising = match index.kind {
            PipelineKind::DeepFloydIfSuperResolution => {
                let path = root.join("image_noising_scheduler/scheduler_config.json");
                let cfg = SchedulerConfig::load(&path)?;
                crate::generate::deepfloyd::check_noising_scheduler(&cfg, &path)?;
                Some(cfg)
            }
            _ => None,
        };
        if index.kind.is_deepfloyd() {
            crate::generate::deepfloyd::check_load_options(root, options)?;
        }
        let (mut patches, loras) = lora_patches(root, index.kind, &options.loras, variant)?;
        let mut text =
            TextEncoders::load(root, &index, variant, dtype, device, runtime, &mut patches)?;
        let mut embeddings = Vec::with_capacity(options.embeddings.len());
        for path in &options.embeddings {
            let file = read_embedding(path, index.kind)?;
            text.add_embedding(&file, path)?;
            embeddings.push(file.loaded);
        }
        // DeepFloyd IF: the U-Net loads at each denoising loop, after the prompt is encoded
        // (see `UNetSlot`).
        let (unet, vae) = if index.kind.is_deepfloyd() {
            let unet = UNetSlot::on_demand(&root.join("unet"), variant, dtype, device, runtime)?;
            crate::generate::deepfloyd::check_compatible(root, &index, &text, unet.config())?;
            (unet, None)
        } else {
            let unet = match &options.quantized_unet {
                Some(file) => {
                    crate::quantize::load_unet(file, &root.join("unet"), options, runtime)?
                }
                None => UNet2DConditionModel::load_patched(
                    &root.join("unet"),
                    variant,
                    dtype,
                    device,
                    runtime,
                    patches.remove(&Component::Unet).map(Arc::new),
                )?,
            };
            let vae = crate::single_file::load_vae(&root.join("vae"), options, |vae_cfg| {
                Ok(AutoencoderKL::load(
                    &root.join("vae"),
                    variant,
                    vae_cfg.compute_dtype(dtype),
                    device,
                    runtime,
                )?)
            })?;
            check_compatible(root, &index, &text, &unet, &vae)?;
            (UNetSlot::Loaded(Box::new(unet)), Some(vae))
        };
        Ok(Self {
            name: root.display().to_string(),
            root: root.to_path_buf(),
            index,
            text,
            unet,
            vae,
            scheduler_config,
            image_noising,
            default_sampler,
            device: device.clone(),
            dtype,
            loras,
            embeddings,
            model_hash: None,
        })
    }

    /// Sets the name recorded in the images' parameters (the folder or hub id by default).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !name.is_empty() {
            self.name = name;
        }
        self
    }

    /// The model's name as recorded in the images' parameters.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A1111's short hash of the checkpoint file (`Model hash`), for single-file models.
    pub fn model_hash(&self) -> Option<&str> {
        self.model_hash.as_deref()
    }

    /// The model folder (for a single-file checkpoint, the folder of its configs).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// SD 1.x/2.x or XL, or a DeepFloyd IF stage.
    pub fn kind(&self) -> PipelineKind {
        self.index.kind
    }

    /// The VAE's scale factor (image pixels per latent pixel); 1 for a pixel-space model.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.as_ref().map_or(1, |v| v.config().scale_factor())
    }

    /// The channels of the samples the loop denoises: the VAE's latent channels, or for
    /// DeepFloyd IF the U-Net's input channels (stage II: half of them, the other half is the
    /// upscaled low-resolution image).
    pub(crate) fn sample_channels(&self) -> usize {
        match &self.vae {
            Some(vae) => vae.config().latent_channels,
            None => {
                crate::generate::deepfloyd::sample_channels(self.index.kind, self.unet.config())
            }
        }
    }

    /// The VAE, for what only latent models do (encoding pictures, decoding latents).
    pub(crate) fn vae(&self) -> Result<&AutoencoderKL> {
        self.vae.as_ref().ok_or_else(|| {
            PipelineError::msg(format!(
                "{} is a pixel-space model ({}): it has no VAE",
                self.name, self.index.class_name
            ))
        })
    }

    /// The default image size (U-Net sample size × VAE scale factor), width × height.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        let (h, w) = self.unet.config().sample_size.unwrap_or((64, 64));
        (w * f, h * f)
    }

    /// The sampler the model ships, by CLI name (when it is one of ours).
    pub fn default_sampler(&self) -> Option<SamplerKind> {
        self.default_sampler
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The textual-inversion embeddings added, in the order given.
    pub fn embeddings(&self) -> &[LoadedEmbedding] {
        &self.embeddings
    }

    /// The LoRAs merged into the weights, in the order given.
    pub fn loras(&self) -> &[LoadedLora] {
        &self.loras
    }
}

/// A pipeline's U-Net: loaded with the pipeline, or — DeepFloyd IF, whose T5-XXL text encoder
/// is as big as its U-Net — mapped when a denoising loop starts and released when it ends. The
/// T5 is likewise loaded for each encoding and released after it (`text::T5Model`), so the two
/// are never resident together and peak memory is max(text encoder, U-Net), not their sum, as
/// in diffusers' documented cascade (encode, free the text encoder, then load the U-Nets). The
/// price: an IF pipeline reads its weights again for every image (from the page cache after
/// the first), also under ltd-serve.
pub(crate) enum UNetSlot {
    Loaded(Box<UNet2DConditionModel>),
    OnDemand(Box<UNetFolder>),
}

/// Where an on-demand U-Net loads from, and how.
pub(crate) struct UNetFolder {
    dir: PathBuf,
    variant: Option<String>,
    dtype: DType,
    device: Device,
    runtime: RuntimeOptions,
    config: UNetConfig,
}

/// The U-Net for one denoising loop: the resident one, or one loaded for it.
pub(crate) enum UNetRef<'a> {
    Resident(&'a UNet2DConditionModel),
    Loaded(Box<UNet2DConditionModel>),
}

impl std::ops::Deref for UNetRef<'_> {
    type Target = UNet2DConditionModel;

    fn deref(&self) -> &UNet2DConditionModel {
        match self {
            Self::Resident(unet) => unet,
            Self::Loaded(unet) => unet,
        }
    }
}

impl UNetSlot {
    /// The U-Net of `dir` to load at each use: its config now, and its weight files checked to
    /// be there, so that a broken folder fails at load, naming it.
    fn on_demand(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        let config = ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(
            &dir.join("config.json"),
        )?;
        ltd_nn::weights::component_weights(dir, &["diffusion_pytorch_model"], variant)?;
        Ok(Self::OnDemand(Box::new(UNetFolder {
            dir: dir.to_path_buf(),
            variant: variant.map(str::to_string),
            dtype,
            device: device.clone(),
            runtime: *runtime,
            config,
        })))
    }

    pub(crate) fn config(&self) -> &UNetConfig {
        match self {
            Self::Loaded(unet) => unet.config(),
            Self::OnDemand(folder) => &folder.config,
        }
    }

    /// The U-Net for a denoising loop; a loaded-on-demand one is released when the returned
    /// value is dropped.
    pub(crate) fn acquire(&self) -> Result<UNetRef<'_>> {
        match self {
            Self::Loaded(unet) => Ok(UNetRef::Resident(unet)),
            Self::OnDemand(folder) => {
                let UNetFolder { dir, variant, dtype, device, runtime, .. } = folder.as_ref();
                let _span = tracing::info_span!("load", model = %dir.display()).entered();
                Ok(UNetRef::Loaded(Box::new(UNet2DConditionModel::load(
                    dir,
                    variant.as_deref(),
                    *dtype,
                    device,
                    runtime,
                )?)))
            }
        }
    }
}

/// The LoRA deltas of every model (resolved against the tensor names of the model's files,
/// before anything loads), and what the images' parameters record of the LoRAs.
fn lora_patches(
    root: &Path,
    kind: PipelineKind,
    loras: &[LoraSpec],
    variant: Option<&str>,
) -> Result<(HashMap<Component, WeightPatches>, Vec<LoadedLora>)> {
    if loras.is_empty() {
        return Ok(Default::default());
    }
    let mut targets = vec![
        Target::from_folder(
            Component::Unet,
            &root.join("unet"),
            &["diffusion_pytorch_model"],
            variant,
        )?,
        Target::from_folder(
            Component::TextEncoder,
            &root.join("text_encoder"),
            &["model"],
            variant,
        )?,
    ];
    let model = match kind {
        PipelineKind::StableDiffusion => "this SD 1.x/2.x model",
        PipelineKind::DeepFloydIf | PipelineKind::DeepFloydIfSuperResolution => {
            return Err(PipelineError::invalid(
                "lora",
                "LoRAs are supported for Stable Diffusion models; this is DeepFloyd IF",
            ));
        }
        PipelineKind::StableDiffusionXl => {
            targets.push(Target::from_folder(
                Component::TextEncoder2,
                &root.join("text_encoder_2"),
                &["model"],
                variant,
            )?);
            "this SDXL model"
        }
    };
    build_patches(loras, &targets, model)
}

/// What `StableDiffusionPipeline.__init__` rewrites in outdated scheduler configs.
pub(crate) fn legacy_scheduler_fixes(cfg: &mut SchedulerConfig) {
    if cfg.steps_offset.is_some_and(|o| o != 1) {
        tracing::warn!("scheduler config has steps_offset != 1; using 1, as diffusers does");
        cfg.steps_offset = Some(1);
    }
    if cfg.clip_sample == Some(true) {
        tracing::warn!("scheduler config sets clip_sample; disabling it, as diffusers does");
        cfg.clip_sample = Some(false);
    }
}

/// The CLI name of the sampler a config describes, where one matches it exactly.
pub(crate) fn default_sampler(cfg: &SchedulerConfig) -> Option<SamplerKind> {
    let class = cfg.scheduler_class().ok()?;
    let karras = cfg.use_karras_sigmas.unwrap_or(false);
    let algorithm = cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++");
    SamplerKind::ALL.iter().copied().find(|k| {
        k.scheduler_class() == class
            && match k {
                SamplerKind::DpmPp2mKarras => karras && algorithm == "dpmsolver++",
                SamplerKind::DpmPp2m => !karras && algorithm == "dpmsolver++",
                SamplerKind::DpmPp2mSde => algorithm == "sde-dpmsolver++",
                _ => true,
            }
    })
}

/// Cross-component checks diffusers would only trip over mid-generation.
pub(crate) fn check_compatible(
    root: &Path,
    index: &ModelIndex,
    text: &TextEncoders,
    unet: &UNet2DConditionModel,
    vae: &AutoencoderKL,
) -> Result<()> {
    let u = unet.config();
    let latent = vae.config().latent_channels;
    // An inpainting U-Net also takes the mask and the masked image's latents.
    if u.in_channels != latent && u.in_channels != 2 * latent + 1 {
        return Err(PipelineError::msg(format!(
            "{}: the U-Net takes {} input channels but the VAE makes {latent}-channel latents \
             (a U-Net takes {latent}, or {} for inpainting)",
            root.join("unet/config.json").display(),
            u.in_channels,
            2 * latent + 1
        )));
    }
    if let Some(width) = text.t5_width() {
        if u.encoder_hidden_dim() != width {
            return Err(PipelineError::msg(format!(
                "{}: the U-Net takes text states {} wide (encoder_hid_dim, else \
                 cross_attention_dim) but the T5 text encoder's d_model is {width}",
                root.join("unet/config.json").display(),
                u.encoder_hidden_dim()
            )));
        }
    }
    if index.kind == PipelineKind::StableDiffusionXl {
        let Some(add) = &u.addition_embedding else {
            return Err(PipelineError::msg(format!(
                "{}: an SDXL pipeline needs addition_embed_type \"text_time\"",
                root.join("unet/config.json").display()
            )));
        };
        let pooled = text.pooled_dim().unwrap_or(0);
        // diffusers' `_get_add_time_ids`: 5 ids with an aesthetic score, else 6.
        let ids = crate::refiner::time_id_count(index);
        let expected = ids * add.time_proj.num_channels + pooled;
        if add.input_dim != expected {
            return Err(PipelineError::msg(format!(
                "{}: projection_class_embeddings_input_dim is {} but {ids} time ids × \
                 addition_time_embed_dim {} + text_encoder_2 projection_dim {pooled} = {expected}{}",
                root.join("unet/config.json").display(),
                add.input_dim,
                add.time_proj.num_channels,
                crate::refiner::aesthetics_hint(index, add.input_dim, expected, add.time_proj.num_channels),
            )));
        }
    }
    Ok(())
}
