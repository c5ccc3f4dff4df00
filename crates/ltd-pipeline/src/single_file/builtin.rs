//! The official model configs of `configs/` built into the library, for checkpoints loaded
//! without `--config`: written once to a folder under the system's temporary directory (with
//! the CLIP vocabulary copied beside them, which `configs/` does not hold), so the single-file
//! path then loads exactly as a diffusers folder does.

use std::path::{Path, PathBuf};

use super::Family;
use crate::error::{PipelineError, Result};

macro_rules! files {
    ($dir:literal: $($rel:literal),* $(,)?) => {
        &[$(($rel, include_str!(concat!("../../../../configs/", $dir, "/", $rel)))),*]
    };
}

const SD1: &[(&str, &str)] = files!("stable-diffusion-v1-5": "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json");

const SD2: &[(&str, &str)] = files!("stable-diffusion-2-1": "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json");

const XL: &[(&str, &str)] = files!("stable-diffusion-xl-base-1.0": "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json", "unet/config.json", "vae/config.json");

/// The official diffusers repository whose configs a family uses (diffusers'
/// `DIFFUSERS_DEFAULT_PIPELINE_PATHS`), and its files.
fn configs(family: Family) -> (&'static str, &'static [(&'static str, &'static str)]) {
    match family {
        Family::Sd1 => ("stable-diffusion-v1-5", SD1),
        Family::Sd2 => ("stable-diffusion-2-1", SD2),
        Family::Xl => ("stable-diffusion-xl-base-1.0", XL),
    }
}

/// FNV-1a over the files: names the written copy, so a changed config never reuses a stale one.
fn fingerprint(files: &[(&str, &str)]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in files {
        for b in name.bytes().chain([0]).chain(text.bytes()).chain([0]) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The CLIP BPE files every SD tokenizer shares.
const VOCABULARY: &[&str] = &["vocab.json", "merges.txt"];

/// A diffusers config folder for `family`: the built-in configs, with the CLIP vocabulary from
/// `vocabulary` (a tokenizer folder holding `vocab.json` and `merges.txt`).
pub(crate) fn config_folder(family: Family, vocabulary: Option<&Path>) -> Result<PathBuf> {
    let (name, files) = configs(family);
    let Some(vocab) = vocabulary.filter(|v| VOCABULARY.iter().all(|f| v.join(f).is_file())) else {
        return Err(PipelineError::msg(format!(
            "the checkpoint is {}, but no CLIP vocabulary (vocab.json, merges.txt) is at hand: \
             pass --config with a diffusers folder of that family (its configs and tokenizer)",
            family.description()
        )));
    };
    let dir =
        std::env::temp_dir().join(format!("ltd-configs-{:016x}", fingerprint(files))).join(name);
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let io = |p: &Path, e: std::io::Error| PipelineError::msg(format!("{}: {e}", p.display()));
    // Written beside the final place and renamed, so concurrent loads never see half a folder.
    let staging = dir.with_extension(format!("tmp-{}", std::process::id()));
    for (rel, text) in files {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    }
    for tokenizer in ["tokenizer", "tokenizer_2"] {
        let target = staging.join(tokenizer);
        if !target.is_dir() {
            continue;
        }
        for f in VOCABULARY {
            std::fs::copy(vocab.join(f), target.join(f)).map_err(|e| io(&vocab.join(f), e))?;
        }
    }
    std::fs::write(staging.join(".complete"), b"").map_err(|e| io(&staging, e))?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process won the race (or left a folder behind): use its copy.
        let _ = std::fs::remove_dir_all(&staging);
        if !dir.join(".complete").is_file() {
            return Err(PipelineError::msg(format!(
                "{}: could not write the configs",
                dir.display()
            )));
        }
    }
    Ok(dir)
}
