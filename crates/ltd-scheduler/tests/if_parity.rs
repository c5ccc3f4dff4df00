//! DeepFloyd IF's samplers at parity with diffusers 0.42.1 on the committed goldens
//! (`tests/fixtures/gen/if_schedulers.py`): a model output of twice the sample's 3 channels
//! (ε, then the variance value), DDPM with `learned_range` / `learned`, with and without
//! dynamic thresholding, on IF's stage I and II configs (`configs/IF-*`), DPM-Solver++
//! multistep and singlestep keeping the first 3 channels, with diffusers' recorded noise
//! replayed (every draw must have the 3-channel sample's shape); and stage II's
//! `image_noising_scheduler.add_noise`.
//!
//! Tolerances (as `parity.rs`): trajectories e = max |ours − diffusers| / max(max |diffusers|, 1)
//! ≤ 1e-5 after every step (the learned-range σ goes through float32 ln and exp, whose last
//! bit may differ from torch's, and dynamic thresholding divides by a float32 quantile: both
//! stay orders of magnitude below the bound); timesteps |Δ| ≤ 1e-3; init_noise_sigma relative
//! ≤ 1e-6; add_noise max |Δ| ≤ 1e-6 (values within ±5).

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::{configs_dir, model, rel_err, ReplayNoise};
use ltd_scheduler::{
    build, build_scheduler, load_scheduler, SamplerKind, SamplerOptions, Scheduler, SchedulerConfig,
};
use ltd_test_support::{fixtures, max_abs_diff_f64};

const TRAJECTORY_TOL: f64 = 1e-5;
const TIMESTEP_TOL: f64 = 1e-3;
const ADD_NOISE_TOL: f64 = 1e-6;

struct Golden {
    cases: Vec<serde_json::Value>,
    noise_levels: Vec<u64>,
    tensors: HashMap<String, Tensor>,
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let dir = fixtures().join("golden/if_schedulers");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        Golden {
            cases: manifest["cases"].as_array().unwrap().clone(),
            noise_levels: manifest["noise_levels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect(),
            tensors: candle_core::safetensors::load(
                dir.join("trajectories.safetensors"),
                &Device::Cpu,
            )
            .unwrap(),
        }
    })
}

/// The generator's stand-in variance channels: v = clamp(k·x, −1, 1), k = 0.9 cos(t/61); for
/// `learned` the positive |v|·0.02.
fn variance(x_in: &Tensor, t: f64, kind: &str) -> Tensor {
    let v = x_in.affine(0.9 * (t / 61.0).cos(), 0.0).unwrap().clamp(-1f32, 1f32).unwrap();
    match kind {
        "positive" => v.abs().unwrap().affine(0.02, 0.0).unwrap(),
        _ => v,
    }
}

fn build_case(case: &serde_json::Value) -> Box<dyn Scheduler> {
    if let Some(kind) = case["kind"].as_str() {
        let cfg: SchedulerConfig = serde_json::from_value(case["source"].clone()).unwrap();
        build_scheduler(kind.parse::<SamplerKind>().unwrap(), &cfg).unwrap()
    } else {
        let cfg: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        build(&cfg, None, &SamplerOptions::default()).unwrap()
    }
}

/// Runs one case; the largest trajectory error.
fn run_case(case: &serde_json::Value) -> Result<f64, String> {
    let g = golden();
    let name = case["name"].as_str().unwrap();
    let err = |m: String| format!("{name}: {m}");
    let shape_key = case["shape"].as_str().unwrap();
    let data = &g.tensors[&format!("inputs/{shape_key}/data")];
    let noise0 = &g.tensors[&format!("inputs/{shape_key}/noise")];
    let traj = &g.tensors[&format!("{name}/trajectory")];
    let golden_ts = g.tensors[&format!("{name}/timesteps")].to_vec1::<f64>().unwrap();
    let mut rng = ReplayNoise::new(g.tensors.get(&format!("{name}/noise")).cloned(), data.dims());
    let var_kind = case["variance"].as_str().unwrap();

    let mut s = build_case(case);
    if !s.takes_learned_variance() {
        return Err(err("does not take the variance channels".into()));
    }
    if s.class_name() != case["class_name"].as_str().unwrap() {
        return Err(err(format!("built {} not {}", s.class_name(), case["class_name"])));
    }
    if s.order() as u64 != case["order"].as_u64().unwrap() {
        return Err(err(format!("order {}", s.order())));
    }
    s.set_timesteps(case["steps"].as_u64().unwrap() as usize).map_err(|e| err(e.to_string()))?;
    let ts = s.timesteps().to_vec();
    let max_dt = ts.iter().zip(&golden_ts).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    if ts.len() != golden_ts.len() || max_dt > TIMESTEP_TOL {
        return Err(err(format!("timesteps {ts:?} vs {golden_ts:?}")));
    }
    let sigma = s.init_noise_sigma();
    let want = case["init_noise_sigma"].as_f64().unwrap();
    if ((sigma - want) / want).abs() > 1e-6 {
        return Err(err(format!("init_noise_sigma {sigma} vs {want}")));
    }
    let mut x = noise0.affine(sigma, 0.0).unwrap();
    let mut max_err = rel_err(&x, &traj.get(0).unwrap());
    let pred = s.prediction_type();
    for (k, &t) in ts.iter().enumerate() {
        let x_in = s.scale_model_input(&x, t).map_err(|e| err(e.to_string()))?;
        let out =
            Tensor::cat(&[model(&x_in, t, data, pred), variance(&x_in, t, var_kind)], 1).unwrap();
        x = s.step(&out, t, &x, &mut rng).map_err(|e| err(format!("step {k}: {e}")))?;
        let e = rel_err(&x, &traj.get(k + 1).unwrap());
        max_err = max_err.max(e);
        if e > TRAJECTORY_TOL {
            return Err(err(format!("step {k} (t = {t}) off by {e:.3e}")));
        }
    }
    if rng.used != rng.available() {
        return Err(err(format!(
            "drew {} noise tensors, diffusers drew {}",
            rng.used,
            rng.available()
        )));
    }
    println!("{name:<24} evals {:>3}  max rel err {max_err:.2e}  max |dt| {max_dt:.1e}", ts.len());
    Ok(max_err)
}

fn check_class(class: &str) {
    let cases: Vec<_> =
        golden().cases.iter().filter(|c| c["class_name"].as_str() == Some(class)).collect();
    assert!(!cases.is_empty(), "no golden cases for {class}");
    let (mut failures, mut worst) = (Vec::new(), 0f64);
    for case in cases {
        match run_case(case) {
            Ok(e) => worst = worst.max(e),
            Err(e) => failures.push(e),
        }
    }
    println!("{class} on IF: worst trajectory error {worst:.2e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ddpm_learned_range_matches_diffusers() {
    check_class("DDPMScheduler");
}

#[test]
fn dpm_solver_multistep_on_if_matches_diffusers() {
    check_class("DPMSolverMultistepScheduler");
}

#[test]
fn dpm_solver_singlestep_on_if_matches_diffusers() {
    check_class("DPMSolverSinglestepScheduler");
}

/// The committed IF configs load as the classes they name, and the goldens cover both stages,
/// thresholding on and off, and the SDE noise.
#[test]
fn if_configs_load_and_goldens_cover_them() {
    for dir in
        ["IF-I-XL-v1.0/scheduler", "IF-II-L-v1.0/scheduler", "IF-II-L-v1.0/image_noising_scheduler"]
    {
        let s = load_scheduler(&configs_dir().join(dir).join("scheduler_config.json")).unwrap();
        assert_eq!(s.class_name(), "DDPMScheduler", "{dir}");
        // The image-noising scheduler only adds noise: a fixed variance.
        assert_eq!(s.takes_learned_variance(), !dir.contains("noising"), "{dir}");
    }
    let names: Vec<&str> = golden().cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for prefix in ["ddpm-if1-", "ddpm-if1-clip-", "ddpm-if1-noclip-", "ddpm-if2-", "dpm2m-sde-if1-"]
    {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "no {prefix}* case");
    }
}

/// IFSuperResolutionPipeline's `image_noising_scheduler.add_noise(upscaled, noise, noise_level)`
/// on a never-stepped DDPM of the stage II config.
#[test]
fn image_noising_scheduler_add_noise_matches_diffusers() {
    let g = golden();
    let path = configs_dir().join("IF-II-L-v1.0/image_noising_scheduler/scheduler_config.json");
    let s = load_scheduler(&path).unwrap();
    let (image, noise) = (&g.tensors["noising/image"], &g.tensors["noising/noise"]);
    for &level in &g.noise_levels {
        let ours = s.add_noise(image, noise, level as f64).unwrap();
        let diff = max_abs_diff_f64(&ours, &g.tensors[&format!("noising/{level}")]);
        println!("noise_level {level:>3}: max |Δ| {diff:.2e}");
        assert!(diff <= ADD_NOISE_TOL, "noise_level {level}: off by {diff:.3e}");
    }
}

/// Samplers other than DDPM and the DPM-Solvers, swapped in from IF's config, take the
/// prediction half only (the pipeline splits for them).
#[test]
fn other_samplers_do_not_take_the_variance_channels() {
    let path = configs_dir().join("IF-I-XL-v1.0/scheduler/scheduler_config.json");
    let cfg = SchedulerConfig::load(&path).unwrap();
    for kind in SamplerKind::ALL {
        let s = build_scheduler(*kind, &cfg).unwrap();
        let takes = s.takes_learned_variance();
        let expected = matches!(
            s.class_name(),
            "DDPMScheduler" | "DPMSolverMultistepScheduler" | "DPMSolverSinglestepScheduler"
        );
        assert_eq!(takes, expected, "{kind}");
    }
}

/// A learned variance needs the variance channels: a 3-channel output is a clear error, not a
/// panic; a half-precision 6-channel output steps and keeps the sample's dtype and shape.
#[test]
fn learned_range_needs_twice_the_channels() {
    let path = configs_dir().join("IF-I-XL-v1.0/scheduler/scheduler_config.json");
    let mut s = load_scheduler(&path).unwrap();
    s.set_timesteps(4).unwrap();
    let t = s.timesteps()[0];
    let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let draws = Tensor::zeros((1, 1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut rng = ReplayNoise::new(Some(draws), &[1, 3, 2, 2]);
    let e = s.step(&x, t, &x, &mut rng).unwrap_err().to_string();
    assert!(e.contains("learned_range") && e.contains("twice"), "{e}");

    let x16 = x.to_dtype(DType::F16).unwrap();
    let out = Tensor::zeros((1, 6, 2, 2), DType::F16, &Device::Cpu).unwrap();
    let y = s.step(&out, t, &x16, &mut rng).unwrap();
    assert_eq!((y.dtype(), y.dims()), (DType::F16, &[1, 3, 2, 2][..]));
}
