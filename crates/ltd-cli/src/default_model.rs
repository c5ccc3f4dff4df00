//! The default model built into the binary (see build.rs), used when no `--model` is given.
//!
//! Its files are written once to a cache folder (`$LTD_CACHE`, else `$XDG_CACHE_HOME/ltd`,
//! else `~/.cache/ltd`) named by their hash, then loaded like any local model folder.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/default_model.rs"));
}

/// The embedded model's name, if one was built in.
pub fn name() -> Option<&'static str> {
    (!embedded::FILES.is_empty()).then_some(embedded::NAME)
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("LTD_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("ltd");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache/ltd");
    }
    std::env::temp_dir().join("ltd")
}

/// The folder holding the default model, extracting it on first use.
pub fn folder() -> Result<PathBuf> {
    let Some(name) = name() else {
        bail!(
            "no default model is built into this ltd-gen yet: pass --model with a diffusers \
             folder or a hub id (e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5)"
        );
    };
    let dir = cache_root().join(format!("{name}-{:016x}", embedded::HASH));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        for (rel, bytes) in embedded::FILES {
            let path = tmp.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
        }
        Ok(())
    };
    write().with_context(|| format!("extracting the default model to {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have extracted it first.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model_index.json").is_file() {
            return Err(e)
                .with_context(|| format!("extracting the default model to {}", dir.display()));
        }
    }
    Ok(dir)
}
