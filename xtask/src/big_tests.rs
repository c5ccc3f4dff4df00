//! `cargo xtask big-tests`: the slow full-size checks that `cargo test --workspace` does not
//! build (test targets behind a `big-tests` feature's `required-features`), run in release and
//! named as they run, so a check that did not run is never mistaken for one that passed.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Arguments of `cargo xtask big-tests`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// The gated targets: (package, feature, test target, what it checks).
const TARGETS: &[(&str, &str, &str, &str)] = &[
    (
        "ltd-unet",
        "big-tests",
        "big_memory",
        "full-size SD 1.5 U-Net forward at 512×512 stays under 1 GiB of transient memory",
    ),
    (
        "ltd-unet",
        "big-tests",
        "big_memory_if",
        "DeepFloyd IF stage I in f16: T5-XXL encode, released, then one IF-I-XL U-Net step; \
         prints each peak",
    ),
    (
        "ltd-pipeline",
        "big-tests",
        "big_memory_if_pipeline",
        "DeepFloyd IF stage I in f16 through the pipeline, from files: peak is the larger of \
         T5-XXL and the IF-I-XL U-Net, not their sum",
    ),
];

pub fn run(_args: &Args) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for &(package, feature, test, what) in TARGETS {
        eprintln!("big-tests: running {package} --test {test} ({what})");
        let status = Command::new(&cargo)
            .args(["test", "--release", "--package", package, "--features", feature])
            .args(["--test", test, "--", "--nocapture"])
            .status()
            .with_context(|| format!("running cargo test for {package}/{test}"))?;
        if !status.success() {
            bail!("big-tests: {package} --test {test} failed ({status})");
        }
        eprintln!("big-tests: {package} --test {test} passed");
    }
    Ok(())
}
