//! Scratch micro-benchmarks (development only).
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::layers::Conv2d;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn time(name: &str, reps: usize, flop: f64, mut f: impl FnMut() -> Result<Tensor>) -> Result<()> {
    let _ = f()?;
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let _ = f()?;
        wall = wall.min(t0.elapsed().as_secs_f64());
        cpu = cpu.min(cpu_seconds() - c0);
    }
    println!(
        "{name:<44} {:8.1} ms wall {:8.1} ms cpu {:6.1} GFLOP/cpu-s",
        wall * 1e3,
        cpu * 1e3,
        flop / cpu / 1e9
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (4096, 4096), &dev)?;
    time("matmul 4096", 3, 2.0 * 4096f64.powi(3), || Ok(a.matmul(&a)?))?;
    let filter: Vec<String> = std::env::args().skip(1).collect();
    for (c, h) in [(128usize, 512usize), (256, 256), (512, 128), (512, 64), (320, 64), (640, 32)] {
        let b = if c <= 256 || h == 128 { 1 } else { 2 };
        let name = format!("conv3x3 ({b}, {c}, {h}, {h})");
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let vb = VarBuilder::from_tensors(
            [
                ("c.weight".to_string(), Tensor::randn(0f32, 0.02, (c, c, 3, 3), &dev)?),
                ("c.bias".to_string(), Tensor::randn(0f32, 0.02, c, &dev)?),
            ]
            .into_iter()
            .collect(),
            DType::F32,
            &dev,
        );
        let conv = Conv2d::new(vb.pp("c"), c, c, 3, 1, 1)?;
        let x = Tensor::randn(0f32, 1.0, (b, c, h, h), &dev)?;
        time(&name, 5, 2.0 * 9.0 * (c * c * h * h * b) as f64, || Ok(conv.forward(&x)?))?;
    }
    Ok(())
}
