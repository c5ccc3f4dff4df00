//! The `single-file` bench item: loading a full-size SD 1.5 single-file checkpoint (the real
//! original-layout key and shape list, `tests/fixtures/golden/single_file/fullsize/sd15.txt`,
//! zero-filled f16) with `Pipeline::load` and the built-in configs, against the same weights as
//! a diffusers folder (the `fullsize/sd15` name lists under the official configs). Both are
//! written at bench time into a temporary folder and removed afterwards; each load runs in a
//! child process of its own, so each peak resident set is that load's alone.
//!
//! The files are sparse (written by extending them), so the page cache serves zero pages: the
//! time is loading's own (mapping, conversion to f32, the SHA-256 of `Model hash` for the
//! single file), not the disk's.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use ltd_pipeline::{LoadOptions, ModelSource, Pipeline};

use super::measure::{cpu_seconds, measurement, reset_peak, rss_mib};
use super::Measurement;

/// The folder the item's files are written to (under the system's temporary directory).
pub fn bench_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ltd-bench-single-file-{}", std::process::id()))
}

fn read_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (name, dims) = line.split_once('\t').context("a line without a tab")?;
            let dims = dims
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse::<usize>().map_err(Into::into))
                .collect::<Result<Vec<_>>>()?;
            Ok((name.to_string(), dims))
        })
        .collect()
}

/// Writes a zero-filled f16 safetensors file of these names and shapes (sparse: the header,
/// then the file extended to its length).
fn write_zeros(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in shapes {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_string(&header)?;
    while head.len() % 8 != 0 {
        head.push(' ');
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    file.write_all(&(head.len() as u64).to_le_bytes())?;
    file.write_all(head.as_bytes())?;
    let total = 8 + head.len() as u64 + offset as u64;
    file.set_len(total)?;
    Ok(total)
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src)? {
        let path = entry?.path();
        let target = dst.join(path.file_name().context("a file without a name")?);
        if path.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&path, &target)?;
        } else {
            std::fs::copy(&path, &target)?;
        }
    }
    Ok(())
}

/// Writes the checkpoint (`sd15.safetensors`) and the folder (`sd15/`) into `dir`; returns
/// their sizes in bytes.
pub fn write_files(root: &Path, dir: &Path) -> Result<(u64, u64)> {
    let fixtures = root.join("tests/fixtures");
    let keys = read_shapes(&fixtures.join("golden/single_file/fullsize/sd15.txt"))?;
    let single = write_zeros(&dir.join("sd15.safetensors"), &keys)?;
    let folder = dir.join("sd15");
    std::fs::create_dir_all(&folder)?;
    copy_tree(&root.join("configs/stable-diffusion-v1-5"), &folder)?;
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(vocabulary(root).join(f), folder.join("tokenizer").join(f))?;
    }
    let mut folder_bytes = 0;
    for (component, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let shapes = read_shapes(&fixtures.join(format!("fullsize/sd15/{component}.txt")))?;
        let path = folder.join(component).join(format!("{stem}.safetensors"));
        folder_bytes += write_zeros(&path, &shapes)?;
    }
    Ok((single, folder_bytes))
}

/// The CLIP vocabulary of the embedded default model, which ltd-gen lends single files too.
fn vocabulary(root: &Path) -> PathBuf {
    root.join("models/shapes-32/tokenizer")
}

/// Loads the single file (`single`) or the folder, as ltd-gen does on the CPU (f32).
pub fn load(root: &Path, dir: &Path, single: bool) -> Result<Measurement> {
    let path = if single { dir.join("sd15.safetensors") } else { dir.join("sd15") };
    let options = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        vocabulary: Some(vocabulary(root)),
        ..Default::default()
    };
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let pipe = Pipeline::load(&ModelSource::Local(path.clone()), &options)
        .with_context(|| format!("loading {}", path.display()))?;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    let item = if single { "single-file" } else { "single-file-folder" };
    let mut m = measurement(item, vec![wall], vec![cpu], base);
    m.extra.insert("model_hash".into(), pipe.model_hash().unwrap_or("").into());
    Ok(m)
}
