//! An unmodified A1111 client, the `webuiapi` Python package, runs `txt2img` and `img2img`
//! against the server (through basic auth) and reads back the images and their parameters.
//! Skipped, saying so, where `python3` cannot import `webuiapi` (`pip install webuiapi`).

mod support;

use std::process::Command;

use serde_json::Value;
use support::Server;

#[test]
fn the_webuiapi_package_talks_to_the_server() {
    let has = Command::new("python3")
        .args(["-c", "import webuiapi"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!(
            "SKIPPED: python3 cannot import webuiapi; `pip install webuiapi` to run this test"
        );
        return;
    }
    let server = Server::start(&["--api-key", "k3y"]);
    let (host, port) = server.url.trim_start_matches("http://").split_once(':').unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/webuiapi_client.py");
    let out = Command::new("python3").args([script, host, port, "k3y"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "webuiapi client failed:\n{stderr}");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["seed"], 42);
    assert_eq!(seen["all_seeds"], serde_json::json!([42]));
    let infotext = seen["infotext"].as_str().unwrap();
    assert!(infotext.starts_with("a red circle on a blue background\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64"), "{infotext}");
    assert_eq!(seen["parameters_text"], seen["infotext"], "the PNG carries its parameters");
    assert!(seen["img2img_infotext"].as_str().unwrap().contains("Denoising strength: 0.5"));
    assert!(seen["samplers"].as_array().unwrap().iter().any(|s| s == "Euler a"));
    assert_eq!(seen["checkpoint"], seen["models"][0]);
    // webuiapi sends eta = 1.0, which only DDIM reads: reported, not silently dropped.
    assert_eq!(seen["unsupported"], serde_json::json!(["eta"]));
    for key in ["current_image", "eta_relative", "progress", "state"] {
        assert!(seen["progress_keys"].as_array().unwrap().iter().any(|k| k == key), "{key}");
    }
}
