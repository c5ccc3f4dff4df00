//! End-to-end parity with diffusers through the binary, as a user runs it: every case of
//! `tests/fixtures/golden/e2e/cases.json` (the tiny pipelines, and the embedded default model run
//! with no `--model`) becomes an `ltd-gen` command line, and each PNG it
//! writes must match the PNG diffusers wrote at ≥ 50 dB PSNR (two correct float32
//! implementations land far above that — identical bytes here, or ~80 dB — while a prompt
//! differing by one period can still score 42 dB).

use std::path::Path;
use std::process::Command;

use ltd_test_support::{batch_outputs, fixtures, png_parity};
use serde_json::Value;

/// The command line a user would type for a case.
fn command_line(case: &Value, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![case["prompt"].as_str().unwrap().into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    // `default` is the model ltd-gen embeds: a user runs it with no --model at all.
    match case["pipeline"].as_str().unwrap() {
        "default" => {}
        tiny => push("--model", fixtures().join("pipelines").join(tiny).display().to_string()),
    }
    push("--seed", case["seed"].to_string());
    push("--steps", case["steps"].to_string());
    push("--guidance", case["guidance"].to_string());
    if case["guidance_rescale"].as_f64().unwrap() > 0.0 {
        push("--guidance-rescale", case["guidance_rescale"].to_string());
    }
    if let Some(n) = case["negative"].as_str() {
        push("--negative", n.into());
    }
    if let Some(s) = case["scheduler"].as_str() {
        push("--scheduler", s.into());
    }
    if let Some(t) = case["dynamic_threshold"].as_object() {
        push("--dynamic-threshold", format!("{},{}", t["ratio"], t["max"]));
    }
    for (key, flag) in
        [("width", "--width"), ("height", "--height"), ("num_images", "--num-images")]
    {
        if let Some(v) = case[key].as_u64() {
            push(flag, v.to_string());
        }
    }
    if let Some(img) = case["init_image"].as_str() {
        push("--init-image", fixtures().join("golden/e2e").join(img).display().to_string());
        push("--strength", case["strength"].to_string());
    }
    push("--output", out.display().to_string());
    args.push("--quiet".into());
    args
}

#[test]
fn ltd_gen_matches_diffusers_pngs() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/e2e/cases.json")).unwrap(),
    )
    .unwrap();
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
            match png_parity(
                &fixtures().join("golden/e2e").join(want.as_str().unwrap()),
                &got,
                50.0,
            ) {
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
