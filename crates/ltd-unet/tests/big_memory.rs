//! The attention path keeps a full-size SD 1.5 forward at 512×512, batch 2 (4096-token
//! self-attention) within a memory bound: the transient peak above the weights stays under
//! 1 GiB (materialising the 2×8×4096×4096 f32 scores and their softmax would alone take 2 GiB).
//!
//! Slow (a 3.4 GB random-weight model and one full forward pass), so this target is built only
//! with ltd-unet's `big-tests` feature (`required-features` in its Cargo.toml): `cargo test
//! --workspace` does not build it, rather than passing it having run nothing. Run it with
//! `cargo xtask big-tests`, which says what it ran.
//! Measured (release, this repo's CI machine): 372 MiB with the default attention, 713 MiB with
//! `AttentionImpl::Chunked` (256 MiB budget), 2253 MiB with `AttentionImpl::Naive`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::RuntimeOptions;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn sd15_512_forward_stays_within_the_memory_bound() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs/stable-diffusion-v1-5/unet/config.json");
    let cfg: UNetConfig =
        ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&config).unwrap();
    let opts = RuntimeOptions::default();
    let (_, shapes) =
        ltd_nn::record_shapes(DType::F32, |vb| UNet2DConditionModel::new(vb, &cfg, &opts)).unwrap();
    // Plain tensors (not a VarMap): the inference kernels run, as they do with real weights.
    let weights: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let bound = 1.0 / (shape[1..].iter().product::<usize>().max(1) as f32).sqrt();
            let t = if shape.len() == 1 {
                Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
            } else {
                Tensor::rand(-bound, bound, shape, &Device::Cpu).unwrap()
            };
            (name, t)
        })
        .collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb, &cfg, &opts).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &Device::Cpu).unwrap();
    let t = Tensor::new(&[981f32], &Device::Cpu).unwrap();

    let before = status_kib("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let out = unet.forward(&x, &t, &context, &UNetConditioning::default()).unwrap();
    let peak = status_kib("VmHWM:");
    let transient_mib = peak.saturating_sub(before) / 1024;
    eprintln!("resident before {} MiB, transient peak {transient_mib} MiB", before / 1024);
    assert_eq!(out.dims(), [2, 4, 64, 64]);
    assert!(out.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
    assert!(transient_mib < 1024, "transient peak {transient_mib} MiB above the 1 GiB bound");
}
