//! Deterministic initialisation of freshly built models.
//!
//! candle's `VarMap` draws initial values from an unseeded thread-local generator, so two runs
//! with the same seed would start from different weights. After building a model on a
//! `VarMap` we therefore overwrite every variable, in name order, from a seeded
//! [`TorchRng`], following PyTorch's default rules (the ones diffusers and transformers models
//! get when trained from scratch):
//!
//! - `Linear` / `Conv2d` weights and biases: `U(−1/√fan_in, 1/√fan_in)`
//!   (`kaiming_uniform_(a=√5)` and the matching bias bound);
//! - normalisation layers (1-D `weight` with a 1-D `bias`): weight 1, bias 0;
//! - embedding tables (`…embedding.weight` with no sibling bias): `N(0, 0.02²)`, transformers'
//!   `initializer_range` for CLIP.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use ltd_nn::rng::TorchRng;

use crate::error::Result;

/// The standard deviation of embedding tables.
const EMBEDDING_STD: f32 = 0.02;

/// How one variable is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Uniform(f32),
    Normal(f32),
    Const(f32),
}

fn rule(name: &str, shape: &[usize], shapes: &HashMap<String, Vec<usize>>) -> Rule {
    let (stem, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let sibling = |leaf: &str| shapes.get(&format!("{stem}.{leaf}"));
    let fan_in = |w: &[usize]| w.iter().skip(1).product::<usize>().max(1) as f32;
    match leaf {
        "weight" if shape.len() == 1 => Rule::Const(1.0),
        "weight" if name.ends_with("embedding.weight") && sibling("bias").is_none() => {
            Rule::Normal(EMBEDDING_STD)
        }
        "weight" => Rule::Uniform(1.0 / fan_in(shape).sqrt()),
        "bias" => match sibling("weight") {
            Some(w) if w.len() >= 2 => Rule::Uniform(1.0 / fan_in(w).sqrt()),
            _ => Rule::Const(0.0),
        },
        _ => Rule::Const(0.0),
    }
}

/// Overwrites every variable of `varmap` deterministically from `seed`.
pub fn init_varmap(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = named_vars(varmap)?;
    let shapes: HashMap<String, Vec<usize>> =
        vars.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let mut rng = TorchRng::new(seed);
    for (name, var) in &vars {
        let shape = var.dims();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match rule(name, shape, &shapes) {
            Rule::Const(c) => vec![c; n],
            Rule::Normal(std) => rng.randn_f32(n).into_iter().map(|x| x * std).collect(),
            Rule::Uniform(b) => rng.rand_f32(n).into_iter().map(|u| (2.0 * u - 1.0) * b).collect(),
        };
        let t = Tensor::from_vec(values, shape, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// The variables of `varmap` sorted by name, as the optimiser and checkpoints see them.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap.data().lock().map_err(|_| crate::TrainError::msg("VarMap lock poisoned"))?;
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// The current values of named variables, as f32 tensors ready to save.
pub fn var_tensors(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, var) in vars {
        out.insert(name.clone(), var.as_tensor().to_dtype(DType::F32)?.copy()?);
    }
    Ok(out)
}

/// Sets named variables from saved tensors; every variable must be present with its shape.
pub fn load_vars(vars: &[(String, Var)], tensors: &HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| crate::TrainError::msg(format!("saved weights lack `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(crate::TrainError::msg(format!(
                "saved `{name}` has shape {:?}, the model {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarBuilder;

    #[test]
    fn rules_follow_torch_defaults() {
        let shapes: HashMap<String, Vec<usize>> = [
            ("conv.weight", vec![8, 4, 3, 3]),
            ("conv.bias", vec![8]),
            ("norm.weight", vec![8]),
            ("norm.bias", vec![8]),
            ("embeddings.token_embedding.weight", vec![100, 8]),
            ("time_embedding.linear_1.weight", vec![16, 8]),
            ("time_embedding.linear_1.bias", vec![16]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let r = |n: &str| rule(n, &shapes[n], &shapes);
        assert_eq!(r("conv.weight"), Rule::Uniform(1.0 / 6.0));
        assert_eq!(r("conv.bias"), Rule::Uniform(1.0 / 6.0));
        assert_eq!(r("norm.weight"), Rule::Const(1.0));
        assert_eq!(r("norm.bias"), Rule::Const(0.0));
        assert_eq!(r("embeddings.token_embedding.weight"), Rule::Normal(0.02));
        assert_eq!(r("time_embedding.linear_1.weight"), Rule::Uniform(1.0 / 8f32.sqrt()));
    }

    #[test]
    fn init_is_deterministic() {
        let make = |seed| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            candle_nn::linear(4, 3, vb.pp("lin")).unwrap();
            init_varmap(&vm, seed).unwrap();
            var_tensors(&named_vars(&vm).unwrap()).unwrap()["lin.weight"].to_vec2::<f32>().unwrap()
        };
        assert_eq!(make(1), make(1));
        assert_ne!(make(1), make(2));
        assert!(make(1).iter().flatten().all(|v| v.abs() <= 0.5));
    }
}
