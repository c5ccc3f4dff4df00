//! `cargo xtask eval-shapes`: how well a shapes model follows prompts it never saw.
//!
//! The held-out attribute combinations come from the dataset's `shapes.json` (or `--holdout`);
//! for each, prompts with the remaining attributes drawn at random are generated through
//! ltd-pipeline (the same code `ltd-gen` runs) at each guidance scale, and every image is read
//! by the analytic checker of `ltd_train::shape_check`: the dominant non-background colour,
//! the best-fitting ideal shape, the position of its box on a 3×3 grid, and the background.
//! With `--data`, the same checker also reads the model's VAE reconstructions of dataset
//! images: the ceiling of what generation can score.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use ltd_pipeline::{
    DynamicThreshold, GenerateRequest, LoadOptions, MimicGuidance, ModelSource, Pipeline,
};
use ltd_train::data::ImageFolder;
use ltd_train::images::to_images;
use ltd_train::shape_check::{analyze, Accuracy, Verdict};
use ltd_train::shapes::{
    caption, holdout_cases, read_spec, Attributes, HoldoutRule, ShapesRecord, ShapesSpec,
};
use ltd_train::train_vae::reconstruct;
use ltd_vae::AutoencoderKL;

/// Arguments of `cargo xtask eval-shapes`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model folder (default: the embedded default model, models/<models/DEFAULT>).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The make-shapes folder the model was trained on (its shapes.json names the hold-outs).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out combinations to test instead (repeatable), e.g. `colour=red,shape=circle`.
    #[arg(long = "holdout", value_name = "RULE")]
    pub holdout: Vec<String>,
    /// Number of prompts (spread evenly over the hold-out rules).
    #[arg(long, default_value_t = 60)]
    pub count: usize,
    /// Guidance scales to evaluate, comma-separated.
    #[arg(long, default_value = "1,7.5", value_delimiter = ',')]
    pub guidance: Vec<f64>,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Seed of the prompts' free attributes and of the first image (image i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also limit guidance with the latent-aware "mimic" rule at this lower guidance (see
    /// `ltd-gen --mimic-guidance`), percentile 0.995.
    #[arg(long)]
    pub mimic_guidance: Option<f64>,
    /// Also apply Imagen dynamic thresholding with this ratio and maximum (`R,M`, see
    /// `ltd-gen --dynamic-threshold`).
    #[arg(long, value_name = "R,M", value_parser = parse_threshold)]
    pub dynamic_threshold: Option<DynamicThreshold>,
    /// Guidance rescale φ (see `ltd-gen --guidance-rescale`).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// With --data: also read the model's own VAE reconstructions of this many dataset images
    /// (the most a U-Net on its latents can score; 0: skip).
    #[arg(long, default_value_t = 512)]
    pub reconstructions: usize,
    /// Write the generated images as grids (one per guidance scale) and report.json here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The model folder the embedded default names.
fn default_model(root: &Path) -> Result<PathBuf> {
    let marker = root.join("models/DEFAULT");
    let name = std::fs::read_to_string(&marker)
        .with_context(|| format!("reading {}", marker.display()))?;
    Ok(root.join("models").join(name.trim()))
}

/// Runs the task.
pub fn run(args: &Args, root: &Path) -> Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => default_model(root)?,
    };
    let mut spec = match &args.data {
        Some(d) => read_spec(d)?,
        None => ShapesSpec::new(0, 64, 0),
    };
    if !args.holdout.is_empty() {
        spec.holdout =
            args.holdout.iter().map(|r| r.parse::<HoldoutRule>()).collect::<Result<_, _>>()?;
    }
    if spec.holdout.is_empty() {
        bail!("no held-out combinations: pass --data (a make-shapes folder with hold-outs) or --holdout");
    }
    let cases = holdout_cases(&spec, args.count, args.seed);
    let pipe = Pipeline::load(&ModelSource::Local(model.clone()), &LoadOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    eprintln!(
        "{} prompts over {} held-out rules ({}), {} steps",
        cases.len(),
        spec.holdout.len(),
        spec.holdout.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "),
        args.steps
    );
    let mut table = String::from(
        "| guidance | images | colour | shape | position | background | all four | saturated |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut report = Vec::new();
    for &g in &args.guidance {
        let mut verdicts = Vec::new();
        let mut images = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let limits = Limits {
                mimic_guidance: args
                    .mimic_guidance
                    .map(|m| MimicGuidance { mimic: m, ..Default::default() }),
                dynamic_threshold: args.dynamic_threshold,
                guidance_rescale: args.guidance_rescale,
            };
            let img = generate(&pipe, case, g, limits, args.steps, args.seed + i as u64)?;
            verdicts.push(Verdict::judge(&analyze(&img), case));
            images.push(img);
        }
        let acc = Accuracy::of(&verdicts);
        let sat = images.iter().map(saturated).sum::<f64>() / images.len().max(1) as f64;
        let pct = |v: f64| format!("{:.0}%", 100.0 * v);
        writeln!(
            table,
            "| {g} | {} | {} | {} | {} | {} | {} | {:.1}% |",
            acc.n,
            pct(acc.colour),
            pct(acc.shape),
            pct(acc.position),
            pct(acc.background),
            pct(acc.all),
            100.0 * sat
        )?;
        if let Some(out) = &args.out {
            std::fs::create_dir_all(out)?;
            let path = out.join(format!("guidance-{g}.png"));
            grid(&images, 10).save(&path).with_context(|| format!("writing {}", path.display()))?;
        }
        report.push(serde_json::json!({ "guidance": g, "accuracy": acc, "saturated": sat, "verdicts": verdicts }));
    }
    let mut ceiling = None;
    if let (Some(data), true) = (&args.data, args.reconstructions > 0) {
        let verdicts = reconstruction_verdicts(&model, data, spec.size, args.reconstructions)?;
        let acc = Accuracy::of(&verdicts);
        let pct = |v: f64| format!("{:.0}%", 100.0 * v);
        writeln!(
            table,
            "| VAE reconstructions | {} | {} | {} | {} | {} | {} | |",
            acc.n,
            pct(acc.colour),
            pct(acc.shape),
            pct(acc.position),
            pct(acc.background),
            pct(acc.all)
        )?;
        ceiling = Some(acc);
    }
    println!("{table}");
    if let Some(out) = &args.out {
        let prompts: Vec<String> = cases.iter().map(caption).collect();
        let threshold = args.dynamic_threshold.map(|t| [t.ratio, t.max]);
        let json = serde_json::json!({ "model": model, "steps": args.steps, "seed": args.seed, "mimic_guidance": args.mimic_guidance, "dynamic_threshold": threshold, "guidance_rescale": args.guidance_rescale, "prompts": prompts, "results": report, "vae_reconstructions": ceiling });
        std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&json)?)?;
        std::fs::write(out.join("table.md"), &table)?;
    }
    Ok(())
}

/// The checker's verdicts on the model's VAE reconstructions (posterior mean, decoded) of the
/// first `count` images of a make-shapes folder (training images, so every attribute value
/// occurs): a shape or colour the VAE cannot draw, no U-Net on its latents can generate.
fn reconstruction_verdicts(
    model: &Path,
    data: &Path,
    size: usize,
    count: usize,
) -> Result<Vec<Verdict>> {
    let meta = data.join("metadata.jsonl");
    let text =
        std::fs::read_to_string(&meta).with_context(|| format!("reading {}", meta.display()))?;
    let mut attributes = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let record: ShapesRecord = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", meta.display(), i + 1))?;
        attributes.insert(record.file_name, record.attributes);
    }
    let folder = ImageFolder::open(data, size)?;
    let vae_dir = model.join("vae");
    let device = candle_core::Device::Cpu;
    let vae =
        AutoencoderKL::load(&vae_dir, None, candle_core::DType::F32, &device, &Default::default())
            .with_context(|| format!("loading {}", vae_dir.display()))?;
    let indices: Vec<usize> = (0..count.min(folder.len())).collect();
    let mut verdicts = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(64) {
        let images = to_images(&reconstruct(&vae, &folder.batch(chunk, &device)?)?)?;
        for (&i, img) in chunk.iter().zip(&images) {
            let name = &folder.examples()[i].file_name;
            let truth = attributes
                .get(name)
                .with_context(|| format!("{}: no attributes for {name}", meta.display()))?;
            verdicts.push(Verdict::judge(&analyze(img), truth));
        }
    }
    Ok(verdicts)
}

/// The guidance limiters an evaluation applies.
#[derive(Debug, Clone, Copy)]
struct Limits {
    mimic_guidance: Option<MimicGuidance>,
    dynamic_threshold: Option<DynamicThreshold>,
    guidance_rescale: f64,
}

fn parse_threshold(s: &str) -> Result<DynamicThreshold, String> {
    let (r, m) = s.split_once(',').ok_or("expected RATIO,MAX (e.g. 0.995,2.5)")?;
    let num = |v: &str| v.trim().parse::<f64>().map_err(|e| format!("`{v}`: {e}"));
    Ok(DynamicThreshold { ratio: num(r)?, max: num(m)? })
}

/// Fraction of channel values at 0 or 255: how much of an image guidance has saturated.
fn saturated(img: &RgbImage) -> f64 {
    let raw = img.as_raw();
    raw.iter().filter(|&&v| v == 0 || v == 255).count() as f64 / raw.len().max(1) as f64
}

/// One image for the full caption of `case`.
fn generate(
    pipe: &Pipeline,
    case: &Attributes,
    guidance: f64,
    limits: Limits,
    steps: usize,
    seed: u64,
) -> Result<RgbImage> {
    let req = GenerateRequest {
        prompts: vec![caption(case)],
        steps,
        guidance,
        mimic_guidance: limits.mimic_guidance,
        dynamic_threshold: limits.dynamic_threshold,
        guidance_rescale: limits.guidance_rescale,
        seed,
        ..Default::default()
    };
    let out = pipe.generate(&req, &mut |_| {})?;
    let img = &out.images.first().context("the pipeline returned no image")?.image;
    RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels.clone())
        .context("image buffer size")
}

/// Images laid out `cols` to a row.
fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let rows: Vec<Vec<RgbImage>> = images.chunks(cols).map(|c| c.to_vec()).collect();
    ltd_train::images::grid(&rows, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ltd_train::shapes::{Position, ShapeKind, SizeKind};

    #[test]
    fn threshold_option_parses_and_names_the_bad_part() {
        let t = parse_threshold("0.995, 2.5").unwrap();
        assert_eq!((t.ratio, t.max), (0.995, 2.5));
        assert!(parse_threshold("0.9").unwrap_err().contains("RATIO,MAX"));
        assert!(parse_threshold("x,1").unwrap_err().contains("`x`"));
    }

    #[test]
    fn saturation_counts_clipped_channel_values() {
        let img = RgbImage::from_raw(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        assert!((saturated(&img) - 2.0 / 6.0).abs() < 1e-12);
    }

    /// The ceiling row reads the VAE's reconstructions against each file's own attributes:
    /// the shipped VAE keeps every background and colour of a fresh make-shapes set.
    #[test]
    fn reconstructions_are_judged_against_their_own_attributes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let model = default_model(&root).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = ShapesSpec::new(24, 32, 5);
        ltd_train::shapes::write_dataset(&spec, dir.path()).unwrap();
        let verdicts = reconstruction_verdicts(&model, dir.path(), 32, 20).unwrap();
        assert_eq!(verdicts.len(), 20);
        let acc = Accuracy::of(&verdicts);
        assert_eq!(acc.background, 1.0, "{acc:?}");
        assert!(acc.colour >= 0.9 && acc.position >= 0.9, "{acc:?}");
        let err = reconstruction_verdicts(&model, &dir.path().join("missing"), 32, 4).unwrap_err();
        assert!(format!("{err:#}").contains("metadata.jsonl"), "{err:#}");
    }

    /// Each limiter reaches the pipeline: on the shipped default model at guidance 15 it
    /// changes the image (a limiter silently dropped would leave it identical).
    #[test]
    fn limiters_change_the_image() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let model = default_model(&root).unwrap();
        let pipe = Pipeline::load(&ModelSource::Local(model), &LoadOptions::default()).unwrap();
        let case = Attributes {
            shape: ShapeKind::Circle,
            colour: "red".into(),
            size: SizeKind::Large,
            position: Position { col: 1, row: 1 },
            background: "blue".into(),
        };
        let plain = Limits { mimic_guidance: None, dynamic_threshold: None, guidance_rescale: 0.0 };
        let image = |limits| generate(&pipe, &case, 15.0, limits, 4, 0).unwrap();
        let base = image(plain);
        let mimic = Limits {
            mimic_guidance: Some(MimicGuidance { mimic: 7.5, ..Default::default() }),
            ..plain
        };
        let threshold = Limits { dynamic_threshold: Some(DynamicThreshold::default()), ..plain };
        assert_ne!(base, image(mimic), "mimic guidance had no effect");
        assert_ne!(base, image(threshold), "dynamic thresholding had no effect");
        let rescale = Limits { guidance_rescale: 0.7, ..plain };
        assert_ne!(base, image(rescale), "guidance rescale had no effect");
    }
}
