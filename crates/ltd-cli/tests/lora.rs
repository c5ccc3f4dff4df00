//! LoRA through the binary: every case of `tests/fixtures/golden/lora/cases.json` (LoRAs made
//! with peft on the tiny SD 1.x and SDXL pipelines, in diffusers/PEFT, kohya and kohya-sgm
//! layout; U-Net only, text encoders only, both, two at once, and an A1111 prompt tag) becomes
//! an `ltd-gen` command line whose PNG must match the one diffusers' `load_lora_weights` +
//! `fuse_lora(lora_scale=…)` made at ≥ 50 dB (the LoRAs move the images to 19–33 dB of the
//! image without them). LoRA files that do not fit get one clear line and no output file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ltd_test_support::{fixtures, psnr_u8, read_png_rgb};
use serde_json::Value;

fn golden() -> PathBuf {
    fixtures().join("golden/lora")
}

/// The command line of a case: `--lora FILE:SCALE` each, or for `tag` cases the LoRA as an
/// A1111 prompt tag found in `--lora-dir`.
fn command_line(case: &Value, out: &Path) -> Vec<String> {
    let mut prompt = case["prompt"].as_str().unwrap().to_string();
    let mut args = Vec::new();
    let model = fixtures().join("pipelines").join(case["pipeline"].as_str().unwrap());
    for l in case["loras"].as_array().unwrap() {
        let file = l["file"].as_str().unwrap();
        if case["tag"].as_bool().unwrap() {
            let stem = file.trim_end_matches(".safetensors");
            prompt.push_str(&format!(" <lora:{stem}:{}>", l["scale"]));
            args.extend(["--lora-dir".to_string(), golden().display().to_string()]);
        } else {
            args.extend([
                "--lora".to_string(),
                format!("{}:{}", golden().join(file).display(), l["scale"]),
            ]);
        }
    }
    let mut all = vec![prompt, "--model".into(), model.display().to_string()];
    for key in ["seed", "steps", "guidance"] {
        all.extend([format!("--{key}"), case[key].to_string()]);
    }
    all.extend(args);
    all.extend(["--output".into(), out.display().to_string(), "--quiet".into()]);
    all
}

#[test]
fn ltd_gen_matches_diffusers_fused_loras() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 10);
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let args = command_line(case, &out);
        let run = Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(&args).output().unwrap();
        if !run.status.success() {
            failures.push(format!("{name}: {args:?}: {}", String::from_utf8_lossy(&run.stderr)));
            continue;
        }
        let (w1, h1, want, _) = read_png_rgb(&golden().join(case["image"].as_str().unwrap()));
        let (w2, h2, got, params) = read_png_rgb(&out);
        assert_eq!((w1, h1), (w2, h2), "{name}");
        let db = psnr_u8(&want, &got);
        report.push(format!("{name}: {db:.1} dB (base {} dB)", case["base_db"]));
        if db < 50.0 {
            failures.push(format!("{name}: {db:.1} dB"));
        }
        // A1111's infotext: each LoRA as a prompt tag and in `Lora hashes` with the hash
        // A1111 computes (written by the fixture generator).
        for (stem, hash) in case["hashes"].as_object().unwrap() {
            let entry = format!("{stem}: {}", hash.as_str().unwrap());
            if !params.contains(&format!("<lora:{stem}:")) || !params.contains(&entry) {
                failures.push(format!("{name}: the parameters do not record {entry}: {params}"));
            }
        }
        if !params.contains("Lora hashes: \"") {
            failures.push(format!("{name}: no Lora hashes in {params}"));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A safetensors file of f32 tensors (name → shape; values 0.01).
fn write_lora(path: &Path, tensors: &[(&str, &[usize])]) {
    let mut header = BTreeMap::new();
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            data.extend_from_slice(&0.01f32.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::to_vec(&header).unwrap();
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend(head);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// Runs ltd-gen on the tiny SD 1.x model with extra arguments; checks the failure contract.
fn fails(extra: &[&str], expect: &[&str]) {
    let model = fixtures().join("pipelines/sd1");
    let args = [&["a cat", "--model", model.to_str().unwrap(), "--steps", "2"], extra].concat();
    let (_, line) = ltd_test_support::refusal(env!("CARGO_BIN_EXE_ltd-gen"), &args);
    for e in expect {
        assert!(line.contains(e), "{extra:?}: expected {e:?} in: {line}");
    }
}

#[test]
fn loras_that_do_not_fit_are_one_clear_line() {
    let g = golden();
    let sdxl = g.join("sdxl_lora_kohya.safetensors").display().to_string();
    // An SDXL LoRA on SD 1.5: the first key at fault is named.
    fails(
        &["--lora", &sdxl],
        &["--lora ", "sdxl_lora_kohya.safetensors", "key `lora_unet_", "another architecture"],
    );
    let sdxl_te = g.join("sdxl_te_only_kohya.safetensors").display().to_string();
    fails(&["--lora", &sdxl_te], &["key `lora_te1_", "another architecture"]);

    let dir = tempfile::tempdir().unwrap();
    let te2 = dir.path().join("te2.safetensors");
    write_lora(
        &te2,
        &[
            ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[4, 32]),
            ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", &[37, 4]),
        ],
    );
    fails(
        &["--lora", te2.to_str().unwrap()],
        &["key `lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2", "SDXL"],
    );

    let rank = dir.path().join("rank.safetensors");
    write_lora(
        &rank,
        &[
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[4, 32]),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", &[37, 3]),
        ],
    );
    fails(
        &["--lora", rank.to_str().unwrap()],
        &["rank.safetensors", "lora_te_text_model_encoder_layers_0_mlp_fc1", "rank 3", "rank 4"],
    );

    let unknown = dir.path().join("loha.safetensors");
    write_lora(
        &unknown,
        &[
            ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a", &[4, 4]),
            ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b", &[4, 4]),
        ],
    );
    fails(
        &["--lora", unknown.to_str().unwrap()],
        &["2 key(s) in neither", "hada_w1_a", "hada_w1_b"],
    );

    let pickle = dir.path().join("old.pt");
    std::fs::write(&pickle, b"PK\x03\x04").unwrap();
    fails(&["--lora", pickle.to_str().unwrap()], &["old.pt", "refusing to load a pickle"]);
    fails(
        &["--lora", "/nonexistent/x.safetensors:0.5"],
        &["--lora /nonexistent/x.safetensors: no such file"],
    );
    fails(&["a <lora:nothing:0.5>"], &["--lora-dir", "<lora:nothing>"]);
    fails(
        &["a <lora:nothing:0.5>", "--lora-dir", dir.path().to_str().unwrap()],
        &["no nothing.safetensors"],
    );
}
