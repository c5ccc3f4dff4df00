//! DeepFloyd IF through the binary: every case of `tests/fixtures/golden/if_pipeline/cases.json`
//! (the tiny `IFPipeline` folders `pipelines/if-1`, `if-1-nothreshold` and the
//! `IFSuperResolutionPipeline` `pipelines/if-2`: stage I guided with thresholding on and off,
//! at guidance 1, with a negative prompt and DPM++ 2M, a batch; stage II alone from a PNG; the
//! cascade) becomes an `ltd-gen` command line whose PNG must match the one diffusers wrote at
//! ≥ 50 dB PSNR, the bar every pipeline parity test of ltd uses (float32 on both sides; a
//! wrong tokenization, guidance split or noise draw costs tens of dB: the fixture's
//! `sensitivity.json` has guidance 1 against 7 and two prompts at ~10 dB). The bad inputs
//! peculiar to IF get one clear line, a non-zero exit and no file.

use std::path::{Path, PathBuf};
use std::process::Command;

use ltd_test_support::{batch_outputs, copy_dir, fixtures, png_parity, read_png_rgb};
use serde_json::Value;

/// The parity bar (dB), as in `parity.rs` and `t5.rs`.
const MIN_PSNR_DB: f64 = 50.0;

fn golden() -> PathBuf {
    fixtures().join("golden/if_pipeline")
}

fn pipeline(name: &str) -> String {
    fixtures().join("pipelines").join(name).display().to_string()
}

/// The command line a user would type for a case.
fn command_line(case: &Value, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![case["prompt"].as_str().unwrap().into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    push("--model", pipeline(case["model"].as_str().unwrap()));
    push("--seed", case["seed"].to_string());
    push("--steps", case["steps"].to_string());
    push("--guidance", case["guidance"].to_string());
    push("--num-images", case["num_images"].to_string());
    if let Some(n) = case["negative"].as_str() {
        push("--negative", n.into());
    }
    if let Some(s) = case["scheduler"].as_str() {
        push("--scheduler", s.into());
    }
    if let Some(m) = case["upscale_model"].as_str() {
        push("--upscale-model", pipeline(m));
    }
    if let Some(image) = case["init_image"].as_str() {
        push("--init-image", golden().join(image).display().to_string());
    }
    for (key, flag) in [
        ("noise_level", "--noise-level"),
        ("upscale_steps", "--upscale-steps"),
        ("upscale_guidance", "--upscale-guidance"),
    ] {
        if !case[key].is_null() {
            push(flag, case[key].to_string());
        }
    }
    push("--output", out.display().to_string());
    args.push("--quiet".into());
    args
}

#[test]
fn ltd_gen_matches_diffusers_on_deepfloyd_if() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("cases.json")).unwrap())
            .unwrap();
    let modes: Vec<&str> = cases.iter().map(|c| c["mode"].as_str().unwrap()).collect();
    for mode in ["stage1", "stage2", "cascade"] {
        assert!(modes.contains(&mode), "no {mode} case");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut worst = f64::INFINITY;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let args = command_line(case, &out);
        let run = Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(&args).output().unwrap();
        if !run.status.success() {
            failures.push(format!(
                "{name}: ltd-gen {args:?} failed: {}",
                String::from_utf8_lossy(&run.stderr)
            ));
            continue;
        }
        let images = case["images"].as_array().unwrap();
        for (want, got) in images.iter().zip(batch_outputs(&out, images.len())) {
            if case["mode"] == "cascade" {
                let params = read_png_rgb(&got).3;
                if !params.contains("Upscale model: ") {
                    failures
                        .push(format!("{name}: the parameters name no upscale model: {params}"));
                }
            }
            match png_parity(&golden().join(want.as_str().unwrap()), &got, MIN_PSNR_DB) {
                Ok(db) => {
                    eprintln!("{name}: {db:.1} dB");
                    worst = worst.min(db);
                }
                Err(why) => failures.push(format!("{name}: {why}")),
            }
        }
    }
    eprintln!("worst PSNR over {} cases: {worst:.1} dB", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs ltd-gen; checks the failure contract (one `error:` line containing `expect`, exit
/// `code`, no file written).
fn fails(args: &[&str], expect: &str, code: i32) {
    ltd_test_support::assert_refused(
        env!("CARGO_BIN_EXE_ltd-gen"),
        &[args, &["--steps", "2"]].concat(),
        expect,
        code,
    );
}

/// A writable copy of a fixture IF folder, its symbolic links resolved.
fn copy_if(name: &str, to: &Path) {
    let from = fixtures().join("pipelines").join(name);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        let dst = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dst);
        } else {
            std::fs::copy(&path, &dst).unwrap();
        }
    }
}

#[test]
fn bad_deepfloyd_inputs_get_one_clear_line() {
    let (one, two) = (pipeline("if-1"), pipeline("if-2"));
    let low = golden().join("low_res.png");
    let low = low.to_str().unwrap();
    // Stage II as the model, with nothing to upscale.
    fails(&["a cat", "--model", &two], "--init-image: ", 2);
    fails(&["a cat", "--model", &two], "is a DeepFloyd IF stage II", 2);
    // Stage I and II swapped in the cascade.
    fails(
        &["a cat", "--model", &two, "--upscale-model", &one],
        "--upscale-model: needs a DeepFloyd IF stage I",
        2,
    );
    fails(&["a cat", "--model", &one, "--upscale-model", &one], "not a DeepFloyd IF stage II", 2);
    // Stage I has no image-to-image.
    fails(&["a cat", "--model", &one, "--init-image", low], "image-to-image and inpainting", 2);
    // Samplers that cannot take IF's learned variance (diffusers fails on them too).
    fails(&["a cat", "--model", &one, "--scheduler", "euler"], "--scheduler: ", 2);
    // Noise levels outside the image_noising_scheduler's range, and where none applies.
    fails(
        &["a cat", "--model", &two, "--init-image", low, "--noise-level", "1000"],
        "--noise-level: must be below the image_noising_scheduler's num_train_timesteps (1000)",
        2,
    );
    fails(&["a cat", "--model", &one, "--noise-level", "100"], "--noise-level: applies to", 2);
    // IF has no VAE.
    fails(&["a cat", "--model", &one, "--vae", &two], "--vae: ", 1);
    // q8_0 quantizes transformer blocks' linear layers; IF's U-Nets have none.
    fails(&["a cat", "--model", &one, "--quantize", "q8_0"], "--quantize: ", 1);

    // A T5 tokenizer folder with neither tokenizer.json nor spiece.model: the folder is named.
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("if-1");
    copy_if("if-1", &m);
    for f in ["tokenizer.json", "spiece.model"] {
        let _ = std::fs::remove_file(m.join("tokenizer").join(f));
    }
    fails(
        &["a cat", "--model", m.to_str().unwrap()],
        &format!(
            "{}: no T5 tokenizer: tokenizer.json and spiece.model are both missing",
            m.join("tokenizer").display()
        ),
        1,
    );

    // The U-Net loads after the prompt is encoded, but a folder without its weights still fails
    // at load, naming the folder, before any work.
    let m = tmp.path().join("if-1-no-unet-weights");
    copy_if("if-1", &m);
    std::fs::remove_file(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    fails(&["a cat", "--model", m.to_str().unwrap()], &m.join("unet").display().to_string(), 1);

    // A stage II saved without its T5 runs only after a stage I.
    let m = tmp.path().join("if-2");
    copy_if("if-2", &m);
    let index_path = m.join("model_index.json");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let mut index = index.as_object().unwrap().clone();
    for k in ["text_encoder", "tokenizer"] {
        index.insert(k.into(), serde_json::json!([null, null]));
        std::fs::remove_dir_all(m.join(k)).unwrap();
    }
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    fails(
        &["a cat", "--model", m.to_str().unwrap(), "--init-image", low],
        "has no text encoder (text_encoder is null in model_index.json)",
        1,
    );
    // ... and with one, it works: the cascade never loads stage II's T5.
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let run = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
        .args(["a cat", "--model", &one, "--upscale-model", m.to_str().unwrap()])
        .args(["--steps", "2", "--output", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (w, h, _, _) = read_png_rgb(&out);
    assert_eq!((w, h), (32, 32), "stage II's sample_size");

    // A stage II whose sample_size has no fixed ratio to stage I's: diffusers resizes
    // the low-resolution image to stage II's size whatever it is, and so does ltd, so this is
    // not an error (only what cannot run is refused: channels, text width, samplers).
    let cfg_path = m.join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("\"sample_size\": 32", "\"sample_size\": 24")).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
        .args(["a cat", "--model", &one, "--upscale-model", m.to_str().unwrap()])
        .args(["--steps", "2", "--output", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(read_png_rgb(&out).0, 24);

    // …but a size its U-Net cannot halve at each downsampler (two here) fails in diffusers at
    // the first skip connection: refused before stage I runs, naming stage II's config.
    std::fs::write(&cfg_path, cfg.replace("\"sample_size\": 32", "\"sample_size\": 26")).unwrap();
    fails(
        &["a cat", "--model", &one, "--upscale-model", m.to_str().unwrap()],
        &format!("{}: sample_size 26 is not a multiple of 4", m.join("unet/config.json").display()),
        1,
    );
    // The same for a size asked for.
    fails(&["a cat", "--model", &one, "--width", "18"], "--width: 18 is not a multiple of 4", 2);
}
