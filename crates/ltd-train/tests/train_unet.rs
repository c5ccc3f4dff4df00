//! train-unet on tiny data: the loss falls, resuming after a kill equals the uninterrupted
//! run, and the pipeline folder it writes loads back through our component loaders and the
//! pipeline.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ltd_nn::RuntimeOptions;
use ltd_train::common::OptimOptions;
use ltd_train::progress::Event;
use ltd_train::timestep_bias::{BiasStrategy, TimestepBias};
use ltd_train::train_unet::{TextEncoderSource, UnetOutcome, UnetTrainOptions, UnetTrainer};
use ltd_train::train_vae::{VaeTrainOptions, VaeTrainer};
use ltd_train::{RunControl, TrainError};

/// A dataset and a (briefly) trained VAE in `dir`.
fn setup(dir: &Path, count: usize) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    common::shapes(&data, count);
    let vae = dir.join("vae");
    let config = common::vae_config();
    let options = VaeTrainOptions {
        optim: OptimOptions { batch_size: 4, steps: 2, checkpoint_every: 10, ..Default::default() },
        eval_images: 0,
        ..Default::default()
    };
    VaeTrainer { data: &data, config: &config, out: &vae, options, device: Device::Cpu }
        .run(&RunControl::default(), &mut |_| {})
        .unwrap();
    (data, vae)
}

fn options(steps: usize, checkpoint_every: usize) -> UnetTrainOptions {
    UnetTrainOptions {
        optim: OptimOptions {
            batch_size: 4,
            steps,
            learning_rate: 3e-3,
            warmup_steps: 2,
            checkpoint_every,
            seed: 5,
            ..Default::default()
        },
        snr_gamma: Some(5.0),
        ema_decay: Some(0.9),
        text_encoder_fp16: true,
        preview_steps: 2,
        ..Default::default()
    }
}

fn train(
    data: &Path,
    vae: &Path,
    out: &Path,
    (steps, checkpoint_every): (usize, usize),
    te: TextEncoderSource,
    control: RunControl,
) -> (UnetOutcome, Vec<Event>) {
    train_with(data, vae, out, options(steps, checkpoint_every), te, control).unwrap()
}

fn train_with(
    data: &Path,
    vae: &Path,
    out: &Path,
    options: UnetTrainOptions,
    te: TextEncoderSource,
    control: RunControl,
) -> Result<(UnetOutcome, Vec<Event>), TrainError> {
    let context = match &te {
        TextEncoderSource::Frozen(_) => 32,
        TextEncoderSource::Scratch(_) => 16,
    };
    let unet = common::unet_config(context);
    let sched = common::scheduler_config();
    let tokenizer = common::tokenizer();
    let trainer = UnetTrainer {
        data,
        vae,
        unet_config: &unet,
        text_encoder: te,
        tokenizer: &tokenizer,
        scheduler_config: &sched,
        out,
        options,
        device: Device::Cpu,
    };
    let mut events = Vec::new();
    let outcome = trainer.run(&control, &mut |e| events.push(e))?;
    Ok((outcome, events))
}

fn scratch() -> TextEncoderSource {
    TextEncoderSource::Scratch(common::text_encoder_config())
}

#[test]
fn loss_falls_and_the_pipeline_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (data, vae) = setup(dir.path(), 16);
    let out = dir.path().join("pipe");
    train(&data, &vae, &out, (40, 20), scratch(), RunControl::default());
    let losses = common::losses(&out);
    let mean = |s: &[(usize, f32)]| s.iter().map(|l| l.1).sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..8]), mean(&losses[32..]));
    // ε-prediction MSE starts near 1 for an untrained model; 40 steps must cut it clearly.
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    eprintln!("loss {first} -> {last}");

    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "train/samples/step-00000040.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(index["_class_name"], "StableDiffusionPipeline");
    assert_eq!(index["scheduler"][1], "DDIMScheduler");
    let rt = RuntimeOptions::default();
    let unet = ltd_unet::UNet2DConditionModel::load(
        &out.join("unet"),
        None,
        DType::F32,
        &Device::Cpu,
        &rt,
    )
    .unwrap();
    assert_eq!(unet.config().in_channels, 4);
    let te = ltd_text::CLIPTextModel::from_folder(
        &out.join("text_encoder"),
        None,
        DType::F32,
        &Device::Cpu,
        &rt,
    )
    .unwrap();
    assert_eq!(te.params().hidden_size, 16);
    ltd_text::CLIPTokenizer::from_folder(&out.join("tokenizer")).unwrap();
    ltd_scheduler::load_scheduler(&out.join("scheduler/scheduler_config.json")).unwrap();

    // The pipeline (what ltd-gen runs) loads the folder and generates.
    let pipe = ltd_pipeline::Pipeline::load(
        &ltd_pipeline::ModelSource::Local(out.clone()),
        &ltd_pipeline::LoadOptions::default(),
    )
    .unwrap();
    let req = ltd_pipeline::GenerateRequest {
        prompts: vec!["a red circle on a blue background".into()],
        steps: 2,
        width: Some(16),
        height: Some(16),
        ..Default::default()
    };
    let generated = pipe.generate(&req, &mut |_| {}).unwrap();
    assert_eq!((generated.images[0].image.width, generated.images[0].image.height), (16, 16));
}

#[test]
fn resume_after_a_kill_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, vae) = setup(dir.path(), 12);
    let straight = dir.path().join("straight");
    train(&data, &vae, &straight, (10, 4), scratch(), RunControl::default());
    let cut = dir.path().join("cut");
    let (stopped, _) = train(
        &data,
        &vae,
        &cut,
        (10, 4),
        scratch(),
        RunControl { resume: false, stop_after: Some(7) },
    );
    assert!(stopped.stopped && !cut.join("model_index.json").exists());
    let (_, events) =
        train(&data, &vae, &cut, (10, 4), scratch(), RunControl { resume: true, stop_after: None });
    assert!(events.contains(&Event::Started { total: 10, done: 4 }), "{events:?}");
    assert_eq!(
        common::model_files(&straight),
        common::model_files(&cut),
        "bit-identical pipeline files"
    );
    assert_eq!(common::losses(&straight), common::losses(&cut));
}

#[test]
fn a_frozen_text_encoder_is_copied_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (data, vae) = setup(dir.path(), 8);
    let out = dir.path().join("pipe");
    let frozen = common::fixtures().join("pipelines/sd1/text_encoder");
    train(
        &data,
        &vae,
        &out,
        (3, 10),
        TextEncoderSource::Frozen(frozen.clone()),
        RunControl::default(),
    );
    for f in ["config.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(frozen.join(f)).unwrap(),
            std::fs::read(out.join("text_encoder").join(f)).unwrap(),
            "{f}"
        );
    }
}

/// `text_encoder_learning_rate` reaches the text encoder and only it: at 0 the text encoder
/// stays at its initialisation however long the run (the 1-step and 3-step runs save the same
/// weights) while the U-Net trains; at the default rate both move. A frozen text encoder or a
/// negative rate is refused naming the flag.
#[test]
fn text_encoder_learning_rate_applies_to_the_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let (data, vae) = setup(dir.path(), 8);
    let weights = |te_lr: Option<f64>, steps: usize| {
        let out = dir.path().join(format!("pipe-{te_lr:?}-{steps}"));
        let o = UnetTrainOptions { text_encoder_learning_rate: te_lr, ..options(steps, 10) };
        train_with(&data, &vae, &out, o, scratch(), RunControl::default()).unwrap();
        let read = |f: &str| std::fs::read(out.join(f)).unwrap();
        (read("text_encoder/model.safetensors"), read("unet/diffusion_pytorch_model.safetensors"))
    };
    let (te1, unet1) = weights(Some(0.0), 1);
    let (te3, unet3) = weights(Some(0.0), 3);
    assert!(te1 == te3, "a text encoder at learning rate 0 moved");
    assert!(unet1 != unet3, "the U-Net did not train");
    let (d1, _) = weights(None, 1);
    let (d3, _) = weights(None, 3);
    assert!(d1 != d3, "at the default rate the text encoder did not train");

    let refused = |te: TextEncoderSource, lr: f64| {
        let o = UnetTrainOptions { text_encoder_learning_rate: Some(lr), ..options(1, 10) };
        let out = dir.path().join("refused");
        let err = train_with(&data, &vae, &out, o, te, RunControl::default()).unwrap_err();
        assert!(err.to_string().contains("text-encoder-lr"), "{err}");
    };
    refused(scratch(), -1e-4);
    refused(TextEncoderSource::Frozen(common::fixtures().join("pipelines/sd1/text_encoder")), 1e-4);
}

/// A timestep bias is checked against the scheduler's length before any training (a range
/// past the 1000 train timesteps is refused naming the flag, and no checkpoint is written),
/// and it reaches the loop: with the range 990..1000 weighted 10⁹, every batch's mean
/// timestep (logged as `timestep_mean`) is at least 990, while uniform draws are not.
#[test]
fn a_timestep_bias_is_checked_and_drives_the_draws() {
    let dir = tempfile::tempdir().unwrap();
    let (data, vae) = setup(dir.path(), 8);
    let run = |bias: TimestepBias, name: &str| {
        let out = dir.path().join(name);
        let o = UnetTrainOptions { timestep_bias: bias, ..options(4, 10) };
        train_with(&data, &vae, &out, o, scratch(), RunControl::default()).map(|_| out)
    };
    let bias = TimestepBias {
        strategy: BiasStrategy::Range,
        multiplier: 1e9,
        begin: 990,
        end: 1010,
        ..Default::default()
    };
    let err = run(bias, "refused").unwrap_err();
    assert!(err.to_string().contains("timestep-bias-end"), "{err}");
    assert!(!dir.path().join("refused/train/checkpoints/latest").exists());

    let mean_timesteps = |out: &Path| -> Vec<f64> {
        std::fs::read_to_string(out.join("train/loss.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let term = v["terms"].as_array().unwrap().iter().find(|t| t[0] == "timestep_mean");
                term.unwrap()[1].as_f64().unwrap()
            })
            .collect()
    };
    let biased = mean_timesteps(&run(TimestepBias { end: 1000, ..bias }, "biased").unwrap());
    assert_eq!(biased.len(), 4);
    assert!(biased.iter().all(|&t| t >= 990.0), "{biased:?}");
    let uniform = mean_timesteps(&run(TimestepBias::default(), "uniform").unwrap());
    assert!(uniform.iter().any(|&t| t < 990.0), "{uniform:?}");
}
