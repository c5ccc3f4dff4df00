//! The CLI as a user meets it: outputs and their parameters, batches, the JSON summary, and
//! hub models served from the cache.

use std::path::Path;
use std::process::Command;

use ltd_test_support::{copy_dir, fixtures};

fn ltd_gen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(args).output().unwrap()
}

/// The `parameters` text chunk of a PNG.
fn parameters(path: &Path) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    info.uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|t| t.keyword == "parameters")
                .and_then(|t| t.get_text().ok())
        })
        .expect("a parameters chunk")
}

#[test]
fn writes_numbered_pngs_with_a1111_parameters_and_a_json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let model = fixtures().join("pipelines/sd1");
    let run = ltd_gen(&[
        "a cat, in a hat",
        "--model",
        model.to_str().unwrap(),
        "--negative",
        "blurry",
        "--steps",
        "3",
        "--seed",
        "7",
        "--num-images",
        "2",
        "--scheduler",
        "dpm++2m-karras",
        "--json",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!out.exists(), "a batch is numbered");
    let first = dir.path().join("cat-1.png");
    let second = dir.path().join("cat-2.png");
    let p = parameters(&first);
    let model_name = model.display().to_string();
    assert_eq!(
        p,
        format!(
            "a cat, in a hat\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, \
             CFG scale: 7.5, Seed: 7, Size: 64x64, Model: {model_name}, Batch size: 2, Batch pos: 0, \
             RNG: CPU, Version: ltd {}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert!(parameters(&second).contains("Batch pos: 1"));

    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["seed"], 7);
    assert_eq!(summary["scheduler"], "dpm++2m-karras");
    assert_eq!(summary["files"].as_array().unwrap().len(), 2);
    assert_eq!(summary["images"][1]["batch_index"], 1);
    for phase in ["load_s", "encode_s", "denoise_s", "decode_s", "total_s"] {
        assert!(summary["timings"][phase].as_f64().unwrap() >= 0.0, "{phase}");
    }
    // Only the two images are left in the folder: no temporary files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn same_seed_same_image_and_a_random_seed_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("pipelines/sd2");
    let run = |out: &str, seed: Option<&str>| {
        let out = dir.path().join(out);
        let mut args = vec!["a dog", "--model", model.to_str().unwrap(), "--steps", "2", "-q"];
        if let Some(s) = seed {
            args.extend(["--seed", s]);
        }
        let o = out.to_str().unwrap().to_string();
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend(["--output".to_string(), o]);
        let r = Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(&a).output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read(&out).unwrap()
    };
    assert_eq!(run("a.png", Some("3")), run("b.png", Some("3")));
    run("c.png", None);
    let p = parameters(&dir.path().join("c.png"));
    let seed: u64 = p.split("Seed: ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    // Re-running with the recorded seed recreates the image.
    assert_eq!(
        run("d.png", Some(&seed.to_string())),
        std::fs::read(dir.path().join("c.png")).unwrap()
    );
}

/// Lays a model folder out as the hub cache does: `models--owner--name/snapshots/<commit>/…`
/// with `refs/main` naming the commit.
fn fake_hub_cache(home: &Path, repo: &str, src: &Path) {
    let root = home.join("hub").join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    copy_dir(src, &root.join("snapshots").join(commit));
}

#[test]
fn hub_models_load_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    fake_hub_cache(home.path(), "ltd-test/tiny-sd", &fixtures().join("pipelines/sd1"));
    let out = home.path().join("o.png");
    let r = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
        .args(["a cat", "--model", "ltd-test/tiny-sd", "--steps", "2", "--seed", "1", "-q"])
        .args(["--variant", "fp16", "--output", out.to_str().unwrap()])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(parameters(&out).contains("Model: ltd-test/tiny-sd"));
    // The same image as from the local folder: the cache's snapshot is the model.
    let local = home.path().join("l.png");
    let r = ltd_gen(&[
        "a cat",
        "--model",
        fixtures().join("pipelines/sd1").to_str().unwrap(),
        "--steps",
        "2",
        "--seed",
        "1",
        "-q",
        "--output",
        local.to_str().unwrap(),
    ]);
    assert!(r.status.success());
    let pixels = |p: &Path| {
        let d = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let mut reader = d.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        buf
    };
    assert_eq!(pixels(&out), pixels(&local));
}

/// `--json`'s summary of a run on the tiny SD 1.x pipeline with `extra` arguments.
fn summary(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let model = fixtures().join("pipelines/sd1");
    let out = dir.join("s.png");
    let mut args = vec!["a cat", "--model", model.to_str().unwrap(), "--seed", "1", "--json"];
    args.extend(extra);
    args.extend(["--output", out.to_str().unwrap()]);
    let run = ltd_gen(&args);
    assert!(run.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&run.stderr));
    serde_json::from_slice(&run.stdout).unwrap()
}

#[test]
fn steps_are_the_users_steps_whatever_the_sampler_evaluates() {
    // Heun evaluates the model 2·4 − 1 times for 4 steps, PNDM (the model's own) 4 + 1.
    let dir = tempfile::tempdir().unwrap();
    for (extra, evaluations) in [
        (&["--steps", "4", "--scheduler", "heun"][..], 7),
        (&["--steps", "4", "--scheduler", "pndm"][..], 5),
        (&["--steps", "4"][..], 5),
        (&["--steps", "4", "--scheduler", "euler"][..], 4),
    ] {
        let s = summary(dir.path(), extra);
        assert_eq!(s["steps"], 4, "{extra:?}");
        assert_eq!(s["model_evaluations"], evaluations, "{extra:?}");
    }
    // Image-to-image: the steps it runs, ⌊4 · 0.5⌋.
    let init = fixtures().join("golden/e2e/init.png");
    let init = init.to_str().unwrap();
    let img2img =
        ["--steps", "4", "--scheduler", "heun", "--init-image", init, "--strength", "0.5"];
    let s = summary(dir.path(), &img2img);
    assert_eq!((s["steps"].as_u64(), s["model_evaluations"].as_u64()), (Some(2), Some(3)));
}

#[test]
fn eta_is_recorded_with_ddim_the_one_sampler_that_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    summary(dir.path(), &["--steps", "2", "--scheduler", "ddim", "--eta", "0.5"]);
    let p = parameters(&dir.path().join("s.png"));
    assert!(p.contains("Sampler: DDIM, ") && p.contains(", Eta: 0.5, "), "{p}");
}
