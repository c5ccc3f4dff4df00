//! `encoder_hid_dim_type: "text_proj"`: a U-Net whose cross-attention (24) is narrower than its
//! text encoder (the tiny T5, 32), with `encoder_hid_proj` between them, against diffusers'
//! `UNet2DConditionModel` (`tests/fixtures/golden/t5_pipeline/unet_text_proj.safetensors`, from
//! `tests/fixtures/gen/t5_pipeline.py`; the model is `pipelines/sd_t5/unet`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ltd_nn::RuntimeOptions;
use ltd_test_support::{fixtures, max_abs_diff};
use ltd_unet::{UNet2DConditionModel, UNetConditioning};

#[test]
fn text_proj_unet_matches_diffusers() {
    let golden: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("golden/t5_pipeline/unet_text_proj.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let unet = UNet2DConditionModel::load(
        &fixtures().join("pipelines/sd_t5/unet"),
        None,
        DType::F32,
        &Device::Cpu,
        &RuntimeOptions::default(),
    )
    .unwrap();
    let cfg = unet.config();
    assert_eq!((cfg.encoder_hid_dim, cfg.cross_attention_dim[0]), (Some(32), 24));
    assert_eq!(cfg.encoder_hidden_dim(), 32, "the model takes the T5's width");
    let mut cases: Vec<&str> = golden.keys().filter_map(|k| k.strip_suffix("/out")).collect();
    cases.sort_unstable();
    assert_eq!(cases, ["batch2", "float_t", "odd"]);
    for case in cases {
        let get = |k: &str| golden[&format!("{case}/{k}")].clone();
        let out = unet
            .forward(
                &get("sample"),
                &get("timesteps"),
                &get("encoder_hidden_states"),
                &UNetConditioning::default(),
            )
            .unwrap();
        let err = max_abs_diff(&out, &get("out"));
        eprintln!("{case}: max abs error {err:.3e}");
        assert!(err < 1e-4, "{case}: max abs error {err:.3e}");
    }
}

#[test]
fn states_of_the_cross_attention_width_are_refused() {
    let unet = UNet2DConditionModel::load(
        &fixtures().join("pipelines/sd_t5/unet"),
        None,
        DType::F32,
        &Device::Cpu,
        &RuntimeOptions::default(),
    )
    .unwrap();
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[10f32], &Device::Cpu).unwrap();
    // 24 wide: what the blocks attend to, but not what encoder_hid_proj takes.
    let ctx = Tensor::zeros((1, 3, 24), DType::F32, &Device::Cpu).unwrap();
    assert!(unet.forward(&x, &t, &ctx, &UNetConditioning::default()).is_err());
}
