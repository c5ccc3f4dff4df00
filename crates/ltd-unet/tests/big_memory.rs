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

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::random_weights;
use ltd_nn::RuntimeOptions;
use ltd_test_support::{reset_peak, status_kib};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};

#[test]
fn sd15_512_forward_stays_within_the_memory_bound() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs/stable-diffusion-v1-5/unet/config.json");
    let cfg: UNetConfig =
        ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&config).unwrap();
    let opts = RuntimeOptions::default();
    let vb = random_weights(DType::F32);
    let unet = UNet2DConditionModel::new(vb, &cfg, &opts).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &Device::Cpu).unwrap();
    let t = Tensor::new(&[981f32], &Device::Cpu).unwrap();

    let before = status_kib("VmRSS:");
    reset_peak();
    let out = unet.forward(&x, &t, &context, &UNetConditioning::default()).unwrap();
    let peak = status_kib("VmHWM:");
    let transient_mib = peak.saturating_sub(before) / 1024;
    eprintln!("resident before {} MiB, transient peak {transient_mib} MiB", before / 1024);
    assert_eq!(out.dims(), [2, 4, 64, 64]);
    assert!(out.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
    assert!(transient_mib < 1024, "transient peak {transient_mib} MiB above the 1 GiB bound");
}
