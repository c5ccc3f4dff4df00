//! Gradients flow through the whole U-Net when it is built from a `VarMap`: every parameter
//! gets a non-zero gradient, and a few AdamW steps reduce a regression loss.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ltd_nn::RuntimeOptions;
use ltd_test_support::randn;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};

#[test]
fn adamw_steps_reduce_the_loss_and_every_parameter_gets_a_gradient() {
    // The SDXL-style fixture: added conditioning, linear projections, per-block depths.
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sdxl/unet");
    let cfg: UNetConfig =
        ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&dir.join("config.json"))
            .unwrap();
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let unet = UNet2DConditionModel::new(vb, &cfg, &RuntimeOptions::default()).unwrap();
    // Deterministic starting point: the fixture's weights.
    varmap.load(dir.join("diffusion_pytorch_model.safetensors")).unwrap();

    let (b, l) = (2, 5);
    let x = randn(&[b, 4, 8, 8], 1);
    let target = randn(&[b, 4, 8, 8], 2);
    let t = Tensor::new(&[50f32, 700.0], &Device::Cpu).unwrap();
    let context = randn(&[b, l, cfg.encoder_hidden_dim()], 3);
    let cond = UNetConditioning {
        text_embeds: Some(randn(&[b, cfg.pooled_text_embed_dim().unwrap()], 4)),
        time_ids: Some(Tensor::new(&[[8f32, 8., 0., 0., 8., 8.]; 2], &Device::Cpu).unwrap()),
        ..Default::default()
    };
    let loss = |unet: &UNet2DConditionModel| {
        let out = unet.forward(&x, &t, &context, &cond).unwrap();
        (out - &target).unwrap().sqr().unwrap().mean_all().unwrap()
    };

    let first = loss(&unet);
    let grads = first.backward().unwrap();
    let vars = varmap.all_vars();
    let no_grad: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_none_or(|g| {
                g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0
            })
        })
        .map(|(k, _)| k.clone())
        .collect();
    assert!(no_grad.is_empty(), "parameters without gradient: {no_grad:?}");

    let mut opt = AdamW::new(vars, ParamsAdamW { lr: 2e-3, ..Default::default() }).unwrap();
    let l0 = first.to_scalar::<f32>().unwrap();
    for _ in 0..5 {
        opt.backward_step(&loss(&unet)).unwrap();
    }
    let l5 = loss(&unet).to_scalar::<f32>().unwrap();
    eprintln!("loss {l0} → {l5}");
    assert!(l5 < 0.8 * l0, "loss {l0} → {l5} after 5 AdamW steps");
}
