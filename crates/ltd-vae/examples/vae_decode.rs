//! Time and peak memory of a VAE decode with random weights (no checkpoint needed), tiled or
//! not, e.g. a 2048×2048 SD 1.5 decode in 512-pixel tiles:
//!
//! ```text
//! cargo run --release -p ltd-vae --example vae_decode -- \
//!     [--config configs/stable-diffusion-v1-5/vae/config.json] [--size 2048] [--tile 512] \
//!     [--width-div 1]
//! ```
//!
//! `--tile 0` decodes in one piece; `--width-div N` divides every block's channels by N (a
//! narrower VAE of the same structure, to measure large images quickly). Peak memory is the
//! process's peak resident set (`VmHWM`) during decoding, reset after the model is built.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::RuntimeOptions;
use ltd_vae::{AutoencoderKL, TilingOptions};

/// As ltd's binaries: large blocks on transparent huge pages (see `ltd_nn::alloc`).
#[global_allocator]
static ALLOC: ltd_nn::alloc::HugePageAlloc = ltd_nn::alloc::HugePageAlloc;

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

fn main() -> Result<()> {
    let mut config = PathBuf::from("configs/stable-diffusion-v1-5/vae/config.json");
    let (mut size, mut tile, mut div) = (2048usize, 512usize, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => config = value()?.into(),
            "--size" => size = value()?.parse()?,
            "--tile" => tile = value()?.parse()?,
            "--width-div" => div = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let dir = config.parent().context("config path has no folder")?;
    let mut cfg = AutoencoderKL::load_config(dir)?;
    cfg.block_out_channels.iter_mut().for_each(|c| *c /= div);
    let opts = RuntimeOptions::default();
    let (_, shapes) = ltd_nn::record_shapes(DType::F32, |vb| AutoencoderKL::new(vb, &cfg, &opts))?;
    let mut weights = HashMap::new();
    for (name, shape) in shapes {
        let t = if shape.len() == 1 {
            if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape, DType::F32, &Device::Cpu)?
            } else {
                Tensor::rand(-0.01f32, 0.01, shape, &Device::Cpu)?
            }
        } else {
            let bound = 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt();
            Tensor::rand(-bound, bound, shape, &Device::Cpu)?
        };
        weights.insert(name, t);
    }
    let vae = AutoencoderKL::new(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
        &opts,
    )?;
    let f = cfg.scale_factor();
    let z = Tensor::randn(0f32, 1.0, (1, cfg.latent_channels, size / f, size / f), &Device::Cpu)?;
    let before = status_kib("VmRSS:");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t0 = Instant::now();
    let image = if tile == 0 {
        vae.decode(&z)?
    } else {
        vae.tiled_decode(&z, &TilingOptions::with_sample_tile(&cfg, tile))?
    };
    println!(
        "decoded {:?} (channels {:?}, tile {}) in {:.1} s; resident before {}, peak during {}",
        image.dims(),
        cfg.block_out_channels,
        if tile == 0 { "none".to_string() } else { tile.to_string() },
        t0.elapsed().as_secs_f64(),
        mib(before),
        mib(status_kib("VmHWM:"))
    );
    Ok(())
}
