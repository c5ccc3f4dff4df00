//! `cargo xtask` shows the libraries' `tracing` warnings on stderr, filtered by `RUST_LOG`:
//! a train-vae run on a dataset whose only metadata line is broken logs ltd-train's "skipped"
//! warning before it fails for want of examples (so no training runs).

use std::path::Path;
use std::process::{Command, Output};

/// Runs `cargo xtask train-vae` on a dataset with one unreadable metadata line; `rust_log`
/// is `RUST_LOG` (`None`: unset).
fn train_vae_on_a_broken_dataset(dir: &Path, rust_log: Option<&str>) -> Output {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("metadata.jsonl"), "{not json\n").unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pipelines/sd1/vae/config.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("train-vae")
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(dir.join("out"))
        // The debug build under test runs the task itself instead of a release build.
        .env("LTD_XTASK_NO_RELEASE", "1")
        .env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    cmd.output().unwrap()
}

#[test]
fn library_warnings_reach_stderr_and_follow_rust_log() {
    let dir = tempfile::tempdir().unwrap();
    let out = train_vae_on_a_broken_dataset(dir.path(), None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no usable examples"), "{stderr}");
    assert!(stderr.contains("WARN") && stderr.contains("skipped metadata.jsonl:1"), "{stderr}");
    assert!(out.stdout.is_empty(), "logs go to stderr only");

    let quiet = train_vae_on_a_broken_dataset(dir.path(), Some("off"));
    let stderr = String::from_utf8_lossy(&quiet.stderr);
    assert!(stderr.contains("no usable examples"), "{stderr}");
    assert!(!stderr.contains("skipped metadata.jsonl"), "RUST_LOG=off still logged: {stderr}");
}
