//! Parity with diffusers: `tests/fixtures/golden/models/vae_*.safetensors` hold inputs and
//! diffusers' float32 outputs for encoding (mean, logvar, KL), sampling with given noise,
//! decoding, and tiled decoding and encoding (see `tests/fixtures/gen/models.py`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ltd_nn::RuntimeOptions;
use ltd_test_support::{fixtures, max_abs_diff};
use ltd_vae::{AutoencoderKL, TilingOptions};

/// Golden file stem → model folder (relative to tests/fixtures).
const MODELS: &[(&str, &str)] = &[
    ("sd1", "pipelines/sd1/vae"),
    ("sd2", "pipelines/sd2/vae"),
    ("sdxl", "pipelines/sdxl/vae"),
    ("b", "models/vae-b"),
];

/// Tiles of 4×4 latents, overlapping by a quarter (what the goldens were made with).
const TILE_LATENT: usize = 4;

/// (model/output, max |ours − diffusers|) for every output of every golden file.
fn run_all(dtype: DType) -> Vec<(String, f32)> {
    let mut results = Vec::new();
    for (name, dir) in MODELS {
        let g: HashMap<String, Tensor> = candle_core::safetensors::load(
            fixtures().join(format!("golden/models/vae_{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let vae = AutoencoderKL::load(
            &fixtures().join(dir),
            None,
            dtype,
            &Device::Cpu,
            &RuntimeOptions::default(),
        )
        .unwrap();
        let mut record = |what: &str, ours: &Tensor| {
            assert_eq!(ours.dtype(), dtype, "{name}/{what}");
            results.push((format!("{name}/{what}"), max_abs_diff(ours, &g[what])));
        };
        let posterior = vae.encode(&g["encode/image"]).unwrap();
        record("encode/mean", &posterior.mean);
        record("encode/logvar", &posterior.logvar);
        record("encode/kl", &posterior.kl().unwrap());
        record("sample/out", &posterior.sample_with(&g["sample/noise"]).unwrap());
        record("decode/out", &vae.decode(&g["decode/latents"]).unwrap());
        if let Some(latents) = g.get("tiled_decode/latents") {
            let f = vae.config().scale_factor();
            let tiling = TilingOptions {
                tile_sample_min_size: TILE_LATENT * f,
                tile_latent_min_size: TILE_LATENT,
                tile_overlap_factor: 0.25,
            };
            record("tiled_decode/out", &vae.decode_with_tiling(latents, Some(&tiling)).unwrap());
            let posterior =
                vae.encode_with_tiling(&g["tiled_encode/image"], Some(&tiling)).unwrap();
            record("tiled_encode/mean", &posterior.mean);
            record("tiled_encode/logvar", &posterior.logvar);
        }
    }
    results
}

fn check(dtype: DType, tolerance: f32) {
    let results = run_all(dtype);
    for (what, err) in &results {
        eprintln!("{dtype:?} {what}: max abs error {err:.3e}");
    }
    let bad: Vec<_> = results.iter().filter(|(_, e)| e.is_nan() || *e > tolerance).collect();
    assert!(bad.is_empty(), "{dtype:?}: above {tolerance}: {bad:?}");
}

#[test]
fn vae_matches_diffusers_f32() {
    check(DType::F32, 1e-4);
}

// Half precision against the float32 goldens (decoded images reach |x| ≈ 3.6). For scale,
// diffusers itself in f16 / bf16 is off by 9.0e-3 / 8.7e-2 on the SD 1.x decode and by
// 9.9e-3 / 1.7e-1 on the tiled decode; we measured at most 8.2e-3 (f16) and 8.1e-2 (bf16).

#[test]
fn vae_matches_diffusers_f16() {
    check(DType::F16, 1.5e-2);
}

#[test]
fn vae_matches_diffusers_bf16() {
    check(DType::BF16, 1.5e-1);
}
