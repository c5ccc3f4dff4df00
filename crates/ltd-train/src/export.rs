//! Writing trained models in diffusers layout: component folders (`config.json` plus
//! `diffusion_pytorch_model.safetensors` or, for transformers models, `model.safetensors`) and
//! complete `StableDiffusionPipeline` folders with `model_index.json`.
//!
//! Every file is written atomically. Safetensors files carry `{"format": "pt"}` metadata, as
//! diffusers and transformers write them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::checkpoint::write_atomic;
use crate::error::{Result, TrainError};
use crate::text_encoder::TextEncoderKind;

/// The diffusers version our configs claim to come from (the reference we test against).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Writes `tensors` as `dtype` to a safetensors file at `path`, atomically.
pub fn save_weights(path: &Path, tensors: &HashMap<String, Tensor>, dtype: DType) -> Result<()> {
    let mut sorted: BTreeMap<&str, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        let t = if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? };
        sorted.insert(name.as_str(), t.contiguous()?);
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(sorted.iter().map(|(k, v)| (*k, v)), Some(metadata))
        .map_err(|e| TrainError::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Writes `value` as pretty JSON with a final newline, atomically.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| TrainError::msg(e.to_string()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::msg(format!("{}: {e}", path.display())))
}

/// A diffusers model config as written by `save_pretrained`: `_class_name` and
/// `_diffusers_version` first, then the fields.
pub fn diffusers_config(class: &str, fields: &Value) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("_class_name".into(), json!(class));
    out.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    if let Value::Object(m) = fields {
        for (k, v) in m {
            if !k.starts_with('_') {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// Writes a diffusers model folder: `config.json` and `diffusion_pytorch_model.safetensors`.
pub fn write_diffusers_model(
    dir: &Path,
    class: &str,
    config: &Value,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    save_weights(&dir.join("diffusion_pytorch_model.safetensors"), tensors, dtype)?;
    write_json(&dir.join("config.json"), &diffusers_config(class, config))
}

/// Writes a transformers model folder: `config.json` and `model.safetensors` (weights stored
/// as `dtype`, the config saying float32 so that both loaders compute in float32).
pub fn write_transformers_model(
    dir: &Path,
    config: &Value,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    save_weights(&dir.join("model.safetensors"), tensors, dtype)?;
    let mut cfg = match config {
        Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    // The dtype to run in, not the one stored: transformers loads the model in this dtype,
    // and a float16 text encoder next to a float32 U-Net breaks diffusers' pipeline.
    cfg.insert("dtype".into(), json!("float32"));
    write_json(&dir.join("config.json"), &Value::Object(cfg))
}

/// Copies the regular files of `src` into `dst` (not recursively).
pub fn copy_files(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| TrainError::io(dst, e))?;
    let rd = std::fs::read_dir(src).map_err(|e| TrainError::io(src, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| TrainError::io(src, e))?;
        let path = entry.path();
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
            write_atomic(&dst.join(entry.file_name()), &bytes)?;
        }
    }
    Ok(())
}

/// `model_index.json` of a `StableDiffusionPipeline` with the given scheduler class and text
/// encoder family, in the form diffusers' `save_pretrained` writes (no safety checker or
/// feature extractor).
pub fn model_index(scheduler_class: &str, text: TextEncoderKind) -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", text.model_class()],
        "tokenizer": ["transformers", text.tokenizer_class()],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weights_round_trip_with_pt_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let t: HashMap<String, Tensor> =
            [("a.weight".to_string(), Tensor::new(&[1f32, 2.5], &Device::Cpu).unwrap())].into();
        save_weights(&p, &t, DType::F16).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let back = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        assert_eq!(back["a.weight"].dtype(), DType::F16);
        assert_eq!(
            back["a.weight"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.5]
        );
    }

    #[test]
    fn configs_get_class_and_version_first() {
        let c =
            diffusers_config("AutoencoderKL", &json!({"_class_name": "X", "latent_channels": 4}));
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["_class_name", "_diffusers_version", "latent_channels"]);
        assert_eq!(c["_class_name"], "AutoencoderKL");
    }
}
