//! DeepFloyd IF stage I on the CPU with f16 weights, as IF ships them (the `fp16` variant that
//! `--dtype f16` loads without conversion): the peak resident memory of the T5-XXL text encoder
//! (load, then encode a prompt and the empty negative prompt, 77 tokens each, as `IFPipeline`
//! does) and of the IF-I-XL U-Net (load, then one guided 64×64 step on the encoder's output),
//! one after the other in one process, the encoder dropped before the U-Net loads. The
//! pipeline's peak is then the larger of the two, not their sum, provided the encoder's memory
//! really goes back: that is the check here.
//!
//! Slow and large (about 11 GiB, then 8 GiB, of random weights, made by `common::random_weights`
//! in the dtype each tensor is loaded in; T5 keeps its `wo` projections in f32 in f16 models),
//! so this target is built only with ltd-unet's `big-tests` feature and run by
//! `cargo xtask big-tests`. The numbers it prints are in README.md ("Speed and memory").
//!
//! Measured (release, a 2-core AMD EPYC with AVX2, shared with other builds): T5-XXL 11,004 MiB
//! resident after load, 11,192 MiB peak with the encode, 13 MiB left after dropping it; the
//! IF-I-XL U-Net 8,330 MiB after load, 9,730 MiB peak with the step. Peak of the sequence
//! 11,192 MiB, against 20,922 MiB for both held at once.

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use common::random_weights;
use ltd_nn::{load_config, record_shapes, RuntimeOptions};
use ltd_test_support::{reset_peak, status_kib, workspace_root};
use ltd_text::{T5Config, T5EncoderModel, T5Params};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};

const MIB: u64 = 1024;
/// IFPipeline's tokenizer length (`max_length=77`).
const TOKENS: usize = 77;
/// Bound on the memory a run adds on top of the weights (see the assertion).
const TRANSIENT_BOUND_MIB: u64 = 2048;

/// Parameters the module asks for (record_shapes: no memory).
fn parameters<M>(build: impl FnOnce(candle_nn::VarBuilder<'_>) -> candle_core::Result<M>) -> u64 {
    let (_, shapes) = record_shapes(DType::F16, build).unwrap();
    shapes.values().map(|s| s.iter().product::<usize>() as u64).sum()
}

#[test]
fn if_stage_one_f16_holds_one_model_at_a_time() {
    let configs = workspace_root().join("configs/IF-I-XL-v1.0");
    let t5_params: T5Params =
        load_config::<T5Config, T5Params>(&configs.join("text_encoder/config.json")).unwrap();
    let unet_cfg: UNetConfig =
        load_config::<UNet2DConditionModelConfig, UNetConfig>(&configs.join("unet/config.json"))
            .unwrap();
    let opts = RuntimeOptions::default();
    let t5_n = parameters(|vb| T5EncoderModel::new(vb, &t5_params, &opts));
    let unet_n = parameters(|vb| UNet2DConditionModel::new(vb, &unet_cfg, &opts));

    // A prompt of 12 tokens and the empty negative prompt (`</s>` alone), padded to 77.
    let mut ids = vec![0u32; 2 * TOKENS];
    let mut mask = vec![0f32; 2 * TOKENS];
    for i in 0..12 {
        ids[i] = 100 + 37 * i as u32;
        mask[i] = 1.0;
    }
    ids[12] = 1;
    mask[12] = 1.0;
    ids[TOKENS] = 1;
    mask[TOKENS] = 1.0;
    let ids = Tensor::from_vec(ids, (2, TOKENS), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (2, TOKENS), &Device::Cpu).unwrap();

    let start = status_kib("VmRSS:");
    reset_peak();
    let clock = Instant::now();
    let t5 = T5EncoderModel::new(random_weights(DType::F16), &t5_params, &opts).unwrap();
    let t5_resident = status_kib("VmRSS:").saturating_sub(start);
    let t5_load_s = clock.elapsed().as_secs_f64();
    let context = t5.forward(&ids, Some(&mask)).unwrap();
    let t5_peak = status_kib("VmHWM:").saturating_sub(start);
    let t5_s = clock.elapsed().as_secs_f64();
    drop(t5);
    let released = status_kib("VmRSS:").saturating_sub(start);

    reset_peak();
    let clock = Instant::now();
    let unet = UNet2DConditionModel::new(random_weights(DType::F16), &unet_cfg, &opts).unwrap();
    let unet_resident = status_kib("VmRSS:").saturating_sub(start);
    let unet_load_s = clock.elapsed().as_secs_f64();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let t = Tensor::new(&[981f32], &Device::Cpu).unwrap();
    let out = unet.forward(&x, &t, &context, &UNetConditioning::default()).unwrap();
    let unet_peak = status_kib("VmHWM:").saturating_sub(start);
    let unet_s = clock.elapsed().as_secs_f64();

    eprintln!(
        "T5-XXL encoder: {:.3}B parameters, resident {} MiB after load ({t5_load_s:.0} s), \
         peak {} MiB with the encode ({t5_s:.0} s); {} MiB left after dropping it",
        t5_n as f64 / 1e9,
        t5_resident / MIB,
        t5_peak / MIB,
        released / MIB
    );
    eprintln!(
        "IF-I-XL U-Net: {:.3}B parameters, resident {} MiB after load ({unet_load_s:.0} s), \
         peak {} MiB with one 2×3×64×64 step ({unet_s:.0} s)",
        unet_n as f64 / 1e9,
        unet_resident / MIB,
        unet_peak / MIB
    );
    eprintln!(
        "max(encoder, U-Net) {} MiB; sum {} MiB",
        t5_peak.max(unet_peak) / MIB,
        (t5_peak + unet_peak) / MIB
    );

    assert_eq!(context.dims(), [2, TOKENS, 4096]);
    assert_eq!(out.dims(), [2, 6, 64, 64]);
    // The weights were really resident (2 bytes a parameter at least; T5's f32 `wo` adds more),
    // so the peaks measure a load, not untouched pages.
    assert!(t5_resident >= t5_n * 2 / 1024 * 99 / 100, "T5 resident {t5_resident} KiB");
    assert!(unet_resident >= unet_n * 2 / 1024 * 99 / 100, "U-Net resident {unet_resident} KiB");
    // Dropping the encoder returns its memory (every weight is a separate large allocation,
    // which the allocator unmaps on free): what stays is its output and allocator slack.
    assert!(released < 512 * MIB, "{} MiB still resident after dropping T5", released / MIB);
    // What the run adds on top of the weights. Measured (see the module docs): T5 188 MiB, the
    // U-Net 1,395–1,399 MiB (not broken down; the 64×64 level's 3×3 convolutions over up to
    // 2,112 input channels have the largest buffers). The bound, 2 GiB, leaves room for
    // allocator and thread-count differences but not for a second copy of the weights in any
    // dtype (≥ 8 GiB), nor of the encoder's f32 `wo` projections (3.75 GiB).
    for (what, resident, peak) in
        [("T5", t5_resident, t5_peak), ("U-Net", unet_resident, unet_peak)]
    {
        let transient = peak.saturating_sub(resident) / MIB;
        assert!(transient < TRANSIENT_BOUND_MIB, "{what}: {transient} MiB above the weights");
    }
}
