//! `ltd-gen`: text-to-image (and image-to-image) from the command line.
//!
//! Exit codes: 0 success, 1 failure (unreadable model, I/O, …), 2 bad arguments.
//! Errors are one line on stderr; no output file is left behind on failure.

mod args;
mod default_model;
mod output;
mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ltd_nn::{default_dtype, parse_dtype, DeviceChoice};
use ltd_pipeline::{LoadOptions, ModelSource, Pipeline, PipelineError};

use crate::args::Args;
use crate::output::Staged;

fn main() -> ExitCode {
    ltd_nn::pin_cpu_threads();
    let args = Args::parse();
    init_tracing();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            let bad_input = e
                .downcast_ref::<PipelineError>()
                .is_some_and(|p| matches!(p, PipelineError::InvalidRequest { .. }))
                || msg.starts_with("--");
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings and errors).
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

/// A seed when none is given: different on every run, recorded in the PNG.
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // SplitMix64 of time and pid, kept below 2^32 so it is easy to retype.
    let mut z = nanos ^ ((std::process::id() as u64) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    (z ^ (z >> 31)) & 0xffff_ffff
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn run(args: &Args) -> Result<()> {
    output::check_output(&args.output)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    let request = args.request(seed)?;
    let device = args.device.parse::<DeviceChoice>().context("--device")?.open()?;
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d).context("--dtype")?,
        None => default_dtype(&device),
    };
    let (source, model_name) = match &args.model {
        // A checkpoint file is named by its stem, as A1111 names it (`Model: dreamshaper_8`).
        Some(m) if std::path::Path::new(m).is_file() => {
            let stem =
                std::path::Path::new(m).file_stem().map(|s| s.to_string_lossy().into_owned());
            (ModelSource::parse(m), stem.unwrap_or_else(|| m.clone()))
        }
        Some(m) => (ModelSource::parse(m), m.clone()),
        None => (
            ModelSource::Local(default_model::folder()?),
            default_model::name().unwrap_or_default().to_string(),
        ),
    };

    let show_progress = !args.quiet && std::io::stderr().is_terminal();
    let start = Instant::now();
    // A single-file checkpoint without --config takes the CLIP vocabulary of the embedded model.
    let vocabulary = match (&source, &args.config) {
        (ModelSource::Local(p), None) if p.is_file() && default_model::name().is_some() => {
            Some(default_model::folder()?.join("tokenizer"))
        }
        _ => None,
    };
    let options = LoadOptions {
        device,
        dtype,
        variant: args.variant.clone(),
        config: args.config.clone(),
        vae: args.vae.clone(),
        prediction_type: args.prediction_type.clone(),
        vocabulary,
        ..Default::default()
    };
    let pipeline = Pipeline::load(&source, &options)
        .with_context(|| format!("loading the model {source}"))?
        .with_name(model_name);
    let load_time = start.elapsed();

    let mut bar = progress::Bar::new(show_progress);
    let generation = pipeline.generate(&request, &mut |p| bar.update(p))?;
    bar.finish();

    let paths = output::numbered_paths(&args.output, generation.images.len());
    let staged = generation
        .images
        .iter()
        .zip(&paths)
        .map(|(img, path)| Staged::write(&img.image, &img.params.to_infotext(), path))
        .collect::<Result<Vec<_>>>()?;
    let written: Vec<PathBuf> = staged.into_iter().map(Staged::commit).collect::<Result<_>>()?;

    let t = &generation.timings;
    if !args.quiet {
        for p in &written {
            eprintln!("wrote {}", p.display());
        }
        eprintln!(
            "seed {seed}; load {:.2}s, encode {:.2}s, denoise {:.2}s ({} steps, {}), decode {:.2}s",
            load_time.as_secs_f64(),
            t.encode.as_secs_f64(),
            t.denoise.as_secs_f64(),
            generation.steps,
            progress::rate_of(generation.steps, t.denoise.as_secs_f64()),
            t.decode.as_secs_f64(),
        );
    }
    if args.json {
        let summary = serde_json::json!({
            "files": written,
            "seed": seed,
            "images": generation.images.iter().zip(&written).map(|(img, path)| serde_json::json!({
                "file": path,
                "prompt": img.params.prompt,
                "seed": img.params.seed,
                "batch_index": img.batch_index,
                "width": img.params.width,
                "height": img.params.height,
            })).collect::<Vec<_>>(),
            "model": pipeline.name(),
            "scheduler": generation.scheduler,
            "steps": generation.steps,
            "model_evaluations": generation.evaluations,
            "timings": {
                "load_s": secs(load_time),
                "encode_s": secs(t.encode),
                "denoise_s": secs(t.denoise),
                "decode_s": secs(t.decode),
                "total_s": secs(start.elapsed()),
            },
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}
