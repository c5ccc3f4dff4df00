//! The full-size SD 1.5, SD 2.1 and SDXL VAEs, built from their official configs without
//! weights, request exactly the tensors (names and shapes) of the reference models' state dicts
//! (`tests/fixtures/fullsize/*/vae.txt`).

use candle_core::DType;
use ltd_nn::RuntimeOptions;
use ltd_test_support::{assert_same_shapes, fixtures, read_shapes, workspace_root};
use ltd_vae::AutoencoderKL;

fn check(short: &str, config_dir: &str) {
    let cfg =
        AutoencoderKL::load_config(&workspace_root().join("configs").join(config_dir).join("vae"))
            .unwrap();
    let (_, ours) = ltd_nn::record_shapes(DType::F32, |vb| {
        AutoencoderKL::new(vb, &cfg, &RuntimeOptions::default())
    })
    .unwrap();
    let expected = read_shapes(&fixtures().join(format!("fullsize/{short}/vae.txt")));
    assert_same_shapes(short, &ours, &expected);
}

#[test]
fn sd15_vae_requests_the_reference_tensors() {
    check("sd15", "stable-diffusion-v1-5");
}

#[test]
fn sd21_vae_requests_the_reference_tensors() {
    check("sd21", "stable-diffusion-2-1");
}

#[test]
fn sdxl_vae_requests_the_reference_tensors() {
    check("sdxl", "stable-diffusion-xl-base-1.0");
}
