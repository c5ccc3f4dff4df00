//! A1111 prompt emphasis through the binary: each case of `tests/fixtures/golden/emphasis/
//! cases.json` is an image diffusers made from `prompt_embeds` weighted as A1111 weights them
//! (A1111's own parser and arithmetic, transcribed in the fixture generator); `ltd-gen` with
//! the prompt as typed must match it at ≥ 50 dB, and with `--emphasis none` must not (the
//! syntax then is literal text).

use std::path::Path;
use std::process::Command;

use ltd_test_support::{fixtures, psnr_u8};
use serde_json::Value;

fn rgb(path: &Path) -> Vec<u8> {
    ltd_test_support::read_png_rgb(path).2
}

fn run(case: &Value, out: &Path, extra: &[&str]) {
    let model = fixtures().join("pipelines").join(case["pipeline"].as_str().unwrap());
    let status = Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
        .arg(case["prompt"].as_str().unwrap())
        .args(["--model", model.to_str().unwrap()])
        .args(["--seed", &case["seed"].to_string(), "--steps", &case["steps"].to_string()])
        .args(["--guidance", &case["guidance"].to_string(), "--quiet"])
        .args(extra)
        .arg("--output")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn ltd_gen_weights_prompts_as_a1111() {
    let dir = fixtures().join("golden/emphasis");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let want = rgb(&dir.join(case["image"].as_str().unwrap()));
        let out = tmp.path().join(format!("{name}.png"));
        run(case, &out, &[]);
        let db = psnr_u8(&want, &rgb(&out));
        eprintln!("{name}: {db:.1} dB");
        assert!(db >= 50.0, "{name}: {db:.1} dB");
        run(case, &out, &["--emphasis", "none"]);
        let literal = psnr_u8(&want, &rgb(&out));
        assert!(literal < 40.0, "{name}: literal prompt still {literal:.1} dB");
    }
}
