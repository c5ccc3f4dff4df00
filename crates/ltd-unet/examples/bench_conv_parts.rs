use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;
fn time(name: &str, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<()> {
    let _ = f()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        let _ = f()?;
    }
    println!("{name:<48} {:8.1} ms", t0.elapsed().as_secs_f64() * 1e3 / reps as f64);
    Ok(())
}
fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (b, cin, h, w, k) = (2usize, 320usize, 64usize, 64usize, 3usize);
    let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev)?;
    let wt = Tensor::randn(0f32, 1.0, (cin, cin, 3, 3), &dev)?;
    let wp = w + 2;
    time("pad", 5, || Ok(x.pad_with_zeros(3, 1, 1)?.pad_with_zeros(2, 1, 2)?))?;
    let xp = x.pad_with_zeros(3, 1, 1)?.pad_with_zeros(2, 1, 2)?;
    let flat = xp.reshape((b, cin, (h + 3) * wp))?;
    let shifts: Vec<Tensor> =
        (0..9).map(|i| flat.narrow(2, (i / 3) * wp + i % 3, h * wp).unwrap()).collect();
    time("stack", 5, || Ok(Tensor::stack(&shifts, 2)?))?;
    let cols = Tensor::stack(&shifts, 2)?.reshape((b, cin * 9, h * wp))?;
    let w2 = wt.reshape((cin, cin * 9))?;
    time("matmul broadcast", 3, || Ok(w2.broadcast_left(b)?.matmul(&cols)?))?;
    let c0 = cols.get(0)?;
    time("matmul single image", 3, || Ok(w2.matmul(&c0)?))?;
    let c0t = c0.t()?.contiguous()?;
    time("matmul cols^T·w^T (N×K·K×M)", 3, || Ok(c0t.matmul(&w2.t()?)?))?;
    Ok(())
}
