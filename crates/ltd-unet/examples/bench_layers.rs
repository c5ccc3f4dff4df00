//! Times the U-Net's building blocks at SD 1.5's 512×512 shapes (batch 2, 64×64 latents):
//! `cargo run --release -p ltd-unet --example bench_layers`.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::attention::{attention, AttentionOptions};
use ltd_nn::layers::{Conv2d, GroupNorm, LayerNorm, Linear};

/// Process CPU time (user + system) in seconds: less disturbed than wall time when other
/// processes share the machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn time(name: &str, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<()> {
    let _ = f()?;
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..reps {
        let _ = f()?;
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let cpu = (cpu_seconds() - c0) * 1e3 / reps as f64;
    println!("{name:<44} {wall:8.1} ms wall {cpu:8.1} ms cpu");
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let vb = VarBuilder::zeros(DType::F32, &dev);
    let (b, c, h) = (2usize, 320usize, 64usize);
    let x = Tensor::randn(0f32, 1.0, (b, c, h, h), &dev)?;
    let w = Tensor::randn(0f32, 0.02, (c, c, 3, 3), &dev)?;
    time("conv2d 3×3 320→320 @64² (candle)", 10, || Ok(x.conv2d(&w, 1, 1, 1, 1)?))?;
    let x2 = Tensor::randn(0f32, 1.0, (b, 640, 32, 32), &dev)?;
    let w2 = Tensor::randn(0f32, 0.02, (640, 640, 3, 3), &dev)?;
    time("conv2d 3×3 640→640 @32² (candle)", 3, || Ok(x2.conv2d(&w2, 1, 1, 1, 1)?))?;
    let gn = GroupNorm::new(vb.pp("gn"), 32, c, 1e-5)?;
    time("group norm + silu 320 @64²", 5, || Ok(gn.forward_silu(&x)?))?;
    let tokens = Tensor::randn(0f32, 1.0, (b, h * h, c), &dev)?;
    let ln = LayerNorm::new(vb.pp("ln"), c, 1e-5)?;
    time("layer norm 320 × 8192", 5, || Ok(ln.forward(&tokens)?))?;
    let lin = Linear::new(vb.pp("l"), c, c, false)?;
    time("linear 320→320 × 8192", 5, || Ok(lin.forward(&tokens)?))?;
    let ff = Linear::new(vb.pp("ff"), c, 8 * c, true)?;
    time("linear 320→2560 × 8192 (GEGLU proj)", 3, || Ok(ff.forward(&tokens)?))?;
    let big = Tensor::randn(0f32, 1.0, (b, h * h, 4 * c), &dev)?;
    time("gelu_erf 8192 × 1280", 3, || Ok(big.gelu_erf()?))?;
    time("silu 2×320×64²", 5, || Ok(x.silu()?))?;
    time("add 2×320×64²", 5, || Ok((&x + &x)?))?;
    time("permute+copy 2×320×64²", 5, || Ok(x.permute((0, 2, 3, 1))?.contiguous()?))?;
    let q = Tensor::randn(0f32, 1.0, (b, 8, h * h, 40), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, 8, h * h, 40), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, 8, h * h, 40), &dev)?;
    let opts = AttentionOptions::default();
    time("self-attention 2×8×4096×40 (auto)", 2, || {
        Ok(attention(&q, &k, &v, None, 40f64.powf(-0.5), false, &opts)?)
    })?;
    let kc = Tensor::randn(0f32, 1.0, (b, 8, 77, 40), &dev)?;
    time("cross-attention 2×8×4096×77×40", 3, || {
        Ok(attention(&q, &kc, &kc, None, 40f64.powf(-0.5), false, &opts)?)
    })?;
    let conv = Conv2d::new(vb.pp("c"), c, c, 3, 1, 1)?;
    time("Conv2d layer 3×3 320→320 @64² (ours)", 10, || Ok(conv.forward(&x)?))?;
    Ok(())
}
