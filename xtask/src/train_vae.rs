//! `cargo xtask train-vae`: trains an `AutoencoderKL` from a diffusers config on an imagefolder
//! and writes it in diffusers layout (see `ltd_train::train_vae`). Also home of the progress
//! rendering both trainers share.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ltd_nn::DeviceChoice;
use ltd_train::common::OptimOptions;
use ltd_train::optim::{AdamWConfig, LrSchedule};
use ltd_train::progress::{Event, Sink};
use ltd_train::train_unet::UnetOutcome;
use ltd_train::train_vae::{read_vae_config, VaeOutcome, VaeTrainOptions, VaeTrainer};
use ltd_train::RunControl;

/// Optimisation flags shared by both trainers.
#[derive(Debug, Clone, clap::Args)]
pub struct OptimArgs {
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Optimisation steps in total.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Peak learning rate (after warm-up).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant or cosine (to zero at the last step), after the warm-up.
    #[arg(long, default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// AdamW β₁.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW β₂.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of initialisation, data order and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Continue the run in --out from its newest checkpoint (with the options it was started
    /// with): the result is the same as if it had never stopped.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in total, without exporting (continue later with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

impl OptimArgs {
    /// The library's options, with `default_lr` when no learning rate was given.
    pub fn options(&self, default_lr: f64) -> OptimOptions {
        OptimOptions {
            batch_size: self.batch_size,
            steps: self.steps,
            learning_rate: self.learning_rate.unwrap_or(default_lr),
            lr_schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            adam: AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
        }
    }

    /// The run control flags.
    pub fn control(&self) -> RunControl {
        RunControl { resume: self.resume, stop_after: self.stop_after }
    }
}

/// Arguments of `cargo xtask train-vae`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The imagefolder: images plus metadata.jsonl (`file_name`, `text`).
    #[arg(long)]
    pub data: PathBuf,
    /// A diffusers AutoencoderKL config.json to train from scratch.
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: the model (config.json, diffusion_pytorch_model.safetensors) and train/.
    #[arg(long)]
    pub out: PathBuf,
    /// Training image side (default: the config's sample_size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Train on random square crops of this side (cheaper steps).
    #[arg(long)]
    pub crop: Option<usize>,
    /// Weight of the L1 reconstruction loss.
    #[arg(long, default_value_t = 1.0)]
    pub l1_weight: f64,
    /// Weight of the squared-error reconstruction loss.
    #[arg(long, default_value_t = 0.0)]
    pub mse_weight: f64,
    /// Weight of the KL term (LDM's kl_weight).
    #[arg(long, default_value_t = 1e-6)]
    pub kl_weight: f64,
    /// Weight of object pixels (those unlike the image's border colour) in the reconstruction
    /// loss; above 1 keeps small objects' colours on plain-background data.
    #[arg(long, default_value_t = 1.0)]
    pub object_weight: f64,
    /// Pixels within this many pixels of an object pixel weigh --object-weight too (the
    /// background where a blurred outline spills)
    #[arg(long, default_value_t = 0)]
    pub object_margin: usize,
    /// Mirror training images left-right at random.
    #[arg(long)]
    pub random_flip: bool,
    /// Images held out for the final PSNR.
    #[arg(long, default_value_t = 64)]
    pub eval_images: usize,
    #[command(flatten)]
    pub optim: OptimArgs,
}

/// Renders training events: a bar with loss and ETA on a terminal, plain lines otherwise.
pub struct Reporter {
    bar: Option<ProgressBar>,
    tty: bool,
    started: Instant,
}

impl Reporter {
    /// A reporter for stderr.
    pub fn new() -> Self {
        Self { bar: None, tty: std::io::stderr().is_terminal(), started: Instant::now() }
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Handles one event.
    pub fn event(&mut self, e: Event) {
        match e {
            Event::Phase(p) | Event::Note(p) => self.say(&p),
            Event::Started { total, done } => {
                self.started = Instant::now();
                if self.tty {
                    let bar = ProgressBar::new(total as u64);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "[{bar:30}] {pos}/{len} loss {msg} ({elapsed} < {eta})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_position(done as u64);
                    bar.reset_eta();
                    self.bar = Some(bar);
                } else {
                    eprintln!("training: {done}/{total} steps done");
                }
            }
            Event::Step { step, smoothed, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(step as u64);
                    bar.set_message(format!("{smoothed:.5}"));
                }
            }
            Event::Checkpoint { step, path } => {
                let line = format!(
                    "step {step}: checkpoint {} ({:.0}s)",
                    path.display(),
                    self.started.elapsed().as_secs_f64()
                );
                self.say(&line);
            }
            Event::Stopped { step } => self.say(&format!("stopped after step {step}")),
        }
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Runs the task.
pub fn run(args: &Args) -> Result<()> {
    let config = read_vae_config(&args.config)?;
    let options = VaeTrainOptions {
        optim: args.optim.options(VaeTrainOptions::default().optim.learning_rate),
        resolution: args.resolution,
        crop: args.crop,
        l1_weight: args.l1_weight,
        mse_weight: args.mse_weight,
        kl_weight: args.kl_weight,
        object_weight: args.object_weight,
        object_margin: args.object_margin,
        random_flip: args.random_flip,
        eval_images: args.eval_images,
    };
    let trainer = VaeTrainer {
        data: &args.data,
        config: &config,
        out: &args.out,
        options,
        device: args.optim.device.open()?,
    };
    let control = args.optim.control();
    let Some(outcome) = drive("the VAE", &args.out, |sink| trainer.run(&control, sink))? else {
        return Ok(());
    };
    if let Some(p) = outcome.psnr {
        let what = if outcome.psnr_held_out {
            "held-out"
        } else {
            "training (dataset too small to hold any out)"
        };
        println!("reconstruction PSNR on {} {what} images: {p:.2} dB", outcome.psnr_images);
    }
    if let Some(s) = outcome.scaling_factor {
        println!("scaling_factor: {s:.5}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// What both trainers' outcomes tell about how a run ended.
pub trait Ended {
    /// The run stopped early on purpose (`--stop-after`); nothing was exported.
    fn stopped(&self) -> bool;
    /// Steps done in total.
    fn steps_done(&self) -> usize;
    /// Mean loss of the last steps.
    fn final_loss(&self) -> Option<f32>;
}

impl Ended for VaeOutcome {
    fn stopped(&self) -> bool {
        self.stopped
    }
    fn steps_done(&self) -> usize {
        self.steps_done
    }
    fn final_loss(&self) -> Option<f32> {
        self.final_loss
    }
}

impl Ended for UnetOutcome {
    fn stopped(&self) -> bool {
        self.stopped
    }
    fn steps_done(&self) -> usize {
        self.steps_done
    }
    fn final_loss(&self) -> Option<f32> {
        self.final_loss
    }
}

/// Runs a trainer under the progress reporter and says how it ended; `None` when it stopped
/// early on purpose (then there is nothing more to report).
pub fn drive<O: Ended>(
    what: &str,
    out: &Path,
    train: impl FnOnce(Sink) -> ltd_train::Result<O>,
) -> Result<Option<O>> {
    let start = Instant::now();
    let mut reporter = Reporter::new();
    let outcome = train(&mut |e| reporter.event(e));
    reporter.finish();
    let outcome = outcome.with_context(|| format!("training {what} into {}", out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if outcome.stopped() {
        eprintln!(
            "stopped after step {} in {secs:.0}s; continue with --resume",
            outcome.steps_done()
        );
        return Ok(None);
    }
    eprintln!(
        "trained {} steps in {secs:.0}s; final loss {:.5}",
        outcome.steps_done(),
        outcome.final_loss().unwrap_or(f32::NAN)
    );
    Ok(Some(outcome))
}
