//! The schedule tables and the training-side helpers against diffusers.
//!
//! Tolerances: ᾱ tables bit-exact (we reproduce torch's float32 linspace and cumprod), except
//! the zero-terminal-SNR rescale, which takes a float32 sqrt: torch's (MKL's) is accurate to
//! 0.75 ulp, not correctly rounded, and the rescale's shift (√ᾱ − √ᾱ_T), ratios and cumprod
//! carry that along, so there |Δᾱ| ≤ 1e-6·ᾱ + 1e-9 (the absolute term for ᾱ → 0, where the
//! shift cancels); add_noise / get_velocity 1e-6 absolute (float32 products of O(1) values);
//! SNR = ᾱ/(1−ᾱ) relative 1e-6 plus the ᾱ tolerance propagated, Δᾱ/(ᾱ(1−ᾱ)).

mod common;

use candle_core::{Device, Tensor};
use common::{configs_dir, golden};
use ltd_scheduler::{NoiseSchedule, PredictionType, SchedulerConfig};
use ltd_test_support::max_abs_diff_f64 as max_abs;

fn config(json: &str) -> SchedulerConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn alphas_cumprod_are_bit_exact() {
    let sd = r#""beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear""#;
    let cases = [
        ("linear", "{}".to_owned()),
        ("scaled_linear", format!("{{{sd}}}")),
        ("squaredcos", r#"{"beta_schedule": "squaredcos_cap_v2"}"#.to_owned()),
        ("zerosnr", format!("{{{sd}, \"rescale_betas_zero_snr\": true}}")),
        (
            "short_linear",
            r#"{"num_train_timesteps": 37, "beta_start": 0.001, "beta_end": 0.03}"#.to_owned(),
        ),
    ];
    for (name, json) in cases {
        let ours = NoiseSchedule::from_config(&config(&json)).unwrap();
        let want = golden().tables[&format!("alphas_cumprod/{name}")].to_vec1::<f32>().unwrap();
        let (rel_tol, abs_tol) = if name == "zerosnr" { (1e-6, 1e-9) } else { (0.0, 0.0) };
        let worst = ours
            .alphas_cumprod()
            .iter()
            .zip(&want)
            .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs())
            .max()
            .unwrap_or(0);
        println!("{name}: max ulp difference {worst}");
        let mismatches: Vec<_> = ours
            .alphas_cumprod()
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (a, b))| {
                (f64::from(**a) - f64::from(**b)).abs() > rel_tol * f64::from(**b) + abs_tol
            })
            .map(|(i, (a, b))| (i, *a, *b))
            .collect();
        assert_eq!(ours.alphas_cumprod().len(), want.len(), "{name}");
        assert!(
            mismatches.is_empty(),
            "{name}: {} mismatches, first {:?}",
            mismatches.len(),
            &mismatches[..mismatches.len().min(5)]
        );
    }
}

#[test]
fn training_add_noise_velocity_and_snr_match_diffusers() {
    let t = &golden().tables;
    let x0 = &t["training/x0"];
    let noise = &t["training/noise"];
    let steps: Vec<usize> =
        t["training/timesteps"].to_vec1::<f64>().unwrap().iter().map(|&v| v as usize).collect();
    let sd21 = SchedulerConfig::load(
        &configs_dir().join("stable-diffusion-2-1/scheduler/scheduler_config.json"),
    )
    .unwrap();
    let mut zerosnr = sd21.clone();
    zerosnr.rescale_betas_zero_snr = Some(true);
    for (name, cfg, rel_tol, abs_tol) in
        [("sd21", sd21, 0.0, 0.0), ("zerosnr", zerosnr, 1e-6, 1e-9)]
    {
        let s = NoiseSchedule::from_config(&cfg).unwrap();
        assert_eq!(s.prediction_type(), PredictionType::VPrediction);
        let noisy = s.add_noise(x0, noise, &steps).unwrap();
        let e = max_abs(&noisy, &t[&format!("training/{name}/add_noise")]);
        assert!(e <= 1e-6, "{name} add_noise off by {e}");
        let v = s.get_velocity(x0, noise, &steps).unwrap();
        let e = max_abs(&v, &t[&format!("training/{name}/velocity")]);
        assert!(e <= 1e-6, "{name} velocity off by {e}");
        let e = max_abs(&s.target(x0, noise, &steps).unwrap(), &v);
        assert_eq!(e, 0.0, "{name}: the v-prediction target is the velocity");
        let snr = t[&format!("training/{name}/snr")].to_vec1::<f64>().unwrap();
        for (i, &want) in snr.iter().enumerate() {
            let got = s.snr(i).unwrap();
            let alpha_bar = f64::from(s.alphas_cumprod()[i]);
            let d_alpha = rel_tol * alpha_bar + abs_tol;
            let tol = want.abs() * (1e-6 + d_alpha / (alpha_bar * (1.0 - alpha_bar)).max(1e-30));
            assert!((got - want).abs() <= tol, "{name} snr({i}) = {got}, diffusers {want}");
        }
    }
}

#[test]
fn prediction_conversions_invert_each_other() {
    let s = NoiseSchedule::from_config(&SchedulerConfig::default()).unwrap();
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
    let eps = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
    let kinds = [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample];
    for t in [1usize, 250, 500, 900] {
        let steps = [t, t];
        let xt = s.add_noise(&x0, &eps, &steps).unwrap();
        let outputs = [eps.clone(), s.get_velocity(&x0, &eps, &steps).unwrap(), x0.clone()];
        for (i, from) in kinds.iter().enumerate() {
            for (j, to) in kinds.iter().enumerate() {
                let converted = s.convert(&outputs[i], *from, *to, &xt, t).unwrap();
                // 1e-3 absolute: ε from x₀ near t = 1 divides by √(1−ᾱ) ≈ 0.01 (f32 rounding ×100).
                let e = max_abs(&converted, &outputs[j]);
                assert!(e <= 1e-3, "t={t} {from}->{to}: off by {e}");
                let back = s.convert(&converted, *to, *from, &xt, t).unwrap();
                let e = max_abs(&back, &outputs[i]);
                assert!(e <= 1e-3, "t={t} {from}->{to}->{from}: off by {e}");
            }
        }
    }
}
