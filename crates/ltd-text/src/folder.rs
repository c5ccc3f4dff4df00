//! Loading text encoders from a component folder (`text_encoder/`): `config.json` plus
//! `model[.variant].safetensors` (or its shards), memory-mapped and checked tensor by tensor.
//!
//! The one place that knows how checkpoint layouts differ from our module paths:
//! - `CLIPTextModel` checkpoints written by transformers 4.x (every official SD repo) prefix
//!   the keys with `text_model.`; transformers 5.x writes them without.
//! - T5 checkpoints hold the tied token embedding as `shared.weight` or, in some, only as
//!   `encoder.embed_tokens.weight`.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use ltd_nn::weights::component_weights;
use ltd_nn::{load_checked, load_config, Result, RuntimeOptions, SafetensorsFiles, WeightPatches};

use crate::clip::{CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, ClipTextParams};
use crate::t5::{T5Config, T5EncoderModel, T5Params};

/// The validated config and the mapped weights of a component folder.
fn open<R, P>(dir: &Path, variant: Option<&str>) -> Result<(P, Arc<SafetensorsFiles>)>
where
    R: serde::de::DeserializeOwned,
    P: TryFrom<R, Error = ltd_nn::ConfigError>,
{
    open_patched(dir, variant, None)
}

/// [`open`] with LoRA deltas (keyed by checkpoint key) added to the weights as they load.
fn open_patched<R, P>(
    dir: &Path,
    variant: Option<&str>,
    patches: Option<Arc<WeightPatches>>,
) -> Result<(P, Arc<SafetensorsFiles>)>
where
    R: serde::de::DeserializeOwned,
    P: TryFrom<R, Error = ltd_nn::ConfigError>,
{
    let params = load_config::<R, P>(&dir.join("config.json"))?;
    let mut files = SafetensorsFiles::open(&component_weights(dir, &["model"], variant)?)?;
    if let Some(patches) = patches {
        files = files.with_patches(patches);
    }
    Ok((params, Arc::new(files)))
}

impl CLIPTextModel {
    /// Loads a `CLIPTextModel` folder in `dtype` on `device` (keys with or without the
    /// `text_model.` prefix).
    pub fn from_folder(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        Self::from_folder_patched(dir, variant, dtype, device, runtime, None)
    }

    /// [`CLIPTextModel::from_folder`] with `patches` (LoRA deltas, keyed by checkpoint key)
    /// added to the weights as they load.
    pub fn from_folder_patched(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
        patches: Option<Arc<WeightPatches>>,
    ) -> Result<Self> {
        let (params, files) =
            open_patched::<CLIPTextConfig, ClipTextParams>(dir, variant, patches)?;
        let legacy = files.contains("text_model.embeddings.token_embedding.weight");
        load_checked(files, dtype, device, |vb| {
            let vb = if legacy { vb.pp("text_model") } else { vb };
            CLIPTextModel::new(vb, &params, runtime)
        })
    }
}

impl CLIPTextModelWithProjection {
    /// Loads a `CLIPTextModelWithProjection` folder in `dtype` on `device`.
    pub fn from_folder(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        Self::from_folder_patched(dir, variant, dtype, device, runtime, None)
    }

    /// [`CLIPTextModelWithProjection::from_folder`] with `patches` (LoRA deltas, keyed by
    /// checkpoint key) added to the weights as they load.
    pub fn from_folder_patched(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
        patches: Option<Arc<WeightPatches>>,
    ) -> Result<Self> {
        let (params, files) =
            open_patched::<CLIPTextConfig, ClipTextParams>(dir, variant, patches)?;
        if params.projection_dim.is_none() {
            return Err(ltd_nn::Error::Config {
                path: dir.join("config.json"),
                source: ltd_nn::ConfigError::new(
                    "projection_dim",
                    "CLIPTextModelWithProjection needs a positive projection_dim",
                ),
            });
        }
        load_checked(files, dtype, device, |vb| {
            CLIPTextModelWithProjection::new(vb, &params, runtime)
        })
    }
}

impl T5EncoderModel {
    /// Loads a `T5EncoderModel` folder (or the encoder of a full T5 checkpoint; decoder
    /// tensors are left unused) in `dtype` on `device`.
    pub fn from_folder(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        let (params, files) = open::<T5Config, T5Params>(dir, variant)?;
        let embed_only =
            !files.contains("shared.weight") && files.contains("encoder.embed_tokens.weight");
        load_checked(files, dtype, device, |vb| {
            let vb = if embed_only {
                vb.rename_f(|name| match name {
                    "shared.weight" => "encoder.embed_tokens.weight".to_string(),
                    other => other.to_string(),
                })
            } else {
                vb
            };
            T5EncoderModel::new(vb, &params, runtime)
        })
    }
}
