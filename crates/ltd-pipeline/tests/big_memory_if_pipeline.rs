//! DeepFloyd IF stage I through the pipeline, from a model folder of full-size random weights
//! in f16 (IF-I-XL's U-Net and T5-XXL's encoder, as `configs/IF-I-XL-v1.0` describes them):
//! the peak resident memory of a whole guided generation is the larger of the text encoder and
//! the U-Net, not their sum. The pipeline loads the T5 for the encoding and releases it, and
//! loads the U-Net after the encoding and releases it after the loop (`UNetSlot` in
//! `pipeline.rs`); holding both at once, as a pipeline that loads its U-Net with the folder
//! would, fails the bound below by about 8 GiB.
//!
//! ltd-unet's `big_memory_if` measures the two components one after the other from weights
//! made in memory; this test reads real files (mapped, copied out and released by the loader)
//! and runs the pipeline's own order. Slow and large: it writes about 18 GB of safetensors to a
//! temporary folder, so this target is built only with ltd-pipeline's `big-tests` feature and
//! run by `cargo xtask big-tests`. The numbers it prints are in README.md ("Speed and memory").

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ltd_nn::{load_config, record_shapes, RuntimeOptions};
use ltd_pipeline::{GenerateRequest, LoadOptions, Pipeline};
use ltd_test_support::{fixtures, reset_peak, status_kib, workspace_root};
use ltd_text::{T5Config, T5EncoderModel, T5Params};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConfig};

const MIB: u64 = 1024;

extern "C" {
    /// glibc: returns free heap memory to the system.
    fn malloc_trim(pad: usize) -> i32;
}
/// What a run may add on top of the larger model's weights: ltd-unet's `big_memory_if`
/// measured 188 MiB for the T5 encode and about 1,400 MiB for the U-Net's 64×64 guided step.
/// 2 GiB leaves room for allocator and thread differences, not for the other model (≥ 8 GiB).
const TRANSIENT_BOUND_MIB: u64 = 2048;

/// A tensor whose bytes are made when the file writer asks for them, so that writing a
/// multi-gigabyte file holds one tensor at a time: uniform in ±1/√fan-in (1-D: ones), in f16.
struct RandomF16 {
    shape: Vec<usize>,
}

impl safetensors::View for RandomF16 {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F16
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let t = if self.shape.len() == 1 {
            Tensor::ones(self.shape.as_slice(), DType::F16, &Device::Cpu).unwrap()
        } else {
            let bound = 1.0 / (self.shape[1..].iter().product::<usize>().max(1) as f64).sqrt();
            Tensor::rand(-bound as f32, bound as f32, self.shape.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        Cow::Owned(safetensors::View::data(&t).into_owned())
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

fn write_random(shapes: &BTreeMap<String, Vec<usize>>, path: &Path) {
    let tensors =
        shapes.iter().map(|(name, shape)| (name.clone(), RandomF16 { shape: shape.clone() }));
    safetensors::serialize_to_file(tensors, None, path).unwrap();
}

/// Bytes the loaded model keeps: f16 everywhere but T5's feed-forward output projections
/// (`wo`), which the loader keeps in f32 (transformers' `_keep_in_fp32_modules`).
fn loaded_bytes(shapes: &BTreeMap<String, Vec<usize>>) -> u64 {
    shapes
        .iter()
        .map(|(name, s)| {
            let n = s.iter().product::<usize>() as u64;
            if name.ends_with("DenseReluDense.wo.weight") {
                4 * n
            } else {
                2 * n
            }
        })
        .sum()
}

#[test]
fn if_pipeline_f16_peak_is_the_larger_model_not_the_sum() {
    let configs = workspace_root().join("configs/IF-I-XL-v1.0");
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let root = dir.path();
    for part in ["unet", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir(root.join(part)).unwrap();
    }
    std::fs::copy(configs.join("model_index.json"), root.join("model_index.json")).unwrap();
    for part in ["unet", "text_encoder"] {
        let config = format!("{part}/config.json");
        std::fs::copy(configs.join(&config), root.join(&config)).unwrap();
    }
    // The scheduler and a SentencePiece vocabulary of the tiny IF fixture: neither changes a
    // weight (token ids stay far below T5-XXL's 32,128).
    ltd_test_support::copy_dir(
        &fixtures().join("pipelines/if-1/scheduler"),
        &root.join("scheduler"),
    );
    ltd_test_support::copy_dir(
        &fixtures().join("pipelines/if-1/tokenizer"),
        &root.join("tokenizer"),
    );

    let opts = RuntimeOptions::default();
    let t5_params: T5Params =
        load_config::<T5Config, T5Params>(&configs.join("text_encoder/config.json")).unwrap();
    let unet_cfg: UNetConfig =
        load_config::<UNet2DConditionModelConfig, UNetConfig>(&configs.join("unet/config.json"))
            .unwrap();
    let (_, t5_shapes) =
        record_shapes(DType::F16, |vb| T5EncoderModel::new(vb, &t5_params, &opts)).unwrap();
    let (_, unet_shapes) =
        record_shapes(DType::F16, |vb| UNet2DConditionModel::new(vb, &unet_cfg, &opts)).unwrap();
    let clock = Instant::now();
    write_random(&t5_shapes, &root.join("text_encoder/model.safetensors"));
    write_random(&unet_shapes, &root.join("unet/diffusion_pytorch_model.safetensors"));
    eprintln!("wrote the random weights in {:.0} s", clock.elapsed().as_secs_f64());
    let t5_kib = loaded_bytes(&t5_shapes) / 1024;
    let unet_kib = loaded_bytes(&unet_shapes) / 1024;

    let start = status_kib("VmRSS:");
    reset_peak();
    let clock = Instant::now();
    let options = LoadOptions { dtype: DType::F16, ..LoadOptions::default() };
    let pipe = Pipeline::load_folder(root, &options).unwrap();
    let loaded = status_kib("VmRSS:").saturating_sub(start);
    // Guided (the prompt and the empty negative prompt, 77 tokens each), one DDPM step at
    // IF-I's 64×64.
    let req = GenerateRequest {
        prompts: vec!["a red circle on a blue square".into()],
        steps: 1,
        guidance: 7.0,
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_| {}).unwrap();
    let peak = status_kib("VmHWM:").saturating_sub(start);
    let after = status_kib("VmRSS:").saturating_sub(start);
    let seconds = clock.elapsed().as_secs_f64();
    // glibc keeps freed heap memory for reuse (measured: about 2.3 GiB after this run, in
    // arenas below its mmap threshold); trimming returns it, so what is left is what is live.
    // SAFETY: glibc's `malloc_trim` only releases free memory; nothing refers to it.
    unsafe { malloc_trim(0) };
    let live = status_kib("VmRSS:").saturating_sub(start);
    let image = &out.images[0].image;
    assert_eq!((image.width, image.height), (64, 64));

    eprintln!(
        "IF-I-XL pipeline, f16 files: loaded holding {} MiB; generation peak {} MiB \
         ({seconds:.0} s); {} MiB after it, {} MiB live (after malloc_trim); weights: T5-XXL {} MiB, U-Net {} MiB \
         (max {} MiB, sum {} MiB)",
        loaded / MIB,
        peak / MIB,
        after / MIB,
        live / MIB,
        t5_kib / MIB,
        unet_kib / MIB,
        t5_kib.max(unet_kib) / MIB,
        (t5_kib + unet_kib) / MIB
    );
    // Loading the pipeline reads configs and the tokenizer, not weights.
    assert!(loaded < 512 * MIB, "{} MiB resident after loading the pipeline", loaded / MIB);
    // Each model was really resident at some point (99%: page rounding), so the peak measured
    // loads, not untouched pages…
    assert!(peak >= t5_kib.max(unet_kib) * 99 / 100, "peak {} MiB", peak / MIB);
    // …but never both at once.
    assert!(
        peak < t5_kib.max(unet_kib) + TRANSIENT_BOUND_MIB * MIB,
        "peak {} MiB: more than the larger model ({} MiB) + {TRANSIENT_BOUND_MIB} MiB",
        peak / MIB,
        t5_kib.max(unet_kib) / MIB
    );
    // Nothing big stays live between generations.
    assert!(live < 512 * MIB, "{} MiB live after the generation", live / MIB);
}
