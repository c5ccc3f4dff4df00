//! The full-size SD 1.5, SD 2.1, SDXL and DeepFloyd IF (IF-I-XL, IF-II-L) U-Nets, built from
//! their configs in `configs/` without weights, request exactly the tensors (names and shapes)
//! of the reference models' state dicts (`tests/fixtures/fullsize/*/unet.txt`): real
//! checkpoints load, with nothing missing or unused.

use candle_core::DType;
use ltd_nn::RuntimeOptions;
use ltd_test_support::{assert_same_shapes, fixtures, read_shapes, workspace_root};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConfig};

fn check(short: &str, config_dir: &str) {
    let config = workspace_root().join("configs").join(config_dir).join("unet/config.json");
    let cfg: UNetConfig =
        ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&config).unwrap();
    let (_, ours) = ltd_nn::record_shapes(DType::F32, |vb| {
        UNet2DConditionModel::new(vb, &cfg, &RuntimeOptions::default())
    })
    .unwrap();
    let expected = read_shapes(&fixtures().join(format!("fullsize/{short}/unet.txt")));
    assert_same_shapes(short, &ours, &expected);
}

#[test]
fn sd15_unet_requests_the_reference_tensors() {
    check("sd15", "stable-diffusion-v1-5");
}

#[test]
fn sd21_unet_requests_the_reference_tensors() {
    check("sd21", "stable-diffusion-2-1");
}

#[test]
fn sdxl_unet_requests_the_reference_tensors() {
    check("sdxl", "stable-diffusion-xl-base-1.0");
}

#[test]
fn if_i_xl_unet_requests_the_reference_tensors() {
    check("if-i-xl", "IF-I-XL-v1.0");
}

#[test]
fn if_ii_l_unet_requests_the_reference_tensors() {
    check("if-ii-l", "IF-II-L-v1.0");
}
