//! Every bad input gets one clear line on stderr naming what is wrong, a non-zero exit, no
//! panic, and no output file (nor a leftover temporary one).

use std::path::{Path, PathBuf};
use std::process::Command;

use ltd_test_support::{copy_dir, fixtures};

fn sd1() -> String {
    fixtures().join("pipelines/sd1").display().to_string()
}

/// A copy of the tiny SD 1.x pipeline to break.
fn broken_copy(dir: &Path) -> PathBuf {
    let dst = dir.join("model");
    copy_dir(&fixtures().join("pipelines/sd1"), &dst);
    dst
}

/// Runs ltd-gen writing to a fresh folder; checks the failure contract.
fn fails(args: &[&str], expect: &str, code: i32) {
    ltd_test_support::assert_refused(env!("CARGO_BIN_EXE_ltd-gen"), args, expect, code);
}

#[test]
fn bad_request_values_name_the_flag() {
    let m = sd1();
    let base = ["a cat", "--model", m.as_str(), "--steps", "2"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails(&["a cat", "--model", &m, "--steps", "0"], "--steps: must be at least 1", 2);
    fails(
        &["a cat", "--model", &m, "--steps", "5000"],
        "--steps: num_inference_steps 5000 is more than this scheduler can take (1000)",
        2,
    );
    fails(&with(&["--guidance", "NaN"]), "--guidance: must be a finite number, got NaN", 2);
    fails(&with(&["--guidance", "-1"]), "--guidance: must be at least 0", 2);
    fails(
        &with(&["--scheduler", "euler-b"]),
        "--scheduler: unknown sampler \"euler-b\" (known samplers: ddpm, ddim",
        2,
    );
    fails(
        &with(&["--width", "60"]),
        "--width: 60 is not a multiple of the model's VAE scale factor 8",
        2,
    );
    fails(&with(&["--height", "0"]), "--height: must be positive", 2);
    // η is DDIM's alone: elsewhere it would be ignored yet recorded in the PNG.
    fails(
        &with(&["--scheduler", "euler-a", "--eta", "0.5"]),
        "--eta: only the ddim sampler uses η; the euler-a sampler would ignore 0.5",
        2,
    );
    // The model's own sampler (the fixture ships PNDM) is checked once the model is loaded.
    fails(&with(&["--eta", "1"]), "--eta: only the ddim sampler uses η; the pndm sampler", 2);
    fails(&with(&["--guidance-rescale", "2"]), "--guidance-rescale: must be in [0, 1]", 2);
    fails(&with(&["--dynamic-threshold", "x"]), "--dynamic-threshold: expected a number", 2);
    fails(&with(&["--num-images", "0"]), "--num-images: must be at least 1", 2);
    fails(&with(&["--device", "gpu"]), "unknown device `gpu`", 2);
    fails(&with(&["--dtype", "f8"]), "unknown dtype `f8`", 2);
}

/// `--attention` values, and FlashAttention asked for where it cannot run, fail before loading.
#[test]
fn bad_attention_choices_name_the_flag() {
    let m = sd1();
    let base = ["a cat", "--model", m.as_str(), "--steps", "2"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails(
        &with(&["--attention", "fast"]),
        "--attention: unknown attention implementation `fast`: expected auto, flash, chunked or naive",
        2,
    );
    let why = if cfg!(feature = "flash-attn") {
        "FlashAttention runs on CUDA only"
    } else {
        "FlashAttention needs a build with the `flash-attn` feature"
    };
    fails(
        &with(&["--attention", "flash", "--device", "cpu"]),
        &format!("--attention flash: {why}"),
        2,
    );
}

#[test]
fn bad_init_images_and_strengths() {
    let dir = tempfile::tempdir().unwrap();
    let m = sd1();
    let init = fixtures().join("golden/e2e/init.png");
    let init = init.to_str().unwrap();
    let base = ["a cat", "--model", m.as_str(), "--steps", "4", "--init-image"];
    let args = |img: &str, extra: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain([img.to_string()])
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |a: Vec<String>, expect: &str, code: i32| {
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), expect, code)
    };
    run(args(init, &["--strength", "1.5"]), "--strength: must be in [0, 1], got 1.5", 2);
    run(args(init, &["--strength", "-0.5"]), "--strength: must be in [0, 1]", 2);
    run(
        args(init, &["--strength", "0.1"]),
        "--strength: 0.1 of 4 steps leaves no denoising step",
        2,
    );
    let text = dir.path().join("not-an-image.png");
    std::fs::write(&text, "hello").unwrap();
    run(args(text.to_str().unwrap(), &[]), "not-an-image.png: not a readable image", 2);
    run(args("/no/such/picture.png", &[]), "--init-image /no/such/picture.png: cannot open", 2);
    run(
        args(init, &["--width", "32"]),
        "--init-image: the image is 64x64 but the requested size is 32x64",
        2,
    );
    // A size that is not a multiple of the VAE's scale factor.
    let odd = dir.path().join("odd.png");
    let f = std::fs::File::create(&odd).unwrap();
    let mut enc = png::Encoder::new(f, 60, 60);
    enc.set_color(png::ColorType::Rgb);
    enc.write_header().unwrap().write_image_data(&vec![128; 60 * 60 * 3]).unwrap();
    run(args(odd.to_str().unwrap(), &[]), "--width: 60 is not a multiple", 2);
}

#[test]
fn bad_model_folders_name_the_file() {
    fails(
        &["a cat", "--model", "/no/such/model", "--steps", "2"],
        "/no/such/model: no such model folder",
        1,
    );

    let dir = tempfile::tempdir().unwrap();
    let m = broken_copy(dir.path());
    let ms = m.to_str().unwrap().to_string();
    let args = ["a cat", "--model", ms.as_str(), "--steps", "2"];

    // Not a model folder.
    std::fs::rename(m.join("model_index.json"), m.join("x.json")).unwrap();
    fails(&args, "not a diffusers model folder (no model_index.json)", 1);
    // Malformed model_index.json.
    std::fs::write(m.join("model_index.json"), "{ not json").unwrap();
    fails(&args, "model_index.json: key must be a string", 1);
    // Unsupported pipeline class.
    let index = std::fs::read_to_string(m.join("x.json")).unwrap();
    std::fs::write(
        m.join("model_index.json"),
        index.replace("StableDiffusionPipeline", "KandinskyV22Pipeline"),
    )
    .unwrap();
    fails(&args, "unsupported pipeline class \"KandinskyV22Pipeline\"", 1);
    std::fs::write(m.join("model_index.json"), &index).unwrap();

    // A missing weights file.
    let weights = m.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::rename(&weights, m.join("unet/moved")).unwrap();
    fails(&args, "unet: no weights found (looked for diffusion_pytorch_model.safetensors)", 1);
    // Only a pickle.
    std::fs::write(m.join("unet/diffusion_pytorch_model.bin"), b"PK").unwrap();
    fails(&args, "refusing to load a pickle checkpoint", 1);
    std::fs::remove_file(m.join("unet/diffusion_pytorch_model.bin")).unwrap();
    // A truncated file.
    let bytes = std::fs::read(m.join("unet/moved")).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    fails(&args, "diffusion_pytorch_model.safetensors: not a valid safetensors file", 1);
    std::fs::write(&weights, &bytes).unwrap();

    // Wrong tensor shapes: the config no longer matches the weights.
    let cfg_path = m.join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 40"),
    )
    .unwrap();
    fails(&args, "mis-shaped", 1);
    // A config value we do not support.
    std::fs::write(&cfg_path, cfg.replace("\"CrossAttnDownBlock2D\"", "\"AttnDownBlock2D\""))
        .unwrap();
    fails(&args, "unet/config.json: field `down_block_types[0]`", 1);
    std::fs::write(&cfg_path, &cfg).unwrap();

    // An unknown scheduler class.
    let sched = m.join("scheduler/scheduler_config.json");
    let s = std::fs::read_to_string(&sched).unwrap();
    std::fs::write(&sched, s.replace("PNDMScheduler", "FlowMatchEulerDiscreteScheduler")).unwrap();
    fails(&args, "scheduler_config.json", 1);
}

#[test]
fn bad_outputs_are_refused_before_work() {
    let m = sd1();
    let run = |out: &str, expect: &str| {
        let r = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
            .args(["a cat", "--model", &m, "--steps", "2", "--output", out])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        assert!(err.contains(expect), "{err}");
    };
    run("/no/such/dir/out.png", "folder /no/such/dir does not exist");
    run("out.jpg", "use a name ending in .png");
}

#[test]
fn hub_errors_are_clear_and_fast() {
    let home = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let run = |envs: &[(&str, &str)], expect: &str| {
        let out_dir = tempfile::tempdir().unwrap();
        let r = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
            .args(["a cat", "--model", "owner/some-model", "--steps", "2"])
            .args(["--output", out_dir.path().join("o.png").to_str().unwrap()])
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_OFFLINE")
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "expected {expect:?} in {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    };
    run(&[("HF_HUB_OFFLINE", "1")], "owner/some-model: `model_index.json` is not in the hub cache");
    run(&[("HF_ENDPOINT", "http://127.0.0.1:1")], "cannot reach the hub at http://127.0.0.1:1");
    assert!(start.elapsed().as_secs() < 30, "hub errors must not hang");
}
