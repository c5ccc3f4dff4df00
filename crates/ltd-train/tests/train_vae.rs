//! train-vae on tiny data: the loss falls, a run killed after a checkpoint and resumed ends
//! bit-identical to an uninterrupted one, and the folder it writes loads back.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use ltd_nn::RuntimeOptions;
use ltd_train::common::OptimOptions;
use ltd_train::progress::Event;
use ltd_train::train_vae::{VaeOutcome, VaeTrainOptions, VaeTrainer};
use ltd_train::RunControl;
use ltd_vae::AutoencoderKL;

fn options(steps: usize) -> VaeTrainOptions {
    VaeTrainOptions {
        optim: OptimOptions {
            batch_size: 4,
            steps,
            learning_rate: 1e-2,
            warmup_steps: 2,
            checkpoint_every: 4,
            seed: 11,
            ..Default::default()
        },
        crop: Some(8),
        random_flip: true,
        mse_weight: 0.5,
        eval_images: 2,
        ..Default::default()
    }
}

fn train(data: &Path, out: &Path, steps: usize, control: RunControl) -> (VaeOutcome, Vec<Event>) {
    let config = common::vae_config();
    let trainer =
        VaeTrainer { data, config: &config, out, options: options(steps), device: Device::Cpu };
    let mut events = Vec::new();
    let outcome = trainer.run(&control, &mut |e| events.push(e)).unwrap();
    (outcome, events)
}

#[test]
fn loss_falls_and_the_folder_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::shapes(&data, 24);
    let out = dir.path().join("vae");
    let (outcome, events) = train(&data, &out, 40, RunControl::default());
    let losses = common::losses(&out);
    assert_eq!(losses.len(), 40);
    let mean = |s: &[(usize, f32)]| s.iter().map(|l| l.1).sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..4]), mean(&losses[36..]));
    // The L1 + MSE reconstruction of flat shapes starts near 0.5–1 and must drop clearly (deterministic: seeded).
    assert!(last < 0.85 * first, "loss {first} -> {last}");
    eprintln!("loss {first} -> {last}, PSNR {:?}", outcome.psnr);
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Checkpoint { .. })).count(), 10);
    assert!(outcome.psnr.unwrap() > 8.0 && outcome.psnr_held_out && outcome.psnr_images == 2);

    // Diffusers layout, the measured scaling factor, and our loader reads it.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["_class_name"], "AutoencoderKL");
    let sf = cfg["scaling_factor"].as_f64().unwrap();
    assert!((sf - outcome.scaling_factor.unwrap()).abs() < 1e-12 && sf > 0.0);
    let vae = AutoencoderKL::load(&out, None, DType::F32, &Device::Cpu, &RuntimeOptions::default())
        .unwrap();
    assert_eq!(vae.config().scaling_factor, sf);
    for f in ["train/loss.png", "train/samples/step-00000040.png", "train/checkpoints/latest"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn resume_after_a_kill_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::shapes(&data, 16);
    let straight = dir.path().join("straight");
    train(&data, &straight, 10, RunControl::default());

    // Killed at step 6: the last checkpoint is step 4, steps 5–6 are lost and redone.
    let cut = dir.path().join("cut");
    let (stopped, _) = train(&data, &cut, 10, RunControl { resume: false, stop_after: Some(6) });
    assert!(stopped.stopped && stopped.steps_done == 6);
    assert!(!cut.join("config.json").exists(), "a stopped run exports nothing");
    // A fresh run into a folder with checkpoints is refused.
    let config = common::vae_config();
    let again = VaeTrainer {
        data: &data,
        config: &config,
        out: &cut,
        options: options(10),
        device: Device::Cpu,
    };
    let err = again.run(&RunControl::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let (resumed, events) = train(&data, &cut, 10, RunControl { resume: true, stop_after: None });
    assert!(events.contains(&Event::Started { total: 10, done: 4 }), "{events:?}");
    assert_eq!(resumed.steps_done, 10);

    assert_eq!(
        common::model_files(&straight),
        common::model_files(&cut),
        "bit-identical model files"
    );
    assert_eq!(common::losses(&straight), common::losses(&cut), "the same loss history, once");
}

#[test]
fn object_weight_reweights_the_reconstruction_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::shapes(&data, 8);
    let config = common::vae_config();
    let first_loss = |weight: f64, name: &str| {
        let out = dir.path().join(name);
        let mut o = options(1);
        o.object_weight = weight;
        let trainer =
            VaeTrainer { data: &data, config: &config, out: &out, options: o, device: Device::Cpu };
        trainer.run(&RunControl::default(), &mut |_| {}).map(|_| common::losses(&out)[0].1)
    };
    let plain = first_loss(1.0, "plain").unwrap();
    let weighted = first_loss(5.0, "weighted").unwrap();
    // The same initial model and batch: object pixels weigh 5, so the loss is higher, but by
    // less than 5×, as the background still weighs 1.
    assert!(weighted > 1.05 * plain && weighted < 5.0 * plain, "{plain} -> {weighted}");
    let err = first_loss(0.0, "zero").unwrap_err().to_string();
    assert!(err.contains("object-weight"), "{err}");
}
