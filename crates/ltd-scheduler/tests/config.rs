//! Config reading, sampler names and the error messages users see.

mod common;

use std::path::Path;

use common::{configs_dir, golden_dir};
use ltd_scheduler::{build, build_scheduler, load_scheduler, SamplerKind, SchedulerConfig};

fn cfg(json: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(json, Path::new("scheduler_config.json")).unwrap()
}

fn build_err(json: &str) -> String {
    match build(&cfg(json), None, &Default::default()) {
        Ok(s) => panic!("{json} built {}", s.class_name()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sampler_names_round_trip_and_unknown_names_list_the_known_ones() {
    for &kind in SamplerKind::ALL {
        assert_eq!(kind.name().parse::<SamplerKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.name());
    }
    assert_eq!(
        SamplerKind::names(),
        [
            "ddpm",
            "ddim",
            "pndm",
            "euler",
            "euler-a",
            "heun",
            "lms",
            "dpm++2m",
            "dpm++2m-karras",
            "dpm++2m-sde",
            "dpm++2s",
            "unipc",
            "lcm"
        ]
    );
    let err = "dpm++3m".parse::<SamplerKind>().unwrap_err().to_string();
    assert!(err.contains("\"dpm++3m\"") && err.contains("euler-a, heun"), "{err}");
}

#[test]
fn config_errors_name_the_field_and_value() {
    for (json, expect) in [
        (
            r#"{"_class_name": "KDPM2DiscreteScheduler"}"#,
            "`_class_name`: unsupported value \"KDPM2DiscreteScheduler\"",
        ),
        (r#"{"beta_end": 0.02}"#, "`_class_name`: missing"),
        (
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "cosine"}"#,
            "`beta_schedule`: unsupported value \"cosine\"",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "even"}"#,
            "`timestep_spacing`: unsupported value \"even\"",
        ),
        (
            r#"{"_class_name": "DDPMScheduler", "prediction_type": "flow"}"#,
            "`prediction_type`: unsupported value \"flow\"",
        ),
        (
            r#"{"_class_name": "DDPMScheduler", "variance_type": "fixed_large_log"}"#,
            "`variance_type`: unsupported value \"fixed_large_log\"",
        ),
        (
            r#"{"_class_name": "DDPMScheduler", "variance_type": "learned_rang"}"#,
            "`variance_type`: unsupported value \"learned_rang\"",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "variance_type": "fixed_medium"}"#,
            "`variance_type`: unsupported value \"fixed_medium\"",
        ),
        (
            r#"{"_class_name": "PNDMScheduler", "prediction_type": "sample"}"#,
            "`prediction_type`: unsupported value \"sample\"",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}"#,
            "`algorithm_type`: unsupported value \"dpmsolver\"",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}"#,
            "`solver_order`: unsupported value 4",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_exponential_sigmas": true}"#,
            "`use_exponential_sigmas`: unsupported value true",
        ),
        (
            r#"{"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}"#,
            "`solver_type`: unsupported value \"bh1\" with final_sigmas_type \"zero\"",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "one"}"#,
            "`final_sigmas_type`: unsupported value \"one\"",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}"#,
            "`trained_betas`: has 2 values but num_train_timesteps is 1000",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "thresholding": true, "dynamic_thresholding_ratio": 2.0}"#,
            "`dynamic_thresholding_ratio`",
        ),
    ] {
        let err = build_err(json);
        assert!(err.contains(expect), "{json}: {err}");
    }
}

#[test]
fn file_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("ltd-scheduler-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "sigmoid"}"#,
    )
    .unwrap();
    let err = load_scheduler(&path).err().unwrap().to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(err.contains("`beta_schedule`: unsupported value \"sigmoid\""), "{err}");
    std::fs::write(&path, r#"{"_class_name": "EulerDiscreteScheduler", "steps_offset": "one"}"#)
        .unwrap();
    let err = load_scheduler(&path).err().unwrap().to_string();
    assert!(err.contains("steps_offset") && err.starts_with(&path.display().to_string()), "{err}");
    let missing = dir.join("nope.json");
    assert!(load_scheduler(&missing).err().unwrap().to_string().contains("nope.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zero_and_too_many_steps_are_errors() {
    let sd15 = SchedulerConfig::load(
        &configs_dir().join("stable-diffusion-v1-5/scheduler/scheduler_config.json"),
    )
    .unwrap();
    for &kind in SamplerKind::ALL {
        let mut s = build_scheduler(kind, &sd15).unwrap();
        let err = s.set_timesteps(0).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{kind}: {err}");
    }
    let mut lcm = build_scheduler(SamplerKind::Lcm, &sd15).unwrap();
    assert!(lcm.set_timesteps(51).is_err(), "LCM takes at most original_inference_steps");
    let mut ddim = build_scheduler(SamplerKind::Ddim, &sd15).unwrap();
    assert!(ddim.set_timesteps(1001).is_err(), "DDIM takes at most num_train_timesteps");
    let mut prk =
        build(&cfg(r#"{"_class_name": "PNDMScheduler"}"#), None, &Default::default()).unwrap();
    let err = prk.set_timesteps(3).unwrap_err().to_string();
    assert!(err.contains("at least 4"), "{err}");
}

#[test]
fn stepping_before_set_timesteps_or_off_schedule_is_an_error() {
    let x = candle_core::Tensor::zeros(
        (1, 4, 2, 2),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut rng = common::ReplayNoise::new(None, &[1, 4, 2, 2]);
    for kind in [SamplerKind::Ddim, SamplerKind::DpmPp2m, SamplerKind::UniPc, SamplerKind::Lcm] {
        let mut s = build_scheduler(kind, &SchedulerConfig::default()).unwrap();
        assert!(s.step(&x, 999.0, &x, &mut rng).is_err(), "{kind}");
    }
    let mut euler = build_scheduler(SamplerKind::Euler, &SchedulerConfig::default()).unwrap();
    euler.set_timesteps(10).unwrap();
    let err = euler.step(&x, 123.5, &x, &mut rng).unwrap_err().to_string();
    assert!(err.contains("123.5"), "{err}");
}

/// diffusers' from_config: the new class reads only the fields it knows, with its own
/// defaults for fields the file did not have (SD 1.5's PNDM config has no timestep_spacing:
/// Euler then uses its default `linspace`, not PNDM's `leading`).
#[test]
fn swapping_classes_uses_the_new_class_defaults_for_missing_fields() {
    let sd15 = SchedulerConfig::load(
        &configs_dir().join("stable-diffusion-v1-5/scheduler/scheduler_config.json"),
    )
    .unwrap();
    let mut euler = build_scheduler(SamplerKind::Euler, &sd15).unwrap();
    euler.set_timesteps(3).unwrap();
    // linspace(0, 999, 3) reversed; leading + steps_offset would give [667, 334, 1].
    assert_eq!(euler.timesteps(), &[999.0, 499.5, 0.0]);
    let mut pndm = build_scheduler(SamplerKind::Pndm, &sd15).unwrap();
    pndm.set_timesteps(3).unwrap();
    assert_eq!(pndm.timesteps(), &[667.0, 334.0, 334.0, 1.0]);
}

#[test]
fn diffusers_saved_configs_with_infinity_load() {
    let s = load_scheduler(&golden_dir().join("configs/dpm-saved/scheduler_config.json")).unwrap();
    assert_eq!(s.class_name(), "DPMSolverMultistepScheduler");
    let text =
        std::fs::read_to_string(golden_dir().join("configs/dpm-saved/scheduler_config.json"))
            .unwrap();
    assert!(text.contains("-Infinity"), "the fixture should exercise -Infinity");
}
