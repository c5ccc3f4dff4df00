//! Time and peak memory of one full-size U-Net forward pass with random weights (no checkpoint
//! needed), e.g. SD 1.5 at 512×512, batch 2:
//!
//! ```text
//! cargo run --release -p ltd-unet --example unet_forward -- \
//!     [--config configs/stable-diffusion-v1-5/unet/config.json] [--batch 2] [--latent 64] \
//!     [--tokens 77] [--steps 1] [--attention auto|chunked|naive] [--max-score-mib 256] \
//!     [--dtype f32]
//! ```
//!
//! The weights are plain tensors (not a `VarMap`), so the inference kernels run. Peak memory is
//! the process's peak resident set (`VmHWM`) during the forward passes, after resetting it once
//! the model is built (Linux).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::attention::{AttentionImpl, AttentionOptions};
use ltd_nn::RuntimeOptions;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};

/// As ltd's binaries: large blocks on transparent huge pages (see `ltd_nn::alloc`).
#[global_allocator]
static ALLOC: ltd_nn::alloc::HugePageAlloc = ltd_nn::alloc::HugePageAlloc;

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current resident set.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

/// Random weights of the right shapes: uniform ±1/√fan_in (PyTorch's default scale, so that
/// activations stay finite), norm weights 1, other vectors small.
fn random_weights(cfg: &UNetConfig, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let opts = RuntimeOptions::default();
    let (_, shapes) = ltd_nn::record_shapes(dtype, |vb| UNet2DConditionModel::new(vb, cfg, &opts))?;
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let t = if shape.len() == 1 {
            if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape, DType::F32, &Device::Cpu)?
            } else {
                Tensor::rand(-0.01f32, 0.01, shape, &Device::Cpu)?
            }
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            Tensor::rand(-bound, bound, shape, &Device::Cpu)?
        };
        out.insert(name, t.to_dtype(dtype)?);
    }
    Ok(out)
}

fn main() -> Result<()> {
    let mut config = PathBuf::from("configs/stable-diffusion-v1-5/unet/config.json");
    let (mut batch, mut latent, mut tokens, mut steps) = (2usize, 64usize, 77usize, 1usize);
    let mut attention = AttentionOptions::default();
    let mut dtype = DType::F32;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => config = value()?.into(),
            "--batch" => batch = value()?.parse()?,
            "--latent" => latent = value()?.parse()?,
            "--tokens" => tokens = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--max-score-mib" => attention.max_score_bytes = value()?.parse::<usize>()? << 20,
            "--attention" => {
                attention.implementation = match value()?.as_str() {
                    "auto" => AttentionImpl::Auto,
                    "naive" => AttentionImpl::Naive,
                    "chunked" => AttentionImpl::Chunked,
                    other => bail!("unknown attention implementation {other}"),
                }
            }
            "--dtype" => dtype = ltd_nn::parse_dtype(&value()?)?,
            other => bail!("unknown argument {other}"),
        }
    }
    let cfg: UNetConfig = ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&config)?;
    let t0 = Instant::now();
    let weights = random_weights(&cfg, dtype)?;
    let params: usize = weights.values().map(|t| t.elem_count()).sum();
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    let opts = RuntimeOptions { attention };
    let unet = UNet2DConditionModel::new(vb, &cfg, &opts)?;
    println!(
        "{}: {:.0} M parameters ({dtype:?}), built in {:.1} s, resident {}",
        config.display(),
        params as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        mib(status_kib("VmRSS:"))
    );

    let x = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, latent, latent), &Device::Cpu)?;
    let t = Tensor::new(&[981f32], &Device::Cpu)?;
    let context =
        Tensor::randn(0f32, 1.0, (batch, tokens, cfg.encoder_hidden_dim()), &Device::Cpu)?;
    let cond = match cfg.pooled_text_embed_dim() {
        Some(d) => UNetConditioning {
            text_embeds: Some(Tensor::randn(0f32, 1.0, (batch, d), &Device::Cpu)?),
            time_ids: Some(
                Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]], &Device::Cpu)?
                    .repeat((batch, 1))?,
            ),
            ..Default::default()
        },
        None => UNetConditioning::default(),
    };
    let before = status_kib("VmRSS:");
    reset_peak_rss();
    for step in 0..steps {
        let t0 = Instant::now();
        let out = unet.forward(&x, &t, &context, &cond)?;
        let secs = t0.elapsed().as_secs_f64();
        let stats = out.to_dtype(DType::F32)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        println!(
            "step {step}: {secs:.2} s for batch {batch} at {latent}×{latent} latents \
             (output rms {stats:.3})"
        );
    }
    println!(
        "resident before forward {}, peak during forward {} (attention {:?}, score budget {} MiB)",
        mib(before),
        mib(status_kib("VmHWM:")),
        attention.implementation,
        attention.max_score_bytes >> 20
    );
    Ok(())
}
