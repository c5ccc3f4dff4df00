//! VAE checkpoints converted before diffusers 0.14 name the mid-block attention projections
//! `query`, `key`, `value` and `proj_attn` (e.g. many fine-tuned SD 1.x VAEs); they load too.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ltd_nn::RuntimeOptions;
use ltd_vae::AutoencoderKL;

#[test]
fn legacy_attention_names_load_and_give_the_same_result() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines/sd1/vae");
    let tensors = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v)
        })
        .collect();
    assert!(renamed.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(
        &renamed,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();

    let opts = RuntimeOptions::default();
    let new = AutoencoderKL::load(&src, None, DType::F32, &Device::Cpu, &opts).unwrap();
    let old = AutoencoderKL::load(dir.path(), None, DType::F32, &Device::Cpu, &opts).unwrap();
    let z = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().reshape((1, 4, 4, 3)).unwrap();
    let z = ((z / 24.0).unwrap() - 1.0).unwrap();
    let diff = (new.decode(&z).unwrap() - old.decode(&z).unwrap()).unwrap().abs().unwrap();
    assert_eq!(diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
}
