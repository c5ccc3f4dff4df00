//! T5 as the text encoder of a latent pipeline, through the binary: every case of
//! `tests/fixtures/golden/t5_pipeline/cases.json` (the tiny `StableDiffusionPipeline` folders
//! `pipelines/sd_t5`, with a `text_proj` U-Net and a `tokenizer.json`, and `pipelines/sd_t5_spm`,
//! with `spiece.model` only and `use_attention_mask`) becomes an `ltd-gen` command line whose
//! PNG must match the one diffusers wrote at ≥ 50 dB PSNR (as `parity.rs` does for the CLIP
//! pipelines); and the bad inputs peculiar to T5 folders get one clear line and no file.

use std::path::Path;
use std::process::Command;

use ltd_test_support::{batch_outputs, copy_dir, fixtures, png_parity};
use serde_json::Value;

/// The command line a user would type for a case (the fields these cases use).
fn command_line(case: &Value, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![case["prompt"].as_str().unwrap().into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    let model = fixtures().join("pipelines").join(case["pipeline"].as_str().unwrap());
    push("--model", model.display().to_string());
    push("--seed", case["seed"].to_string());
    push("--steps", case["steps"].to_string());
    push("--guidance", case["guidance"].to_string());
    if let Some(n) = case["negative"].as_str() {
        push("--negative", n.into());
    }
    if let Some(s) = case["scheduler"].as_str() {
        push("--scheduler", s.into());
    }
    push("--num-images", case["num_images"].to_string());
    push("--output", out.display().to_string());
    args.push("--quiet".into());
    args
}

#[test]
fn ltd_gen_matches_diffusers_on_t5_pipelines() {
    let dir_golden = fixtures().join("golden/t5_pipeline");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir_golden.join("cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 6);
    for case in &cases {
        // The fields this test does not pass on must be at their defaults.
        for key in ["dynamic_threshold", "width", "height", "clip_skip", "init_image"] {
            assert!(case[key].is_null(), "{}: {key} is set", case["name"]);
        }
        assert_eq!(case["guidance_rescale"].as_f64(), Some(0.0));
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
            match png_parity(&dir_golden.join(want.as_str().unwrap()), &got, 50.0) {
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
/// `code`, no file written) .
fn fails(args: &[&str], expect: &str, code: i32) {
    ltd_test_support::assert_refused(
        env!("CARGO_BIN_EXE_ltd-gen"),
        &[args, &["--steps", "2"]].concat(),
        expect,
        code,
    );
}

#[test]
fn bad_t5_folders_and_flags_get_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["sd_t5", "sd_t5_spm"] {
        let m = tmp.path().join(name);
        copy_dir(&fixtures().join("pipelines").join(name), &m);
        let model = m.to_str().unwrap();
        // No tokenizer.json and no spiece.model: the folder is named.
        for f in ["tokenizer.json", "spiece.model"] {
            let _ = std::fs::remove_file(m.join("tokenizer").join(f));
        }
        let tokenizer = m.join("tokenizer");
        fails(
            &["a cat", "--model", model],
            &format!(
                "{}: no T5 tokenizer: tokenizer.json and spiece.model are both missing",
                tokenizer.display()
            ),
            1,
        );
    }

    let m = tmp.path().join("sd_t5_spm");
    copy_dir(&fixtures().join("pipelines/sd_t5_spm/tokenizer"), &m.join("tokenizer"));
    let model = m.to_str().unwrap();
    fails(
        &["a cat", "--model", model, "--clip-skip", "2"],
        "--clip-skip: this model's text encoder is a T5",
        2,
    );
    fails(
        &["a cat", "--model", model, "--long-prompt", "chunk"],
        "--long-prompt: chunked long prompts are CLIP's",
        2,
    );

    // An "unlimited" model_max_length: diffusers cannot pad to it either.
    let cfg_path = m.join("tokenizer/tokenizer_config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace(
            "\"model_max_length\": 32",
            "\"model_max_length\": 1000000000000000019884624838656",
        ),
    )
    .unwrap();
    fails(&["a cat", "--model", model], "sets no model_max_length", 1);
    std::fs::write(&cfg_path, &cfg).unwrap();

    // A CLIP tokenizer declared for a T5 text encoder.
    let index_path = m.join("model_index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(&index_path, index.replace("T5TokenizerFast", "CLIPTokenizer")).unwrap();
    fails(
        &["a cat", "--model", model],
        "field `tokenizer`: a T5EncoderModel text encoder needs a T5",
        1,
    );
    std::fs::write(&index_path, &index).unwrap();
}
