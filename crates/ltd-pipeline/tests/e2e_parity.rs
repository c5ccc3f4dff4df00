//! Whole-pipeline parity with diffusers: every case of `tests/fixtures/golden/e2e/cases.json`
//! (prompt, negative prompt, seed, steps, guidance, rescale, thresholding, sampler, batch, size,
//! image-to-image) run through the library; the final latents must equal diffusers'.
//!
//! Tolerance: max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|) (measured: ≤ 2e-5). Two float32
//! implementations differ by summation order only; this bound is far below what a wrong
//! prompt, seed, noise draw or sampler step produces (differences of order 1).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ltd_pipeline::{DynamicThreshold, GenerateRequest, InitImage, LoadOptions, Pipeline, RgbImage};
use ltd_test_support::fixtures;
use serde_json::Value;

/// Reads a PNG into RGB bytes (8-bit RGB or RGBA).
pub fn read_png(path: &Path) -> RgbImage {
    let (w, h, pixels, _) = ltd_test_support::read_png_rgb(path);
    RgbImage::new(w, h, pixels).unwrap()
}

fn request(case: &Value) -> GenerateRequest {
    let s = |k: &str| case[k].as_str().map(str::to_string);
    let f = |k: &str| case[k].as_f64();
    let u = |k: &str| case[k].as_u64().map(|v| v as usize);
    let init_image = s("init_image").map(|file| InitImage {
        image: read_png(&fixtures().join("golden/e2e").join(file)),
        strength: f("strength").unwrap(),
    });
    GenerateRequest {
        prompts: vec![s("prompt").unwrap()],
        negative: s("negative"),
        steps: u("steps").unwrap(),
        guidance: f("guidance").unwrap(),
        guidance_rescale: f("guidance_rescale").unwrap(),
        dynamic_threshold: case["dynamic_threshold"].as_object().map(|t| DynamicThreshold {
            ratio: t["ratio"].as_f64().unwrap(),
            max: t["max"].as_f64().unwrap(),
        }),
        scheduler: s("scheduler").map(|name| ltd_pipeline::parse_sampler(&name).unwrap()),
        width: u("width"),
        height: u("height"),
        num_images: u("num_images").unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        clip_skip: u("clip_skip"),
        init_image,
        ..Default::default()
    }
}

/// A case's model: `default` is the trained model ltd-gen embeds (`models/DEFAULT` names it),
/// any other name a tiny fixture pipeline.
fn pipeline_folder(name: &str) -> PathBuf {
    if name == "default" {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let default = std::fs::read_to_string(models.join("DEFAULT")).unwrap();
        return models.join(default.trim());
    }
    fixtures().join("pipelines").join(name)
}

#[test]
fn pipeline_matches_diffusers_latents() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/e2e/cases.json")).unwrap(),
    )
    .unwrap();
    let mut pipes: HashMap<String, Pipeline> = HashMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let which = case["pipeline"].as_str().unwrap().to_string();
        let pipe = pipes.entry(which.clone()).or_insert_with(|| {
            Pipeline::load_folder(&pipeline_folder(&which), &LoadOptions::default()).unwrap()
        });
        let golden = candle_core::safetensors::load(
            fixtures().join("golden/e2e").join(format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let want: &Tensor = &golden["latents"];
        let got = match pipe.generate(&request(case), &mut |_| {}) {
            Ok(g) => g.latents,
            Err(e) => {
                failures.push(format!("{name}: error {e}"));
                continue;
            }
        };
        if got.dims() != want.dims() {
            failures.push(format!("{name}: shape {:?} vs {:?}", got.dims(), want.dims()));
            continue;
        }
        let err =
            (&got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        let rel = err / scale;
        eprintln!("{name:28} max|Δ| {err:.2e} (relative {rel:.2e})");
        if rel > 1e-4 {
            failures.push(format!("{name}: max |Δ| {err} (relative {rel})"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
