//! Project tasks, run as `cargo xtask <task>` (see `.cargo/config.toml`).
//!
//! Heavy tasks (training, evaluation, benchmarks) re-run themselves in a release build: their
//! work lives in the library crates, and a debug build would be far too slow.

mod bench;
mod big_tests;
mod build_cuda;
mod eval_shapes;
mod fixtures;
mod make_shapes;
mod train_args;
mod train_report;
mod train_unet;
mod train_vae;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ltd's project tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Regenerate the reference fixtures with the pinned diffusers/transformers/torch stack.
    Fixtures(fixtures::Args),
    /// Write the synthetic captioned shapes dataset (deterministic for a seed).
    MakeShapes(make_shapes::Args),
    /// Train an AutoencoderKL on an imagefolder (release build).
    TrainVae(train_vae::Args),
    /// Train a text-conditioned U-Net on latents of a frozen VAE (release build).
    TrainUnet(train_unet::Args),
    /// Measure how well a shapes model follows held-out prompts (release build).
    EvalShapes(eval_shapes::Args),
    /// CPU speed and memory against diffusers/PyTorch in the same run (release build).
    Bench(bench::Args),
    /// The slow full-size checks `cargo test` does not build (release build, minutes).
    BigTests(big_tests::Args),
    /// Build the CUDA ltd-gen for an H100 without a GPU here (.gpu/ltd-gen.xz, see xtask/gpu/).
    BuildCuda(build_cuda::Args),
}

impl Task {
    /// Tasks too slow for a debug build.
    fn is_heavy(&self) -> bool {
        matches!(
            self,
            Self::MakeShapes(_)
                | Self::TrainVae(_)
                | Self::TrainUnet(_)
                | Self::EvalShapes(_)
                | Self::Bench(_)
        )
    }
}

/// Runs this same command line again in a release build of xtask (`cargo run --release
/// --package xtask --bin xtask -- ARGS`) and returns its exit code: training in a debug
/// build would be many times slower. `LTD_XTASK_NO_RELEASE=1` turns this off.
fn rerun_in_release() -> Result<i32> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--release", "--package", "xtask", "--bin", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .status()
        .context("re-running xtask in a release build")?;
    Ok(status.code().unwrap_or(1))
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// The libraries' `tracing` logs go to stderr (progress output goes there too, stdout keeps
/// the results), filtered by `RUST_LOG` (default: warnings and errors), as in ltd-gen.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Large blocks on transparent huge pages (see `ltd_nn::alloc`): a quarter of a CPU U-Net step
/// was page faults without.
#[global_allocator]
static ALLOC: ltd_nn::alloc::HugePageAlloc = ltd_nn::alloc::HugePageAlloc;

fn main() -> Result<()> {
    init_tracing();
    ltd_nn::pin_cpu_threads();
    let cli = Cli::parse();
    let root = repo_root();
    if cli.task.is_heavy()
        && cfg!(debug_assertions)
        && std::env::var_os("LTD_XTASK_NO_RELEASE").is_none_or(|v| v.is_empty() || v == "0")
    {
        std::process::exit(rerun_in_release()?);
    }
    // On rayon's pool: see `ltd_nn::on_cpu_pool`.
    ltd_nn::on_cpu_pool(|| match &cli.task {
        Task::Fixtures(args) => fixtures::run(args, &root),
        Task::MakeShapes(args) => make_shapes::run(args),
        Task::TrainVae(args) => train_vae::run(args),
        Task::TrainUnet(args) => train_unet::run(args, &root),
        Task::EvalShapes(args) => eval_shapes::run(args, &root),
        Task::Bench(args) => bench::run(args, &root),
        Task::BigTests(args) => big_tests::run(args),
        Task::BuildCuda(args) => build_cuda::run(args, &root),
    })
}
