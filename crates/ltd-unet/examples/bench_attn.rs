use anyhow::Result;
use candle_core::{Device, Tensor};
use ltd_nn::attention::{attention, AttentionOptions};
use std::time::Instant;
fn main() -> Result<()> {
    let dev = Device::Cpu;
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (bh, l, d, reps) = (args[0], args[1], args[2], args[3]);
    let q = Tensor::randn(0f32, 1.0, (1, bh, l, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, bh, l, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, bh, l, d), &dev)?;
    let opts = AttentionOptions::default();
    let _ = attention(&q, &k, &v, None, 0.15, false, &opts)?;
    let t0 = Instant::now();
    for _ in 0..reps {
        let _ = attention(&q, &k, &v, None, 0.15, false, &opts)?;
    }
    let s = t0.elapsed().as_secs_f64() / reps as f64;
    let gflop = 4.0 * (bh * l * l * d) as f64 / 1e9;
    println!("bh {bh} L {l} D {d}: {:.1} ms, {:.1} GFLOP/s", s * 1e3, gflop / s);
    Ok(())
}
