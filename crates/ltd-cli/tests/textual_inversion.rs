//! Textual inversion through the binary: each case of `tests/fixtures/golden/
//! textual_inversion/cases.json` (AUTOMATIC1111, diffusers and SDXL embedding files, one and
//! two vectors) run by `ltd-gen --embedding FILE` must match the image diffusers made after
//! `load_textual_inversion` at ≥ 50 dB, and record `TI hashes`; embedding files that do not fit
//! get one clear line and no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ltd_test_support::{fixtures, psnr_u8};
use serde_json::Value;

fn golden() -> PathBuf {
    fixtures().join("golden/textual_inversion")
}

fn rgb(path: &Path) -> Vec<u8> {
    ltd_test_support::read_png_rgb(path).2
}

fn ltd_gen(prompt: &str, model: &str, extra: &[String], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
        .arg(prompt)
        .args(["--model", fixtures().join("pipelines").join(model).to_str().unwrap()])
        .args(["--seed", "42", "--steps", "6", "--guidance", "7.5", "--quiet"])
        .args(extra)
        .arg("--output")
        .arg(out)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

#[test]
fn ltd_gen_matches_diffusers_textual_inversion() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("cases.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mut extra = Vec::new();
        for f in case["embeddings"].as_array().unwrap() {
            extra.push("--embedding".to_string());
            extra.push(golden().join(f.as_str().unwrap()).display().to_string());
        }
        let out = tmp.path().join(format!("{name}.png"));
        let prompt = case["prompt"].as_str().unwrap();
        let run = ltd_gen(prompt, case["pipeline"].as_str().unwrap(), &extra, &out);
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let db = psnr_u8(&rgb(&golden().join(case["image"].as_str().unwrap())), &rgb(&out));
        eprintln!("{name}: {db:.1} dB");
        assert!(db >= 50.0, "{name}: {db:.1} dB");
        let bytes = std::fs::read(&out).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("TI hashes: \""), "{name}: no TI hashes");
        for hash in case["hashes"].as_object().unwrap().values() {
            assert!(text.contains(hash.as_str().unwrap()), "{name}: no {hash} in the parameters");
        }
    }
}

fn fails(prompt: &str, model: &str, file: &Path, expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let extra = ["--embedding".to_string(), file.display().to_string()];
    let run = ltd_gen(prompt, model, &extra, &out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{file:?} on {model} succeeded");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in {stderr}");
    }
    assert!(!out.exists() && std::fs::read_dir(tmp.path()).unwrap().next().is_none());
}

#[test]
fn embeddings_that_do_not_fit_are_one_clear_line() {
    let g = golden();
    // Vectors of another width than the text encoder's, SDXL's pair on SD 1.x and the reverse.
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide.safetensors");
    let header = br#"{"emb_params":{"dtype":"F32","shape":[1,7],"data_offsets":[0,28]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 28]);
    std::fs::write(&wide, bytes).unwrap();
    fails("wide", "sd1", &wide, &["--embedding", "wide.safetensors", "width 7", "takes 32"]);
    fails("x", "sd1", &g.join("ltd-xl-ink.safetensors"), &["an SDXL embedding"]);
    fails("x", "sdxl", &g.join("ltd-ink.safetensors"), &["on an SDXL model"]);
    let pickle = dir.path().join("ink.pt");
    std::fs::write(&pickle, b"PK\x03\x04").unwrap();
    fails("x", "sd1", &pickle, &["ink.pt", "refusing to load a pickle"]);
    fails("x", "sd1", &dir.path().join("none.safetensors"), &["--embedding", "none.safetensors"]);
}
