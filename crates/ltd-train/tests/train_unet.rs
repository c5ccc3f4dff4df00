//! train-unet on tiny data: the loss falls, resuming after a kill equals the uninterrupted
//! run, and the pipeline folder it writes loads back through our component loaders and the
//! pipeline.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ltd_nn::RuntimeOptions;
use ltd_train::common::OptimOptions;
use ltd_train::progress::Event;
use ltd_train::train_unet::{TextEncoderSource, UnetOutcome, UnetTrainOptions, UnetTrainer};
use ltd_train::train_vae::{VaeTrainOptions, VaeTrainer};
use ltd_train::RunControl;

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
        options: options(steps, checkpoint_every),
        device: Device::Cpu,
    };
    let mut events = Vec::new();
    let outcome = trainer.run(&control, &mut |e| events.push(e)).unwrap();
    (outcome, events)
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
