//! `cargo xtask make-shapes`: writes the synthetic captioned shapes dataset (an imagefolder
//! with `metadata.jsonl` and `shapes.json`), deterministic for a given seed. See
//! `ltd_train::shapes` for what is drawn and how hold-out rules work.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ltd_train::shapes::{write_dataset, HoldoutRule, ShapesSpec};

/// Arguments of `cargo xtask make-shapes`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The folder to write (created if needed; existing images are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// The seed; the same arguments always write the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Attribute combinations never generated, e.g. `colour=red,shape=circle` or
    /// `shape=triangle,position=top-left` (repeatable). Attributes: shape, colour, size,
    /// position, background.
    #[arg(long = "holdout", value_name = "RULE")]
    pub holdout: Vec<String>,
    /// Probability that a caption leaves out the size word.
    #[arg(long, default_value_t = 0.25)]
    pub omit_size: f64,
    /// Probability that a caption leaves out the position phrase.
    #[arg(long, default_value_t = 0.25)]
    pub omit_position: f64,
}

/// Runs the task.
pub fn run(args: &Args) -> Result<()> {
    let holdout =
        args.holdout.iter().map(|r| r.parse::<HoldoutRule>()).collect::<Result<Vec<_>, _>>()?;
    let spec = ShapesSpec {
        count: args.count,
        size: args.size,
        seed: args.seed,
        holdout,
        omit_size: args.omit_size,
        omit_position: args.omit_position,
    };
    let start = std::time::Instant::now();
    let n = write_dataset(&spec, &args.out)
        .with_context(|| format!("writing the shapes dataset to {}", args.out.display()))?;
    eprintln!(
        "wrote {n} images of {0}x{0} to {1} in {2:.1}s",
        args.size,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
