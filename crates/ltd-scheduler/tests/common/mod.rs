//! Shared test helpers: the golden files of `tests/fixtures/gen/schedulers.py`, the stand-in
//! model computed exactly as the generator computes it, and a NoiseSource replaying diffusers'
//! recorded draws.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use ltd_scheduler::{NoiseSource, PredictionType};
use ltd_test_support::{fixtures, max_abs_diff_f64, max_abs_f64, workspace_root};

pub fn golden_dir() -> PathBuf {
    fixtures().join("golden/schedulers")
}

pub fn configs_dir() -> PathBuf {
    workspace_root().join("configs")
}

pub struct Golden {
    pub cases: Vec<serde_json::Value>,
    pub tensors: HashMap<String, Tensor>,
    pub tables: HashMap<String, Tensor>,
}

pub fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let dir = golden_dir();
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        Golden {
            cases: manifest["cases"].as_array().unwrap().clone(),
            tensors: candle_core::safetensors::load(
                dir.join("trajectories.safetensors"),
                &Device::Cpu,
            )
            .unwrap(),
            tables: candle_core::safetensors::load(dir.join("tables.safetensors"), &Device::Cpu)
                .unwrap(),
        }
    })
}

/// The generator's stand-in denoiser: ε/v/x₀ for a data point drifting with t under a cosine
/// ᾱ(t), ε gain floored at 1/√(1 − ᾱ + 0.25) so no trajectory amplifies rounding. Scalars in
/// f64, tensor ops in f32, in the generator's order.
pub fn model(x_in: &Tensor, t: f64, data: &Tensor, pred: PredictionType) -> Tensor {
    let ab = ((t / 1000.0 + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
    let d = data.affine(1.0 + 0.2 * (t / 97.0).sin(), 0.0).unwrap();
    if pred == PredictionType::Sample {
        return d;
    }
    let gain = 1.0 / (1.0 - ab + 0.25).sqrt();
    let eps = (x_in - d.affine(a, 0.0).unwrap()).unwrap().affine(gain, 0.0).unwrap();
    match pred {
        PredictionType::Epsilon => eps,
        _ => (eps.affine(a, 0.0).unwrap() - d.affine(s, 0.0).unwrap()).unwrap(),
    }
}

/// Replays recorded draws in order; every draw's shape must match the recording.
pub struct ReplayNoise {
    draws: Option<Tensor>,
    pub used: usize,
    pub shape: Vec<usize>,
}

impl ReplayNoise {
    pub fn new(draws: Option<Tensor>, shape: &[usize]) -> Self {
        Self { draws, used: 0, shape: shape.to_vec() }
    }

    pub fn available(&self) -> usize {
        self.draws.as_ref().map_or(0, |d| d.dims()[0])
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if shape != self.shape.as_slice() {
            candle_core::bail!(
                "draw {} has shape {shape:?}, diffusers drew {:?}",
                self.used,
                self.shape
            );
        }
        let Some(draws) = &self.draws else {
            candle_core::bail!("draw {} but diffusers drew no noise", self.used);
        };
        if self.used >= draws.dims()[0] {
            candle_core::bail!("draw {} but diffusers drew only {}", self.used, draws.dims()[0]);
        }
        let z = draws.get(self.used)?.to_dtype(dtype)?.to_device(device)?;
        self.used += 1;
        Ok(z)
    }
}

/// The trajectory metric: max |ours − diffusers| / max(max |diffusers|, 1).
pub fn rel_err(ours: &Tensor, golden: &Tensor) -> f64 {
    let diff = max_abs_diff_f64(ours, golden);
    let scale = max_abs_f64(golden).max(1.0);
    if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / scale
    }
}
