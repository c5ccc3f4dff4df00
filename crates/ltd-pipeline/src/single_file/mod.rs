//! Single-file checkpoints: one `.safetensors` in the original LDM layout, as AUTOMATIC1111,
//! ComfyUI and civitai share them (`model.diffusion_model.*`, `first_stage_model.*`,
//! `cond_stage_model.*` / `conditioner.embedders.*`), loaded like diffusers'
//! `from_single_file`:
//!
//! - the family (SD 1.x, 2.x, XL) is read from the keys as `infer_diffusers_model_type` does,
//!   and picks the official configs built in from `configs/` (diffusers fetches the same ones
//!   from the hub); `LoadOptions::config` takes a diffusers folder's configs and tokenizers
//!   instead (diffusers' `config=`);
//! - each component reads its tensors straight from the mapped file through a renamed view
//!   ([`ltd_nn::SafetensorsFiles::view`]) built by the one key map of [`keymap`]: no
//!   conversion on disk, no copy beyond the one every load makes;
//! - the image parameters carry A1111's `Model hash` (the first ten hex digits of the file's
//!   SHA-256) and the file's stem as `Model`.

pub mod keymap;

mod builtin;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use ltd_nn::weights::refuse_pickle;
use ltd_nn::{load_checked, load_config, RuntimeOptions, SafetensorsFiles, WeightPatches};
use ltd_text::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, ClipTextParams,
};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConfig};
use ltd_vae::{AutoencoderKL, VaeConfig};

use crate::error::{PipelineError, Result};
use crate::lora::{build_patches, Component, LoadedLora, LoraSpec, Target};
use crate::model_index::{ModelIndex, PipelineKind};
use crate::pipeline::{
    check_compatible, default_sampler, legacy_scheduler_fixes, LoadOptions, Pipeline,
};
use crate::text::TextEncoders;
use crate::textual_inversion::read_embedding;
use keymap::{Spec, UnetLayout};

/// The model families a checkpoint can be, as diffusers infers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x (CLIP ViT-L).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H); diffusers' configs are 2.1's (768 px,
    /// v-prediction).
    Sd2,
    /// Stable Diffusion XL base.
    Xl,
}

impl Family {
    /// The family's name in messages.
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
            Self::Xl => "SDXL",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::Sd1 => "a Stable Diffusion 1.x checkpoint",
            Self::Sd2 => "a Stable Diffusion 2.x checkpoint",
            Self::Xl => "a Stable Diffusion XL checkpoint",
        }
    }
}

/// diffusers' `CHECKPOINT_KEY_NAMES` that tell the families apart.
const V2_KEY: &str =
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
const XL_BASE_KEY: &str = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias";
const XL_REFINER_KEY: &str =
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias";
const INPAINTING_KEY: &str = "model.diffusion_model.input_blocks.0.0.weight";

/// The family of a checkpoint, by diffusers' `infer_diffusers_model_type` rules; files that
/// are no SD checkpoint at all, and kinds we cannot run, are errors naming the file.
pub fn infer_family(files: &SafetensorsFiles) -> Result<Family> {
    let path = files.describe();
    if !files.names().iter().any(|n| n.starts_with(keymap::UNET_PREFIX)) {
        let sample: Vec<&str> = files.names().into_iter().take(3).collect();
        return Err(PipelineError::msg(format!(
            "{path}: not a Stable Diffusion checkpoint: no U-Net tensors \
             (`model.diffusion_model.*`); its keys look like {} (a LoRA, an embedding or a \
             VAE goes to its own flag)",
            if sample.is_empty() { "nothing (no tensors)".to_string() } else { sample.join(", ") }
        )));
    }
    if files.shape(INPAINTING_KEY).is_some_and(|s| s.get(1) == Some(&9)) {
        return Err(PipelineError::msg(format!(
            "{path}: an inpainting checkpoint (9 input channels), which this pipeline does not run"
        )));
    }
    if files.shape(V2_KEY).and_then(|s| s.last()) == Some(&1024) {
        return Ok(Family::Sd2);
    }
    if files.contains(XL_BASE_KEY) {
        return Ok(Family::Xl);
    }
    if files.contains(XL_REFINER_KEY) {
        return Err(PipelineError::msg(format!(
            "{path}: an SDXL refiner checkpoint, which this pipeline does not run"
        )));
    }
    Ok(Family::Sd1)
}

/// Whether a path is a single checkpoint file rather than a model folder.
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
}

/// AUTOMATIC1111's short model hash: the first ten hex digits of the file's SHA-256.
pub fn model_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    let io = |e: std::io::Error| PipelineError::msg(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
}

/// Builds one component from the checkpoint at `path` through the key map of `spec`.
fn load_part<M>(
    path: &Path,
    spec: &Spec,
    patches: Option<Arc<WeightPatches>>,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(candle_nn::VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<M> {
    let files = SafetensorsFiles::open(&[path])?;
    let names = files.names();
    let keys: Vec<(&str, &[usize])> =
        names.iter().filter_map(|n| Some((*n, files.shape(n)?))).collect();
    let map = spec.map(keys);
    if !map.unknown.is_empty() {
        tracing::warn!(
            file = %path.display(),
            count = map.unknown.len(),
            unused = %map.unknown.join(", "),
            "checkpoint tensors no rule of the key map uses"
        );
    }
    let view = files.view(map.aliases)?;
    let view = match patches {
        Some(p) => view.with_patches(p),
        None => view,
    };
    Ok(load_checked(Arc::new(view), dtype, device, build)?)
}

/// DeepFloyd IF is distributed as diffusers folders only: there is no original single-file
/// layout to map.
fn no_single_file_if(path: &Path) -> PipelineError {
    PipelineError::msg(format!(
        "{}: DeepFloyd IF has no single-file checkpoint layout; give its diffusers folder as \
         --model",
        path.display()
    ))
}

/// The LoRA patches of a checkpoint's components, resolved against the diffusers names its
/// key map gives them (the names a LoRA's keys are written for, as for a folder).
fn lora_patches(
    path: &Path,
    kind: PipelineKind,
    specs: &[(&'static str, Spec)],
    loras: &[LoraSpec],
) -> Result<(HashMap<Component, WeightPatches>, Vec<LoadedLora>)> {
    if loras.is_empty() {
        return Ok(Default::default());
    }
    let files = SafetensorsFiles::open(&[path])?;
    let names = files.names();
    let keys: Vec<(&str, &[usize])> =
        names.iter().filter_map(|n| Some((*n, files.shape(n)?))).collect();
    let mut targets = Vec::new();
    for (dir, spec) in specs {
        let component = match *dir {
            "unet" => Component::Unet,
            "text_encoder" => Component::TextEncoder,
            "text_encoder_2" => Component::TextEncoder2,
            _ => continue,
        };
        let shapes: BTreeMap<String, Vec<usize>> = spec
            .map(keys.clone())
            .aliases
            .into_iter()
            .map(|(name, alias)| (name, alias.shape))
            .collect();
        targets.push(Target::new(component, shapes));
    }
    let model = match kind {
        PipelineKind::StableDiffusion => "this SD 1.x/2.x model",
        PipelineKind::StableDiffusionXl => "this SDXL model",
        PipelineKind::DeepFloydIf | PipelineKind::DeepFloydIfSuperResolution => {
            return Err(no_single_file_if(path));
        }
    };
    build_patches(loras, &targets, model)
}

/// How each component of a checkpoint with these tensor `names` is laid out, for the
/// pipeline `kind` whose configs are in `config`: `(component folder, spec)` for the text
/// encoder(s), the U-Net and the VAE, in that order. A missing text encoder or VAE is an error
/// naming the prefix looked for.
pub fn component_specs(
    config: &Path,
    kind: PipelineKind,
    names: &[&str],
    path: &Path,
) -> Result<Vec<(&'static str, Spec)>> {
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    let missing = |what: &str, prefixes: &str| {
        PipelineError::msg(format!(
            "{}: no {what} in the checkpoint (no `{prefixes}` tensors)",
            path.display()
        ))
    };
    let layers = |dir: &str| -> Result<usize> {
        let path = config.join(dir).join("config.json");
        Ok(load_config::<CLIPTextConfig, ClipTextParams>(&path)?.num_hidden_layers)
    };
    let mut specs = Vec::new();
    match kind {
        PipelineKind::DeepFloydIf | PipelineKind::DeepFloydIfSuperResolution => {
            return Err(no_single_file_if(config));
        }
        PipelineKind::StableDiffusion => {
            let spec = if has(keymap::SD1_CLIP_PREFIX) {
                Spec::Clip { prefix: keymap::SD1_CLIP_PREFIX.into() }
            } else if has(keymap::SD2_OPEN_CLIP_PREFIX) {
                Spec::OpenClip {
                    prefix: keymap::SD2_OPEN_CLIP_PREFIX.into(),
                    layers: layers("text_encoder")?,
                    projection: false,
                }
            } else {
                return Err(missing(
                    "text encoder",
                    &format!("{}*` or `{}*", keymap::SD1_CLIP_PREFIX, keymap::SD2_OPEN_CLIP_PREFIX),
                ));
            };
            specs.push(("text_encoder", spec));
        }
        PipelineKind::StableDiffusionXl => {
            if !has(keymap::XL_CLIP_PREFIX) {
                return Err(missing("first text encoder", &format!("{}*", keymap::XL_CLIP_PREFIX)));
            }
            if !has(keymap::XL_OPEN_CLIP_PREFIX) {
                return Err(missing(
                    "second text encoder",
                    &format!("{}*", keymap::XL_OPEN_CLIP_PREFIX),
                ));
            }
            specs.push(("text_encoder", Spec::Clip { prefix: keymap::XL_CLIP_PREFIX.into() }));
            specs.push((
                "text_encoder_2",
                Spec::OpenClip {
                    prefix: keymap::XL_OPEN_CLIP_PREFIX.into(),
                    layers: layers("text_encoder_2")?,
                    projection: true,
                },
            ));
        }
    }
    let unet_cfg: UNetConfig =
        load_config::<UNet2DConditionModelConfig, UNetConfig>(&config.join("unet/config.json"))?;
    specs.push(("unet", Spec::Unet(UnetLayout::from_config(&unet_cfg))));
    let Some(prefix) = keymap::VAE_PREFIXES.iter().find(|p| has(p)) else {
        return Err(missing("VAE", "first_stage_model.*` or `vae.*"));
    };
    let vae_cfg = AutoencoderKL::load_config(&config.join("vae"))?;
    specs.push((
        "vae",
        Spec::Vae { prefix: prefix.to_string(), up_blocks: vae_cfg.block_out_channels.len() },
    ));
    Ok(specs)
}

/// The text encoders of a checkpoint, with the tokenizers of the config folder.
fn load_text(
    path: &Path,
    config: &Path,
    index: &ModelIndex,
    specs: &[(&'static str, Spec)],
    options: &LoadOptions,
    patches: &mut HashMap<Component, WeightPatches>,
) -> Result<TextEncoders> {
    let (dtype, device, runtime) = (options.dtype, &options.device, &options.runtime);
    let params = |dir: &str| {
        load_config::<CLIPTextConfig, ClipTextParams>(&config.join(dir).join("config.json"))
    };
    let spec = |dir: &str| specs.iter().find(|(d, _)| *d == dir).map(|(_, s)| s);
    let te = params("text_encoder")?;
    let tokenizer = CLIPTokenizer::from_folder(&config.join("tokenizer"))?;
    let Some(first) = spec("text_encoder") else {
        return Err(PipelineError::msg(format!("{}: no text encoder", path.display())));
    };
    let patch_1 = patches.remove(&Component::TextEncoder).map(Arc::new);
    let model =
        load_part(path, first, patch_1, dtype, device, |vb| CLIPTextModel::new(vb, &te, runtime))?;
    let second = match spec("text_encoder_2") {
        Some(spec) => {
            let te2 = params("text_encoder_2")?;
            let tokenizer_2 = CLIPTokenizer::from_folder(&config.join("tokenizer_2"))?;
            let patch_2 = patches.remove(&Component::TextEncoder2).map(Arc::new);
            let model = load_part(path, spec, patch_2, dtype, device, |vb| {
                CLIPTextModelWithProjection::new(vb, &te2, runtime)
            })?;
            Some((tokenizer_2, model))
        }
        None => None,
    };
    Ok(TextEncoders::from_models(
        index.kind,
        index.force_zeros_for_empty_prompt,
        (tokenizer, model),
        second,
    ))
}

/// The VAE prefix of a checkpoint (diffusers' `LDM_VAE_KEYS`), `""` for a VAE file in the LDM
/// layout, `None` for a VAE file in diffusers' own layout.
fn vae_prefix(files: &SafetensorsFiles) -> Option<String> {
    let names = files.names();
    for prefix in keymap::VAE_PREFIXES {
        if names.iter().any(|n| n.starts_with(prefix)) {
            return Some(prefix.to_string());
        }
    }
    if names.iter().any(|n| n.starts_with("encoder.down.") || n.starts_with("decoder.up.")) {
        return Some(String::new());
    }
    None
}

/// Loads a VAE of architecture `cfg` from a checkpoint or a single VAE file, in the LDM layout
/// (with or without the checkpoint's prefix) or diffusers' own.
fn load_vae_file(
    path: &Path,
    cfg: &VaeConfig,
    dtype: DType,
    device: &Device,
    runtime: &RuntimeOptions,
) -> Result<AutoencoderKL> {
    let files = SafetensorsFiles::open(&[path])?;
    match vae_prefix(&files) {
        Some(prefix) => {
            drop(files);
            let spec = Spec::Vae { prefix, up_blocks: cfg.block_out_channels.len() };
            load_part(path, &spec, None, dtype, device, |vb| AutoencoderKL::new(vb, cfg, runtime))
        }
        None => Ok(load_checked(Arc::new(files), dtype, device, |vb| {
            AutoencoderKL::new(vb, cfg, runtime)
        })?),
    }
}

/// The VAE of a pipeline: `options.vae` (a diffusers `vae/` folder, or a single VAE file with
/// the architecture of `default_config`'s folder) when set, else `fallback`.
pub(crate) fn load_vae(
    default_config: &Path,
    options: &LoadOptions,
    fallback: impl FnOnce(&VaeConfig) -> Result<AutoencoderKL>,
) -> Result<AutoencoderKL> {
    let (device, runtime) = (&options.device, &options.runtime);
    match &options.vae {
        Some(dir) if dir.is_dir() => {
            let cfg = AutoencoderKL::load_config(dir)?;
            Ok(AutoencoderKL::load(dir, None, cfg.compute_dtype(options.dtype), device, runtime)?)
        }
        Some(file) if file.is_file() => {
            refuse_pickle(file)?;
            let cfg = AutoencoderKL::load_config(default_config)?;
            load_vae_file(file, &cfg, cfg.compute_dtype(options.dtype), device, runtime)
        }
        Some(missing) => Err(PipelineError::msg(format!(
            "--vae {}: no such file or folder (a diffusers vae/ folder or a .safetensors VAE)",
            missing.display()
        ))),
        None => {
            let cfg = AutoencoderKL::load_config(default_config)?;
            fallback(&cfg)
        }
    }
}

/// diffusers' prediction types, for `--prediction-type`.
pub const PREDICTION_TYPES: &[&str] = &["epsilon", "v_prediction", "sample"];

/// Checks a `--prediction-type` value.
pub fn check_prediction_type(value: &str) -> Result<()> {
    if PREDICTION_TYPES.contains(&value) {
        Ok(())
    } else {
        Err(PipelineError::invalid(
            "prediction-type",
            format!("`{value}` is not one of {}", PREDICTION_TYPES.join(", ")),
        ))
    }
}

impl Pipeline {
    /// Loads a single-file checkpoint (see the [module](self) documentation).
    pub fn load_single_file(path: &Path, options: &LoadOptions) -> Result<Self> {
        let _span = tracing::info_span!("load", checkpoint = %path.display()).entered();
        refuse_pickle(path)?;
        let files = SafetensorsFiles::open(&[path])?;
        let family = infer_family(&files)?;
        // Hashing reads the whole file once: beside the loading, on a thread of its own.
        let hashing = {
            let path = path.to_path_buf();
            std::thread::spawn(move || model_hash(&path))
        };
        let config: PathBuf = match &options.config {
            Some(dir) => {
                if !dir.join("model_index.json").is_file() {
                    return Err(PipelineError::msg(format!(
                        "--config {}: not a diffusers model folder (no model_index.json)",
                        dir.display()
                    )));
                }
                dir.clone()
            }
            None => builtin::config_folder(family, options.vocabulary.as_deref())?,
        };
        let index = ModelIndex::read(&config.join("model_index.json"))?;
        if index.kind.is_deepfloyd() {
            return Err(no_single_file_if(&config));
        }
        let (device, dtype, runtime) = (&options.device, options.dtype, &options.runtime);

        let scheduler_path = config.join("scheduler/scheduler_config.json");
        let mut scheduler_config = ltd_scheduler::SchedulerConfig::load(&scheduler_path)?;
        if index.kind == PipelineKind::StableDiffusion {
            legacy_scheduler_fixes(&mut scheduler_config);
        }
        if let Some(p) = &options.prediction_type {
            check_prediction_type(p)?;
            scheduler_config.prediction_type = Some(p.clone());
        }
        let default_sampler = default_sampler(&scheduler_config);

        let specs = component_specs(&config, index.kind, &files.names(), path)?;
        drop(files);
        // Weights that do not fit the built-in official configs are a fine-tune of another
        // shape: say which configs were used and what to pass.
        let hint = |e: PipelineError| match (&e, &options.config) {
            (PipelineError::Model(ltd_nn::Error::Load(_)), None) => PipelineError::msg(format!(
                "{e} (the weights do not fit the official {} configs; for a model of another \
                 shape pass --config with its diffusers folder)",
                family.short_name()
            )),
            _ => e,
        };
        let (mut patches, loras) = lora_patches(path, index.kind, &specs, &options.loras)?;
        let mut text =
            load_text(path, &config, &index, &specs, options, &mut patches).map_err(hint)?;
        let mut embeddings = Vec::with_capacity(options.embeddings.len());
        for emb in &options.embeddings {
            let file = read_embedding(emb, index.kind)?;
            text.add_embedding(&file, emb)?;
            embeddings.push(file.loaded);
        }
        let unet_cfg: UNetConfig = load_config::<UNet2DConditionModelConfig, UNetConfig>(
            &config.join("unet/config.json"),
        )?;
        let Some((_, unet_spec)) = specs.iter().find(|(d, _)| *d == "unet") else {
            return Err(PipelineError::msg(format!("{}: no U-Net", path.display())));
        };
        let unet_patches = patches.remove(&Component::Unet).map(Arc::new);
        let unet = load_part(path, unet_spec, unet_patches, dtype, device, |vb| {
            UNet2DConditionModel::new(vb, &unet_cfg, runtime)
        })
        .map_err(hint)?;
        let vae = load_vae(&config.join("vae"), options, |cfg| {
            load_vae_file(path, cfg, cfg.compute_dtype(dtype), device, runtime)
        })
        .map_err(hint)?;
        check_compatible(&config, &index, &text, &unet, &vae)?;
        let model_hash = hashing
            .join()
            .map_err(|_| PipelineError::msg(format!("{}: hashing failed", path.display())))??;
        let name = path
            .file_stem()
            .map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        Ok(Self {
            name,
            root: config,
            index,
            text,
            unet: crate::pipeline::UNetSlot::Loaded(Box::new(unet)),
            vae: Some(vae),
            scheduler_config,
            image_noising: None,
            default_sampler,
            device: device.clone(),
            dtype,
            model_hash: Some(model_hash),
            loras,
            embeddings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocabulary() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes-32/tokenizer")
    }

    /// The built-in configs of every family are a loadable diffusers config folder once the
    /// vocabulary is beside them; without one the error says what to pass.
    #[test]
    fn built_in_configs_load_as_a_folder() {
        for (family, kind) in [
            (Family::Sd1, PipelineKind::StableDiffusion),
            (Family::Sd2, PipelineKind::StableDiffusion),
            (Family::Xl, PipelineKind::StableDiffusionXl),
        ] {
            let dir = builtin::config_folder(family, Some(&vocabulary())).unwrap();
            let index = ModelIndex::read(&dir.join("model_index.json")).unwrap();
            assert_eq!(index.kind, kind, "{family:?}");
            CLIPTokenizer::from_folder(&dir.join("tokenizer")).unwrap();
            if kind == PipelineKind::StableDiffusionXl {
                CLIPTokenizer::from_folder(&dir.join("tokenizer_2")).unwrap();
            }
            let scheduler =
                ltd_scheduler::SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json"))
                    .unwrap();
            // diffusers' default for any 2.x checkpoint is 2.1's v-prediction.
            let v = scheduler.prediction_type.as_deref() == Some("v_prediction");
            assert_eq!(v, family == Family::Sd2, "{family:?}");
        }
        let err = builtin::config_folder(Family::Sd1, None).unwrap_err().to_string();
        assert!(err.contains("pass --config"), "{err}");
    }

    #[test]
    fn checks_prediction_types() {
        for p in PREDICTION_TYPES {
            check_prediction_type(p).unwrap();
        }
        let err = check_prediction_type("v").unwrap_err().to_string();
        assert!(err.starts_with("--prediction-type: `v` is not one of epsilon"), "{err}");
    }
}
