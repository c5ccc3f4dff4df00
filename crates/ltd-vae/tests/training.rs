//! Gradients flow through the whole VAE when it is built from a `VarMap`: every parameter gets
//! a non-zero gradient from a reconstruction + KL loss, and a few AdamW steps reduce it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ltd_nn::RuntimeOptions;
use ltd_vae::AutoencoderKL;

/// Deterministic inputs uniform in [-1, 1).
fn randn(shape: &[usize], seed: u64) -> Tensor {
    ltd_test_support::lcg_tensor(shape, seed, 2.0, -1.0)
}

#[test]
fn adamw_steps_reduce_the_loss_and_every_parameter_gets_a_gradient() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1/vae");
    let cfg = AutoencoderKL::load_config(&dir).unwrap();
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let vae = AutoencoderKL::new(vb, &cfg, &RuntimeOptions::default()).unwrap();
    varmap.load(dir.join("diffusion_pytorch_model.safetensors")).unwrap();

    let x = randn(&[2, 3, 32, 24], 1);
    let noise = randn(&[2, 4, 4, 3], 2);
    let loss = |vae: &AutoencoderKL| {
        let posterior = vae.encode(&x).unwrap();
        let recon = vae.decode(&posterior.sample_with(&noise).unwrap()).unwrap();
        let mse = (recon - &x).unwrap().sqr().unwrap().mean_all().unwrap();
        let kl = posterior.kl().unwrap().mean_all().unwrap();
        (mse + (kl * 1e-3).unwrap()).unwrap()
    };

    let first = loss(&vae);
    let grads = first.backward().unwrap();
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

    let mut opt =
        AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 2e-3, ..Default::default() }).unwrap();
    let l0 = first.to_scalar::<f32>().unwrap();
    for _ in 0..5 {
        opt.backward_step(&loss(&vae)).unwrap();
    }
    let l5 = loss(&vae).to_scalar::<f32>().unwrap();
    eprintln!("loss {l0} → {l5}");
    assert!(l5 < 0.8 * l0, "loss {l0} → {l5} after 5 AdamW steps");
}
