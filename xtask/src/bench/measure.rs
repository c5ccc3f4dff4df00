//! ltd's side of each bench item, run in a child process of its own (`xtask bench --child
//! ITEM`), printing one [`Measurement`] as JSON.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::RuntimeOptions;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};
use ltd_vae::AutoencoderKL;

use super::{load_dir, Args, Child, Measurement, MATMUL_N};

/// The U-Net the bench runs, relative to the repository root.
pub const UNET_CONFIG: &str = "configs/stable-diffusion-v1-5/unet/config.json";
/// The VAE the bench runs.
pub const VAE_CONFIG: &str = "configs/stable-diffusion-v1-5/vae/config.json";
/// Written last into the `load` item's folder: the checkpoint there is complete.
pub const COMPLETE_MARKER: &str = ".complete";
/// Side of the latents of a 512×512 image (the VAE's scale factor is 8).
const LATENT: usize = 64;

/// Runs one item and prints its measurement on stdout.
pub fn run_child(child: Child, args: &Args, root: &Path) -> Result<()> {
    let m = match child {
        Child::Matmul => matmul(args)?,
        Child::Unet => unet(args, root)?,
        Child::Vae => vae(args, root)?,
        Child::Small => super::small::unet_step(args, root)?,
        Child::Load => load(root)?,
        Child::WriteUnet => return write_unet(root),
        Child::LoadSingleFile | Child::LoadFolder => {
            let dir = args.bench_dir.as_deref().context("--bench-dir is missing")?;
            super::single_file::load(root, dir, child == Child::LoadSingleFile)?
        }
        Child::TrainUnet => super::train::unet(args, root)?,
        Child::TrainVae => super::train::vae(args, root)?,
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

/// A field of /proc/self/status in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(super) fn rss_mib(field: &str) -> Option<f64> {
    status_kib(field).map(|k| k / 1024.0)
}

/// Resets the peak resident set (`VmHWM`) to the current one (Linux).
pub(super) fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process, all threads (from /proc/self/stat, in the
/// kernel's fixed 100 Hz `USER_HZ` ticks).
pub(super) fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `f` `warmup` times untimed, then `steps` times; wall and CPU seconds of each timed run.
pub(super) fn timed(
    args: &Args,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    for i in 0..args.warmup {
        let t0 = Instant::now();
        f()?;
        eprintln!("  warm-up {}: {:.2} s", i + 1, t0.elapsed().as_secs_f64());
    }
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for i in 0..args.steps {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        f()?;
        wall.push(t0.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - c0);
        eprintln!("  run {}: {:.2} s wall, {:.2} CPU-s", i + 1, wall[i], cpu[i]);
    }
    Ok((wall, cpu))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub(super) fn measurement(
    item: &str,
    wall: Vec<f64>,
    cpu: Vec<f64>,
    base: Option<f64>,
) -> Measurement {
    let mut extra = serde_json::Map::new();
    extra.insert("candle".into(), "0.11.1".into());
    Measurement {
        item: item.into(),
        implementation: "ltd".into(),
        median_wall_s: median(&wall),
        median_cpu_s: median(&cpu),
        wall_s: wall,
        cpu_s: cpu,
        base_rss_mib: base,
        peak_rss_mib: rss_mib("VmHWM:"),
        threads: candle_core::utils::get_num_threads(),
        extra,
    }
}

fn matmul(args: &Args) -> Result<Measurement> {
    let n = MATMUL_N;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (wall, cpu) = timed(args, || a.matmul(&b).map(drop).map_err(Into::into))?;
    Ok(measurement("matmul", wall, cpu, base))
}

/// Random weights for every tensor a model asks for: uniform in ±1/√fan_in (PyTorch's default
/// scale, so activations stay of order one), norm weights 1, other vectors small.
pub(super) fn random_weights<M>(
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<HashMap<String, Tensor>> {
    let (_, shapes) = ltd_nn::record_shapes(DType::F32, build)?;
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let t = if shape.len() == 1 {
            if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape, DType::F32, &dev)?
            } else {
                Tensor::rand(-0.01f32, 0.01, shape, &dev)?
            }
        } else {
            let bound = 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt();
            Tensor::rand(-bound, bound, shape, &dev)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

fn unet_config(root: &Path) -> Result<UNetConfig> {
    let path = root.join(UNET_CONFIG);
    Ok(ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&path)?)
}

fn unet(args: &Args, root: &Path) -> Result<Measurement> {
    unet_step(args, &unet_config(root)?, LATENT, "unet")
}

/// One timed step of a U-Net of this config with random weights on `latent`² latents, batch 2
/// as for classifier-free guidance, text states `[2, 77, cross-attention width]`: the `unet`
/// and `small` items.
pub(super) fn unet_step(
    args: &Args,
    cfg: &UNetConfig,
    latent: usize,
    name: &str,
) -> Result<Measurement> {
    let opts = RuntimeOptions::default();
    let dtype = args.dtype.candle();
    let weights = random_weights(|vb| UNet2DConditionModel::new(vb, cfg, &opts))?;
    // The weights drawn in f32 and rounded once, as diffusers' `.to(torch.bfloat16)` does.
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    let mut unet = UNet2DConditionModel::new(vb, cfg, &opts)?;
    if let Some(q) = args.quantize {
        let report = unet.quantize(q)?;
        eprintln!(
            "  {q}: {} weights, {:.0} → {:.0} MiB",
            report.tensors,
            report.bytes_before as f64 / (1 << 20) as f64,
            report.bytes_after as f64 / (1 << 20) as f64
        );
    }
    let dev = Device::Cpu;
    let x =
        Tensor::randn(0f32, 1.0, (2, cfg.in_channels, latent, latent), &dev)?.to_dtype(dtype)?;
    let context =
        Tensor::randn(0f32, 1.0, (2, 77, cfg.encoder_hidden_dim()), &dev)?.to_dtype(dtype)?;
    let t = Tensor::new(&[981f32], &dev)?;
    let cond = UNetConditioning::default();
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (wall, cpu) =
        timed(args, || unet.forward(&x, &t, &context, &cond).map(drop).map_err(Into::into))?;
    Ok(measurement(name, wall, cpu, base))
}

fn vae(args: &Args, root: &Path) -> Result<Measurement> {
    let dir = root.join(VAE_CONFIG);
    let cfg = AutoencoderKL::load_config(dir.parent().context("VAE config has no folder")?)?;
    let opts = RuntimeOptions::default();
    let weights = random_weights(|vb| AutoencoderKL::new(vb, &cfg, &opts))?;
    let dtype = args.dtype.candle();
    let vae =
        AutoencoderKL::new(VarBuilder::from_tensors(weights, dtype, &Device::Cpu), &cfg, &opts)?;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.latent_channels, LATENT, LATENT), &Device::Cpu)?
        .to_dtype(dtype)?;
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (wall, cpu) = timed(args, || vae.decode(&z).map(drop).map_err(Into::into))?;
    Ok(measurement("vae", wall, cpu, base))
}

/// Loads the checkpoint [`write_unet`] wrote, as `ltd-gen` loads a U-Net.
fn load(root: &Path) -> Result<Measurement> {
    let dir = load_dir(root);
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::metadata(&file).with_context(|| format!("{}", file.display()))?.len();
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let opts = RuntimeOptions::default();
    let unet = UNet2DConditionModel::load(&dir, None, DType::F32, &Device::Cpu, &opts)?;
    let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    let mut m = measurement("load", vec![wall], vec![cpu], base);
    m.extra.insert("file_mib".into(), (bytes as f64 / (1024.0 * 1024.0)).into());
    m.extra.insert("in_channels".into(), unet.config().in_channels.into());
    Ok(m)
}

/// Writes a random SD 1.5 U-Net in diffusers layout (config.json and an f32 safetensors file
/// with diffusers' tensor names) for the `load` item.
fn write_unet(root: &Path) -> Result<()> {
    let dir = load_dir(root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join(super::measure::COMPLETE_MARKER));
    let cfg = unet_config(root)?;
    let opts = RuntimeOptions::default();
    let weights = random_weights(|vb| UNet2DConditionModel::new(vb, &cfg, &opts))?;
    let file = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&weights, &file)
        .with_context(|| format!("writing {}", file.display()))?;
    std::fs::copy(root.join(UNET_CONFIG), dir.join("config.json"))?;
    std::fs::write(dir.join(COMPLETE_MARKER), "")?;
    Ok(())
}
