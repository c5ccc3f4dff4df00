//! T5 as the text encoder of a `StableDiffusionPipeline`, through the library: every case of
//! `tests/fixtures/golden/t5_pipeline/cases.json` (`pipelines/sd_t5`: `tokenizer.json`, a
//! `text_proj` U-Net; `pipelines/sd_t5_spm`: `spiece.model`, `use_attention_mask`) and of
//! `golden/t5_train/cases.json` (`pipelines/sd_t5_trained`: a folder ltd's trainer wrote, see
//! ltd-train's `train_unet.rs`) must give diffusers' final latents, with the tolerance of
//! `e2e_parity.rs` (max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|)).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use ltd_pipeline::{GenerateRequest, LoadOptions, Pipeline};
use ltd_test_support::fixtures;
use serde_json::Value;

fn request(case: &Value) -> GenerateRequest {
    let s = |k: &str| case[k].as_str().map(str::to_string);
    let u = |k: &str| case[k].as_u64().map(|v| v as usize);
    for key in ["dynamic_threshold", "width", "height", "clip_skip", "init_image"] {
        assert!(case[key].is_null(), "{}: {key} is set but not passed on", case["name"]);
    }
    GenerateRequest {
        prompts: vec![s("prompt").unwrap()],
        negative: s("negative"),
        steps: u("steps").unwrap(),
        guidance: case["guidance"].as_f64().unwrap(),
        guidance_rescale: case["guidance_rescale"].as_f64().unwrap(),
        scheduler: s("scheduler").map(|name| ltd_pipeline::parse_sampler(&name).unwrap()),
        num_images: u("num_images").unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        ..Default::default()
    }
}

#[test]
fn t5_pipelines_match_diffusers_latents() {
    let mut pipes: HashMap<String, Pipeline> = HashMap::new();
    let mut failures = Vec::new();
    let cases = ["t5_pipeline", "t5_train"].into_iter().flat_map(|section| {
        let golden_dir = fixtures().join("golden").join(section);
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(golden_dir.join("cases.json")).unwrap())
                .unwrap();
        cases.into_iter().map(move |c| (golden_dir.clone(), c))
    });
    for (golden_dir, case) in cases {
        let case = &case;
        let name = case["name"].as_str().unwrap();
        let which = case["pipeline"].as_str().unwrap().to_string();
        let pipe = pipes.entry(which.clone()).or_insert_with(|| {
            let dir = fixtures().join("pipelines").join(&which);
            Pipeline::load_folder(&dir, &LoadOptions::default()).unwrap()
        });
        let golden = candle_core::safetensors::load(
            golden_dir.join(format!("{name}.safetensors")),
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
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The mask matters: with `use_attention_mask` switched off in a copy of `sd_t5_spm`, the
/// latents move far from diffusers' (whose pipeline passed the mask), so the parity above
/// really checks that we pass it.
#[test]
fn the_attention_mask_is_passed_only_when_the_config_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    ltd_test_support::copy_dir(&fixtures().join("pipelines/sd_t5_spm"), &dir);
    let cfg_path = dir.join("text_encoder/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains("\"use_attention_mask\": true"));
    std::fs::write(
        &cfg_path,
        cfg.replace("\"use_attention_mask\": true", "\"use_attention_mask\": false"),
    )
    .unwrap();
    let pipe = Pipeline::load_folder(&dir, &LoadOptions::default()).unwrap();
    let golden_dir = fixtures().join("golden/t5_pipeline");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("cases.json")).unwrap())
            .unwrap();
    let case = cases.iter().find(|c| c["name"] == "sd_t5_spm-default").unwrap();
    let golden = candle_core::safetensors::load(
        golden_dir.join("sd_t5_spm-default.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let got = pipe.generate(&request(case), &mut |_| {}).unwrap().latents;
    let err = (&got - &golden["latents"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err > 1e-2, "unmasked latents are within {err} of the masked golden");
}
