//! `ltd-gen`: text-to-image (and image-to-image) from the command line.
//!
//! Exit codes: 0 success, 1 failure (unreadable model, I/O, …), 2 bad arguments.
//! Errors are one line on stderr; no output file is left behind on failure.

mod args;
mod output;
mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ltd_pipeline::{LoadOptions, ModelSource, Pipeline, PipelineError, PipelineKind};

use crate::args::Args;
use crate::output::Staged;

/// Large blocks on transparent huge pages (see `ltd_nn::alloc`): a quarter of a CPU U-Net step
/// was page faults without.
#[global_allocator]
static ALLOC: ltd_nn::alloc::HugePageAlloc = ltd_nn::alloc::HugePageAlloc;

fn main() -> ExitCode {
    ltd_nn::pin_cpu_threads();
    let args = Args::parse();
    init_tracing();
    // On rayon's pool: see `ltd_nn::on_cpu_pool`.
    match ltd_nn::on_cpu_pool(|| run(&args)) {
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

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn run(args: &Args) -> Result<()> {
    output::check_output(&args.output)?;
    let quantization = args.model.quantization()?;
    if args.save_quantized_unet.is_some() && quantization.is_none() {
        anyhow::bail!("--save-quantized-unet needs --quantize (the format to save in)");
    }
    let seed = args.seed.unwrap_or_else(ltd_cli::random_seed);
    let request = args.request(seed)?;
    let show_progress = !args.quiet && std::io::stderr().is_terminal();
    let start = Instant::now();
    let base_options = args.device.load_options(args.model.variant.clone())?;
    let options = LoadOptions {
        loras: args.loras()?,
        embeddings: args.embedding.clone(),
        ..base_options.clone()
    };
    let pipeline = args.model.load_with(&options)?;
    // The refiner shares the device but not the LoRAs and embeddings, which name the base
    // model's layers and text encoders.
    let refiner = match &args.refiner {
        Some(r) => {
            let source = ModelSource::parse(r);
            let pipe = Pipeline::load(&source, &base_options)
                .with_context(|| format!("loading the refiner {source}"))?
                .with_name(r.clone());
            Some(pipe)
        }
        None => None,
    };
    // The IF cascade's stage II shares the device, like the refiner.
    let upscaler = match &args.upscale_model {
        Some(u) => {
            let source = ModelSource::parse(u);
            let pipe = Pipeline::load(&source, &base_options)
                .with_context(|| format!("loading the upscale model {source}"))?
                .with_name(u.clone());
            Some(pipe)
        }
        None => None,
    };
    if args.noise_level.is_some()
        && upscaler.is_none()
        && pipeline.kind() != PipelineKind::DeepFloydIfSuperResolution
    {
        anyhow::bail!(
            "--noise-level: applies to DeepFloyd IF stage II (--upscale-model, or an IF stage II \
             as --model)"
        );
    }
    let load_time = start.elapsed();
    if let (Some(path), Some(q)) = (&args.save_quantized_unet, quantization) {
        let report = pipeline
            .save_quantized_unet(q, path)
            .with_context(|| format!("--save-quantized-unet {}", path.display()))?;
        if !args.quiet {
            eprintln!(
                "wrote {} ({} weights in {q}: {:.1} → {:.1} MiB)",
                path.display(),
                report.tensors,
                report.bytes_before as f64 / 1048576.0,
                report.bytes_after as f64 / 1048576.0
            );
        }
    }

    let mut bar = progress::Bar::new(show_progress);
    let on_step: &mut dyn FnMut(ltd_pipeline::Progress<'_>) = &mut |p| bar.update(p);
    let generation = match (&refiner, args.hires(), &upscaler, &request.init_image) {
        (Some(r), ..) => pipeline.generate_refined(r, args.refiner_switch, &request, on_step)?,
        (None, Some(hires), ..) => pipeline.generate_hires(&request, &hires, on_step)?,
        (None, None, Some(up), _) => {
            pipeline.generate_cascade(up, &request, &args.if_upscale(), on_step)?
        }
        (None, None, None, Some(init))
            if pipeline.kind() == PipelineKind::DeepFloydIfSuperResolution =>
        {
            pipeline.upscale(&request, &init.image, args.if_upscale().noise_level, on_step)?
        }
        (None, None, None, _) => pipeline.generate(&request, on_step)?,
    };
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
