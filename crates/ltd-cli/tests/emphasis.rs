//! A1111 prompt emphasis through the binary: each case of `tests/fixtures/golden/emphasis/
//! cases.json` is an image diffusers made from `prompt_embeds` weighted as A1111 weights them
//! (A1111's own parser and arithmetic, transcribed in the fixture generator); `ltd-gen` with
//! the prompt as typed must match it at ≥ 50 dB, and with `--emphasis none` must not (the
//! syntax then is literal text).

use std::path::Path;
use std::process::Command;

use ltd_test_support::fixtures;
use serde_json::Value;

fn rgb(path: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let n = (info.width * info.height) as usize;
    match info.color_type {
        png::ColorType::Rgb => buf[..n * 3].to_vec(),
        png::ColorType::Rgba => buf[..n * 4].chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        other => panic!("{other:?}"),
    }
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse =
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
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
        let db = psnr(&want, &rgb(&out));
        eprintln!("{name}: {db:.1} dB");
        assert!(db >= 50.0, "{name}: {db:.1} dB");
        run(case, &out, &["--emphasis", "none"]);
        let literal = psnr(&want, &rgb(&out));
        assert!(literal < 40.0, "{name}: literal prompt still {literal:.1} dB");
    }
}
