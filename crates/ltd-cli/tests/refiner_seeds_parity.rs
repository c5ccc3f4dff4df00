//! Parity with diffusers through the binary for the SDXL refiner and AUTOMATIC1111's seed
//! conventions: every case of `tests/fixtures/golden/refiner/cases.json` (the refiner as
//! image-to-image, and the base→refiner hand-off with `denoising_end`/`denoising_start`) and
//! of `golden/seeds/cases.json` (`--seed-mode a1111`, `--rng cuda`, `--subseed`) becomes an
//! `ltd-gen` command line whose PNGs must match diffusers' at ≥ 50 dB PSNR, as in `parity.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use ltd_test_support::{fixtures, psnr_u8, read_png_rgb};
use serde_json::Value;

fn pipeline(name: &str) -> String {
    fixtures().join("pipelines").join(name).display().to_string()
}

/// The command line a user would type for a case of `section`.
fn command_line(section: &str, case: &Value, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![case["prompt"].as_str().unwrap().into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    push("--seed", case["seed"].to_string());
    push("--steps", case["steps"].to_string());
    push("--guidance", case["guidance"].to_string());
    if let Some(n) = case["negative"].as_str() {
        push("--negative", n.into());
    }
    if let Some(s) = case["scheduler"].as_str() {
        push("--scheduler", s.into());
    }
    if section == "refiner" {
        match case["kind"].as_str().unwrap() {
            "img2img" => {
                push("--model", pipeline("sdxl-refiner"));
                let img =
                    fixtures().join("golden/refiner").join(case["init_image"].as_str().unwrap());
                push("--init-image", img.display().to_string());
                push("--strength", case["strength"].to_string());
            }
            _ => {
                push("--model", pipeline("sdxl"));
                push("--refiner", pipeline("sdxl-refiner"));
                push("--refiner-switch", case["switch"].to_string());
            }
        }
    } else {
        push("--model", pipeline(case["pipeline"].as_str().unwrap()));
        push("--num-images", case["num_images"].to_string());
        push("--seed-mode", case["seed_mode"].as_str().unwrap().into());
        push("--rng", case["rng"].as_str().unwrap().into());
        if let Some(s) = case["subseed"].as_u64() {
            push("--subseed", s.to_string());
            push("--subseed-strength", case["subseed_strength"].to_string());
        }
    }
    push("--output", out.display().to_string());
    args.push("--quiet".into());
    args
}

fn check_section(section: &str) {
    let golden = fixtures().join("golden").join(section);
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden.join("cases.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut worst = f64::INFINITY;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let args = command_line(section, case, &out);
        let run = Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(&args).output().unwrap();
        if !run.status.success() {
            failures.push(format!(
                "{name}: ltd-gen {args:?} failed: {}",
                String::from_utf8_lossy(&run.stderr)
            ));
            continue;
        }
        let images = case["images"].as_array().unwrap();
        let ours: Vec<PathBuf> = if images.len() == 1 {
            vec![out.clone()]
        } else {
            (1..=images.len()).map(|i| dir.path().join(format!("{name}-{i}.png"))).collect()
        };
        for (want, got) in images.iter().zip(&ours) {
            let (w1, h1, a, _) = read_png_rgb(&golden.join(want.as_str().unwrap()));
            let (w2, h2, b, _) = read_png_rgb(got);
            if (w1, h1) != (w2, h2) {
                failures.push(format!("{name}: size {w2}x{h2}, diffusers {w1}x{h1}"));
                continue;
            }
            let db = psnr_u8(&a, &b);
            worst = worst.min(db);
            eprintln!("{section}/{name}: {} at {db:.1} dB", got.display());
            if db < 50.0 {
                failures.push(format!("{name}: {} at {db:.1} dB", got.display()));
            }
        }
    }
    eprintln!("{section}: worst PSNR over {} cases: {worst:.1} dB", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn refiner_and_handoff_match_diffusers() {
    check_section("refiner");
}

#[test]
fn a1111_seed_conventions_match_their_references() {
    check_section("seeds");
}
