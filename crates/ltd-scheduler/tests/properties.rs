//! Properties every sampler must have, independent of the goldens.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{configs_dir, ReplayNoise};
use ltd_scheduler::{
    build_scheduler, load_scheduler, NoiseSource, PredictionType, SamplerKind, SchedulerConfig,
};
use ltd_test_support::max_abs_diff;

fn model_config(name: &str) -> SchedulerConfig {
    SchedulerConfig::load(&configs_dir().join(name).join("scheduler/scheduler_config.json"))
        .unwrap()
}

const MODELS: [&str; 3] =
    ["stable-diffusion-v1-5", "stable-diffusion-2-1", "stable-diffusion-xl-base-1.0"];

/// A NoiseSource of zeros (for properties that need a deterministic step).
struct Zeros;

impl NoiseSource for Zeros {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros(shape, dtype, device)
    }
}

#[test]
fn timesteps_and_sigmas_are_monotone_for_every_sampler_and_model() {
    for model in MODELS {
        let cfg = model_config(model);
        for &kind in SamplerKind::ALL {
            let mut s = build_scheduler(kind, &cfg).unwrap();
            for n in [1usize, 2, 4, 7, 20, 50] {
                // LCM takes at most its 50 distillation steps; PNDM's PRK needs 4 (skipped here).
                s.set_timesteps(n).unwrap();
                let ts = s.timesteps();
                assert!(!ts.is_empty(), "{kind} {model} n={n}: no timesteps");
                assert!(
                    ts.windows(2).all(|w| w[1] <= w[0]),
                    "{kind} {model} n={n}: timesteps not non-increasing: {ts:?}"
                );
                assert!(
                    ts.iter().all(|&t| (0.0..1000.0).contains(&t)),
                    "{kind} {model} n={n}: timestep out of range: {ts:?}"
                );
                if let Some(sigmas) = s.sigmas() {
                    assert!(
                        sigmas.windows(2).all(|w| w[1] <= w[0]) && sigmas.iter().all(|&v| v >= 0.0),
                        "{kind} {model} n={n}: sigmas not non-increasing: {sigmas:?}"
                    );
                }
                // > 0, not ≥ 1: diffusers' `linspace` spacing with one step starts at t = 0.
                assert!(s.init_noise_sigma() > 0.0, "{kind}: init_noise_sigma");
            }
        }
    }
}

/// add_noise(x₀, ε, t) then a step with the exact ε (or the exact v) lands on
/// add_noise(x₀, ε, t_prev): DDIM (η = 0) is exact for a perfect model, and so is every
/// first-order step of Euler and DPM-Solver++.
#[test]
fn add_noise_then_exact_step_lands_on_the_implied_sample() {
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &dev).unwrap();
    let eps = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &dev).unwrap();
    let cases = [
        (SamplerKind::Ddim, "stable-diffusion-v1-5"),
        (SamplerKind::Ddim, "stable-diffusion-2-1"),
        (SamplerKind::Euler, "stable-diffusion-xl-base-1.0"),
        (SamplerKind::Euler, "stable-diffusion-2-1"),
        (SamplerKind::DpmPp2m, "stable-diffusion-v1-5"),
        (SamplerKind::DpmPp2m, "stable-diffusion-2-1"),
    ];
    for (kind, model) in cases {
        let mut s = build_scheduler(kind, &model_config(model)).unwrap();
        // n = 1 keeps DPM-Solver++ first order; 10 exercises DDIM and Euler along the way.
        for n in [1usize, 10] {
            if kind == SamplerKind::DpmPp2m && n > 1 {
                continue;
            }
            s.set_timesteps(n).unwrap();
            let ts = s.timesteps().to_vec();
            for (i, &t) in ts.iter().enumerate() {
                s.set_timesteps(n).unwrap();
                s.set_begin_index(i);
                let xt = s.add_noise(&x0, &eps, t).unwrap();
                // The exact model output for (x₀, ε): ε, or v computed through the inverse map.
                let out = match s.prediction_type() {
                    PredictionType::Epsilon => eps.clone(),
                    _ => s.model_output_from_pred_original(&x0, t, &xt).unwrap(),
                };
                let prev = s.step(&out, t, &xt, &mut Zeros).unwrap();
                let want = if i + 1 < ts.len() {
                    let mut r = build_scheduler(kind, &model_config(model)).unwrap();
                    r.set_timesteps(n).unwrap();
                    r.set_begin_index(i + 1);
                    r.add_noise(&x0, &eps, ts[i + 1]).unwrap()
                } else if kind == SamplerKind::Ddim {
                    // After the last step DDIM lands on ᾱ₀ (set_alpha_to_one = false).
                    continue;
                } else {
                    x0.clone()
                };
                // 2e-4 absolute: samples are O(1)–O(15) in float32, and v is reconstructed.
                let e = max_abs_diff(&prev, &want);
                assert!(e < 2e-4, "{kind} {model} n={n} step {i} (t={t}): off by {e}");
            }
        }
    }
}

#[test]
fn pred_original_and_its_inverse_round_trip_for_every_sampler() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 3.0, (1, 4, 4, 4), &dev).unwrap();
    let out = Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &dev).unwrap();
    for model in MODELS {
        for pred in ["epsilon", "v_prediction", "sample"] {
            let mut cfg = model_config(model);
            cfg.prediction_type = Some(pred.to_owned());
            for &kind in SamplerKind::ALL {
                let Ok(mut s) = ltd_scheduler::build(&cfg, Some(kind), &Default::default()) else {
                    // PNDM and Euler ancestral reject `sample` (as diffusers does).
                    assert_eq!(pred, "sample", "{kind} rejected {pred}");
                    continue;
                };
                s.set_timesteps(10).unwrap();
                for &t in s.timesteps().to_vec().iter().step_by(3) {
                    let x0 = s.pred_original_sample(&out, t, &x).unwrap();
                    let back = s.model_output_from_pred_original(&x0, t, &x).unwrap();
                    // 1e-3 absolute: near t = 0, ε ↔ x₀ divides by σ ≈ 0.03.
                    let e = max_abs_diff(&back, &out);
                    assert!(e < 1e-3, "{kind} {model} {pred} t={t}: off by {e}");
                }
            }
        }
    }
}

#[test]
fn the_model_configs_build_the_samplers_they_ship() {
    for (model, class, pred) in [
        ("stable-diffusion-v1-5", "PNDMScheduler", PredictionType::Epsilon),
        ("stable-diffusion-2-1", "DDIMScheduler", PredictionType::VPrediction),
        ("stable-diffusion-xl-base-1.0", "EulerDiscreteScheduler", PredictionType::Epsilon),
    ] {
        let s = load_scheduler(&configs_dir().join(model).join("scheduler/scheduler_config.json"))
            .unwrap();
        assert_eq!(s.class_name(), class, "{model}");
        assert_eq!(s.prediction_type(), pred, "{model}");
    }
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pipelines");
    for (pipe, class) in
        [("sd1", "PNDMScheduler"), ("sd2", "DDIMScheduler"), ("sdxl", "EulerDiscreteScheduler")]
    {
        let s =
            load_scheduler(&fixtures.join(pipe).join("scheduler/scheduler_config.json")).unwrap();
        assert_eq!(s.class_name(), class, "{pipe}");
    }
}

/// Inputs in half precision come back in half precision, computed in float32 inside.
#[test]
fn samplers_return_the_sample_dtype() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev).unwrap().to_dtype(DType::F16).unwrap();
    for &kind in SamplerKind::ALL {
        let mut s = build_scheduler(kind, &model_config("stable-diffusion-v1-5")).unwrap();
        s.set_timesteps(4).unwrap();
        let t = s.timesteps()[0];
        let mut rng = ReplayNoise::new(
            Some(Tensor::zeros((8, 1, 4, 2, 2), DType::F32, &dev).unwrap()),
            &[1, 4, 2, 2],
        );
        let y = s.step(&x, t, &x, &mut rng).unwrap();
        assert_eq!(y.dtype(), DType::F16, "{kind}");
    }
}
