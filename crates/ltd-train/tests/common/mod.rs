//! Tiny models and data shared by the training tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub use ltd_test_support::{fixtures, workspace_root};

/// The real CLIP tokenizer of the sd1 fixture pipeline.
pub fn tokenizer() -> PathBuf {
    fixtures().join("pipelines/sd1/tokenizer")
}

/// A 16-pixel make-shapes dataset of `count` images in `dir`.
pub fn shapes(dir: &Path, count: usize) {
    let spec = ltd_train::shapes::ShapesSpec::new(count, 16, 3);
    ltd_train::shapes::write_dataset(&spec, dir).unwrap();
}

/// An AutoencoderKL with two levels (scale factor 2) and 8 channels.
pub fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 8],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 16,
        "scaling_factor": 1.0
    })
}

/// A two-level U-Net with cross-attention of width `context`.
pub fn unet_config(context: usize) -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": context,
        "norm_num_groups": 4
    })
}

/// A one-layer CLIP text encoder over the real CLIP vocabulary.
pub fn text_encoder_config() -> Value {
    json!({
        "vocab_size": 49408,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 16
    })
}

/// The T5 tokenizer of `configs/train/shapes-t5` (a word-level SentencePiece model of the
/// make-shapes captions, padded to 77).
pub fn t5_tokenizer() -> PathBuf {
    workspace_root().join("configs/train/shapes-t5/tokenizer")
}

/// A one-block T5 encoder, 16 wide, over that vocabulary, passing the attention mask.
pub fn t5_config() -> Value {
    json!({
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": 52,
        "d_model": 16,
        "d_kv": 4,
        "d_ff": 24,
        "num_layers": 1,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu",
        "use_attention_mask": true
    })
}

/// [`unet_config`] with cross-attention 8 wide fed through `encoder_hid_proj` from text states
/// `text_width` wide (`encoder_hid_dim_type: "text_proj"`).
pub fn unet_config_text_proj(text_width: usize) -> Value {
    let mut c = unet_config(8);
    c["encoder_hid_dim"] = json!(text_width);
    c["encoder_hid_dim_type"] = json!("text_proj");
    c
}

/// A DDIM scheduler config over 1000 training steps.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading"
    })
}

/// Every file under `dir` (relative path, bytes), sorted, skipping `train/`.
pub fn model_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "train" {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The steps and losses of a run's `loss.jsonl`.
pub fn losses(out: &Path) -> Vec<(usize, f32)> {
    std::fs::read_to_string(out.join("train/loss.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap() as usize, v["loss"].as_f64().unwrap() as f32)
        })
        .collect()
}
