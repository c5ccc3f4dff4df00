//! Single-file checkpoints through the binary: every case of
//! `tests/fixtures/golden/single_file/cases.json` is a tiny pipeline converted to the original
//! LDM layout by `generate.py` and loaded by diffusers' `from_single_file(file, config=…)`.
//! The files are not committed: each is rebuilt here, byte for byte, from the pipeline folder
//! and the case's key list (key, dtype, shape, conversion, sources), and must have the SHA-256
//! diffusers loaded; then `ltd-gen --model file --config folder` must match diffusers' PNG at
//! ≥ 50 dB and record A1111's `Model hash` and `Model` in its parameters. Bad checkpoint files
//! each get one clear line and no output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ltd_test_support::{fixtures, psnr_u8, read_png_rgb};
use safetensors::SafeTensors;
use serde_json::Value;
use sha2::Digest;

fn golden() -> PathBuf {
    fixtures().join("golden/single_file")
}

/// The component files of a tiny pipeline, read whole.
fn components(pipeline: &str) -> BTreeMap<String, Vec<u8>> {
    let root = fixtures().join("pipelines").join(pipeline);
    ["unet", "vae", "text_encoder", "text_encoder_2"]
        .iter()
        .filter(|c| root.join(c).is_dir())
        .map(|c| {
            let stem =
                if c.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
            (
                c.to_string(),
                std::fs::read(root.join(c).join(format!("{stem}.safetensors"))).unwrap(),
            )
        })
        .collect()
}

fn elem_size(dtype: &str) -> usize {
    match dtype {
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        "I64" | "F64" => 8,
        other => panic!("dtype {other}"),
    }
}

/// Converts raw little-endian tensor bytes between the float dtypes the fixtures use
/// (f32 → f16 rounds to nearest even, as torch's `.half()`).
fn cast(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    match (from, to) {
        (a, b) if a == b => bytes.to_vec(),
        ("F32", "F16") => bytes
            .chunks(4)
            .flat_map(|c| {
                half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
            })
            .collect(),
        (a, b) => panic!("cast {a} -> {b}"),
    }
}

/// Rebuilds a case's single file as `save_tensors` in generate.py writes it.
fn build(case: &Value, dest: &Path) {
    let name = case["name"].as_str().unwrap();
    let parts = components(case["pipeline"].as_str().unwrap());
    let parsed: BTreeMap<&str, SafeTensors<'_>> =
        parts.iter().map(|(k, v)| (k.as_str(), SafeTensors::deserialize(v).unwrap())).collect();
    let keys = std::fs::read_to_string(golden().join(format!("{name}.keys.txt"))).unwrap();
    let mut header = String::from("{");
    let mut data: Vec<u8> = Vec::new();
    for (i, line) in keys.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let (key, dtype, shape, op) = (f[0], f[1], f[2], f[3]);
        let dims: Vec<usize> = if shape.is_empty() {
            vec![]
        } else {
            shape.split(',').map(|d| d.parse().unwrap()).collect()
        };
        let sources: Vec<(String, Vec<usize>, Vec<u8>)> = f[4]
            .split_whitespace()
            .map(|s| {
                let (comp, tensor) = s.split_once('/').unwrap();
                let view = parsed[comp].tensor(tensor).unwrap();
                let from = format!("{:?}", view.dtype());
                (from.clone(), view.shape().to_vec(), cast(view.data(), &from, dtype))
            })
            .collect();
        let bytes: Vec<u8> = match op {
            "copy" | "conv" => sources[0].2.clone(),
            "cat" => sources.iter().flat_map(|s| s.2.clone()).collect(),
            "transpose" => {
                let (r, c) = (sources[0].1[0], sources[0].1[1]);
                let e = elem_size(dtype);
                let src = &sources[0].2;
                let mut out = vec![0u8; src.len()];
                for i in 0..r {
                    for j in 0..c {
                        out[(j * r + i) * e..(j * r + i + 1) * e]
                            .copy_from_slice(&src[(i * c + j) * e..(i * c + j + 1) * e]);
                    }
                }
                out
            }
            "zeros" => vec![0u8; dims.iter().product::<usize>() * elem_size(dtype)],
            other => panic!("{key}: op {other}"),
        };
        assert_eq!(bytes.len(), dims.iter().product::<usize>() * elem_size(dtype), "{key}");
        let shape_json = format!("[{shape}]");
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""{key}":{{"dtype":"{dtype}","shape":{shape_json},"data_offsets":[{},{}]}}"#,
            data.len(),
            data.len() + bytes.len()
        ));
        data.extend_from_slice(&bytes);
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(dest, file).unwrap();
}

fn sha256(path: &Path) -> String {
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn cases() -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(golden().join("cases.json")).unwrap()).unwrap()
}

/// Builds a case's file into `dir` and checks it is the one diffusers loaded.
fn checkpoint(case: &Value, dir: &Path) -> PathBuf {
    let name = case["name"].as_str().unwrap();
    let file = dir.join(format!("{name}.safetensors"));
    build(case, &file);
    assert_eq!(sha256(&file), case["sha256"].as_str().unwrap(), "{name}: rebuilt file differs");
    file
}

fn ltd_gen(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(args).output().unwrap()
}

#[test]
fn ltd_gen_matches_diffusers_from_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut worst = f64::INFINITY;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let file = checkpoint(&case, dir.path());
        let out = dir.path().join(format!("{name}.png"));
        let config = fixtures().join("pipelines").join(case["pipeline"].as_str().unwrap());
        let args: Vec<String> = vec![
            case["prompt"].as_str().unwrap().into(),
            "--model".into(),
            file.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--seed".into(),
            case["seed"].to_string(),
            "--steps".into(),
            case["steps"].to_string(),
            "--guidance".into(),
            case["guidance"].to_string(),
            "--output".into(),
            out.display().to_string(),
            "--quiet".into(),
        ];
        let run = ltd_gen(&args);
        if !run.status.success() {
            failures.push(format!("{name}: {args:?}: {}", String::from_utf8_lossy(&run.stderr)));
            continue;
        }
        let (w1, h1, a, _) = read_png_rgb(&golden().join(case["image"].as_str().unwrap()));
        let (w2, h2, b, params) = read_png_rgb(&out);
        assert_eq!((w1, h1), (w2, h2), "{name}");
        let db = psnr_u8(&a, &b);
        worst = worst.min(db);
        if db < 50.0 {
            failures.push(format!("{name}: {db:.1} dB"));
        }
        let hash = &case["sha256"].as_str().unwrap()[..10];
        let tail = format!("Model hash: {hash}, Model: {name}");
        assert!(params.contains(&tail), "{name}: parameters lack `{tail}`: {params}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("worst PSNR {worst:.1} dB");
}

/// `--vae` with the checkpoint's own VAE (as a diffusers folder, and as a single LDM file
/// without the checkpoint's prefix) changes nothing.
#[test]
fn vae_replacement_from_folder_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let case = cases().into_iter().find(|c| c["name"] == "sd1").unwrap();
    let file = checkpoint(&case, dir.path());
    // A VAE-only file in the LDM layout: the checkpoint's `first_stage_model.` tensors.
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let vae_file = dir.path().join("vae-ft.safetensors");
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("first_stage_model.").map(|s| (s.to_string(), v)))
        .collect();
    safetensors::serialize_to_file(tensors, None, &vae_file).unwrap();
    let config = fixtures().join("pipelines/sd1");
    let golden_png = golden().join("sd1.png");
    for vae in [config.join("vae"), vae_file] {
        let out = dir.path().join("vae.png");
        let args: Vec<String> = [
            case["prompt"].as_str().unwrap(),
            "--model",
            file.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--vae",
            vae.to_str().unwrap(),
            "--seed",
            "42",
            "--steps",
            "6",
            "--output",
            out.to_str().unwrap(),
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let run = ltd_gen(&args);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let (_, _, a, _) = read_png_rgb(&golden_png);
        let (_, _, b, _) = read_png_rgb(&out);
        assert!(psnr_u8(&a, &b) >= 50.0, "--vae {}: {:.1} dB", vae.display(), psnr_u8(&a, &b));
    }
}

/// Runs ltd-gen expecting one error line containing `expect`, and no output file.
fn fails(args: &[&str], expect: &str) {
    let (_, line) = ltd_test_support::refusal(env!("CARGO_BIN_EXE_ltd-gen"), args);
    assert!(line.contains(expect), "{args:?}: expected {expect:?} in: {line}");
}

#[test]
fn bad_checkpoint_files_get_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let case = cases().into_iter().find(|c| c["name"] == "sd1").unwrap();
    let file = checkpoint(&case, dir.path());
    let config = fixtures().join("pipelines/sd1");
    let cfg = config.to_str().unwrap();
    let run = |path: &Path, expect: &str| {
        fails(
            &["a cat", "--model", path.to_str().unwrap(), "--config", cfg, "--steps", "1"],
            expect,
        )
    };

    // Truncated: the header promises more bytes than the file has.
    let bytes = std::fs::read(&file).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    run(&truncated, "truncated.safetensors: not a valid safetensors file");

    // Pickles, by extension and by content (a zip under a .safetensors name).
    for name in ["model.ckpt", "model.pt"] {
        let pickle = dir.path().join(name);
        std::fs::write(&pickle, b"PK\x03\x04 a torch zip").unwrap();
        run(&pickle, "refusing to load a pickle checkpoint");
    }
    let disguised = dir.path().join("disguised.safetensors");
    std::fs::write(&disguised, b"PK\x03\x04 a torch zip").unwrap();
    run(&disguised, "refusing to load a pickle checkpoint");

    // A valid safetensors file that is no checkpoint (here: the VAE folder's weights).
    let vae = dir.path().join("lora.safetensors");
    std::fs::copy(config.join("vae/diffusion_pytorch_model.safetensors"), &vae).unwrap();
    run(&vae, "lora.safetensors: not a Stable Diffusion checkpoint");

    // A checkpoint that does not fit the built-in configs of its family (here a tiny SD 1.x
    // one without --config): the error says which configs and what to pass.
    fails(
        &["a cat", "--model", file.to_str().unwrap(), "--steps", "1"],
        "do not fit the official SD 1.x configs; for a model of another shape pass --config",
    );

    // A bad --prediction-type and a missing --vae.
    let m = file.to_str().unwrap();
    fails(&["a cat", "--model", m, "--config", cfg, "--prediction-type", "x"], "--prediction-type");
    fails(&["a cat", "--model", m, "--config", cfg, "--vae", "/nonexistent/vae"], "--vae");
}

/// A civitai-style run: a single-file checkpoint with a LoRA (a PEFT and a kohya file at
/// once) and with textual-inversion embeddings gives the images diffusers made with the same
/// LoRAs and embeddings on the diffusers folder the checkpoint was converted from
/// (`golden/lora`, `golden/textual_inversion`): the LoRA keys resolve against the checkpoint's
/// mapped names, the embeddings join its tokenizer.
#[test]
fn loras_and_embeddings_apply_to_single_file_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let case = cases().into_iter().find(|c| c["name"] == "sd1").unwrap();
    let file = checkpoint(&case, dir.path());
    let config = fixtures().join("pipelines/sd1");
    let lora = fixtures().join("golden/lora");
    let ti = fixtures().join("golden/textual_inversion");
    let runs: [(&str, PathBuf, Vec<String>); 2] = [
        (
            "a red circle on a blue background",
            lora.join("sd1-two.png"),
            vec![
                "--lora".into(),
                format!("{}:0.5", lora.join("sd1_lora.safetensors").display()),
                "--lora".into(),
                format!("{}:0.5", lora.join("sd1_lora_kohya.safetensors").display()),
            ],
        ),
        (
            "ltd-ink, a <cat-toy>, ltd-ink",
            ti.join("sd1-ti-both.png"),
            vec![
                "--embedding".into(),
                ti.join("ltd-ink.safetensors").display().to_string(),
                "--embedding".into(),
                ti.join("cat-toy.safetensors").display().to_string(),
            ],
        ),
    ];
    for (k, (prompt, golden_png, extra)) in runs.into_iter().enumerate() {
        let out = dir.path().join(format!("run{k}.png"));
        let mut args: Vec<String> = vec![
            prompt.into(),
            "--model".into(),
            file.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--seed".into(),
            "42".into(),
            "--steps".into(),
            "6".into(),
            "--guidance".into(),
            "7.5".into(),
            "--output".into(),
            out.display().to_string(),
            "--quiet".into(),
        ];
        args.extend(extra);
        let run = ltd_gen(&args);
        assert!(run.status.success(), "{args:?}: {}", String::from_utf8_lossy(&run.stderr));
        let (_, _, a, _) = read_png_rgb(&golden_png);
        let (_, _, b, _) = read_png_rgb(&out);
        let db = psnr_u8(&a, &b);
        assert!(db >= 50.0, "{}: {db:.1} dB against diffusers", golden_png.display());
    }
}
