//! AdamW and gradient clipping against torch (golden values from tests/golden/adamw.py), and
//! optimiser state that survives a save and restore.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use ltd_train::optim::{clip_factor, AdamW, AdamWConfig};
use serde_json::Value;

fn golden() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/adamw.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// A GradStore holding `g` for `var` (built by differentiating `sum(var * g)`).
fn grads_for(var: &Var, g: &[f32]) -> GradStore {
    let g = Tensor::new(g, &Device::Cpu).unwrap();
    (var.as_tensor() * g).unwrap().sum_all().unwrap().backward().unwrap()
}

fn cfg(g: &Value) -> (f64, AdamWConfig) {
    let c = &g["config"];
    let betas: Vec<f64> =
        c["betas"].as_array().unwrap().iter().map(|b| b.as_f64().unwrap()).collect();
    (
        c["lr"].as_f64().unwrap(),
        AdamWConfig {
            beta1: betas[0],
            beta2: betas[1],
            eps: c["eps"].as_f64().unwrap(),
            weight_decay: c["weight_decay"].as_f64().unwrap(),
        },
    )
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn adamw_matches_torch() {
    let g = golden();
    let (lr, c) = cfg(&g);
    let var =
        Var::from_tensor(&Tensor::new(floats(&g["initial"]).as_slice(), &Device::Cpu).unwrap())
            .unwrap();
    let mut opt = AdamW::new(vec![("p".into(), var.clone())], c).unwrap();
    for (grad, want) in g["grads"].as_array().unwrap().iter().zip(g["params"].as_array().unwrap()) {
        opt.step(&grads_for(&var, &floats(grad)), lr, 1.0).unwrap();
        // f32 arithmetic in a different order than torch's fused kernels: 1e-6 absolute.
        assert_close(&var.as_tensor().to_vec1::<f32>().unwrap(), &floats(want), 1e-6, "params");
    }
    let state = opt.state_tensors().unwrap();
    assert_close(
        &state["exp_avg.p"].to_vec1::<f32>().unwrap(),
        &floats(&g["exp_avg"]),
        1e-6,
        "exp_avg",
    );
    assert_close(
        &state["exp_avg_sq.p"].to_vec1::<f32>().unwrap(),
        &floats(&g["exp_avg_sq"]),
        1e-7,
        "exp_avg_sq",
    );
}

#[test]
fn clipping_matches_torch() {
    let g = golden();
    let clip = &g["clip"];
    let grads = clip["grads"].as_array().unwrap();
    let a = Var::from_tensor(&Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let b = Var::from_tensor(&Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let ga = Tensor::new(floats(&grads[0]).as_slice(), &Device::Cpu).unwrap();
    let gb = Tensor::new(floats(&grads[1]).as_slice(), &Device::Cpu).unwrap();
    let store = ((a.as_tensor() * ga).unwrap().sum_all().unwrap()
        + (b.as_tensor() * gb).unwrap().sum_all().unwrap())
    .unwrap()
    .backward()
    .unwrap();
    let (norm, factor) =
        clip_factor(&store, [&a, &b].into_iter(), clip["max_norm"].as_f64().unwrap()).unwrap();
    assert!((norm - clip["norm"].as_f64().unwrap()).abs() < 1e-9, "{norm}");
    let clipped = clip["clipped"].as_array().unwrap();
    let scaled: Vec<f32> = floats(&grads[1]).iter().map(|x| x * factor as f32).collect();
    // torch scales in f32: 1e-7 relative.
    assert_close(&scaled, &floats(&clipped[1]), 1e-7, "clipped");
}

#[test]
fn restored_state_continues_identically() {
    let grads = [[0.3f32, -1.0], [0.5, 0.25], [-2.0, 1.0], [0.1, 0.1]];
    let c = AdamWConfig::default();
    let run = |split: Option<usize>| {
        let var = Var::from_tensor(&Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], c).unwrap();
        for (i, g) in grads.iter().enumerate() {
            if split == Some(i) {
                // Save everything, rebuild from scratch, restore.
                let state: HashMap<String, Tensor> = opt.state_tensors().unwrap();
                let weights = var.as_tensor().to_vec1::<f32>().unwrap();
                let steps = opt.steps_taken();
                let var2 =
                    Var::from_tensor(&Tensor::new(weights.as_slice(), &Device::Cpu).unwrap())
                        .unwrap();
                let mut opt2 = AdamW::new(vec![("w".into(), var2.clone())], c).unwrap();
                opt2.load_state(&state, steps).unwrap();
                for g in &grads[i..] {
                    opt2.step(&grads_for(&var2, g), 0.01, 1.0).unwrap();
                }
                return var2.as_tensor().to_vec1::<f32>().unwrap();
            }
            opt.step(&grads_for(&var, g), 0.01, 1.0).unwrap();
        }
        var.as_tensor().to_vec1::<f32>().unwrap()
    };
    let straight = run(None);
    assert_eq!(straight, run(Some(2)), "bit-identical after a restore");
    assert_ne!(straight, [1.0, -1.0]);
}
