//! A parameter group at learning rate 0 is frozen: the driver gives it no optimiser step and
//! keeps its gradients out of the clipping norm, so a run whose loss still reaches the frozen
//! variables trains the others exactly as a run given their values as constants does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ltd_nn::rng::TorchRng;
use ltd_train::common::OptimOptions;
use ltd_train::driver::{Driver, Loss, ParamGroup, Task};
use ltd_train::shards::Shard;
use ltd_train::RunControl;
use serde_json::{json, Value};

/// `loss = Σ (a ⊙ z − 1)²` with `z` the frozen variable (`Some(group)`) or a constant.
struct Toy {
    optim: OptimOptions,
    train: Vec<usize>,
    a: Tensor,
    z: Tensor,
    frozen: bool,
    /// `z` when the first loss was taken (after the driver's initialisation).
    z_initial: Option<Vec<f32>>,
}

impl Task for Toy {
    type Exported = HashMap<String, Tensor>;
    type Batch = ();

    fn optim(&self) -> &OptimOptions {
        &self.optim
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        let group = ParamGroup { prefix: "z.", learning_rate: 0.0, option: "z-lr" };
        if self.frozen {
            vec![group]
        } else {
            Vec::new()
        }
    }

    fn train_indices(&self) -> &[usize] {
        &self.train
    }

    fn prepare(&mut self, _batch: &[usize], _rng: &mut TorchRng) -> ltd_train::Result<()> {
        if self.z_initial.is_none() {
            self.z_initial = Some(self.z.flatten_all()?.to_vec1()?);
        }
        Ok(())
    }

    fn loss(&self, _batch: &(), shard: &Shard) -> ltd_train::Result<Loss> {
        // The same loss for every example: each shard weights it by its share.
        let total = shard.weighted(((&self.a * &self.z)? - 1.0)?.sqr()?.sum_all()?)?;
        Ok(Loss { total, terms: Vec::new() })
    }

    fn previews(&self) -> bool {
        false
    }

    fn preview(&self, _path: &Path) -> ltd_train::Result<()> {
        Ok(())
    }

    fn export(
        &self,
        weights: HashMap<String, Tensor>,
        _sink: ltd_train::progress::Sink,
    ) -> ltd_train::Result<Self::Exported> {
        Ok(weights)
    }
}

fn options() -> OptimOptions {
    OptimOptions {
        batch_size: 2,
        steps: 4,
        learning_rate: 0.1,
        // Far below the gradient norm (about 2): clipping is active at every step.
        max_grad_norm: 1e-2,
        checkpoint_every: 100,
        seed: 3,
        ..Default::default()
    }
}

/// Trains the toy; `z_const`: `z` as a constant instead of a frozen variable. Returns the
/// exported weights and `z`'s value at the first step.
fn run(out: &Path, z_const: Option<&Tensor>) -> (HashMap<String, Tensor>, Vec<f32>) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    // `a` sorts first, so its initialisation draws are the same in both runs.
    let a = vb.get((4, 4), "a.weight").unwrap();
    let z = match z_const {
        Some(z) => z.clone(),
        None => vb.get((4, 4), "z.weight").unwrap(),
    };
    let mut task = Toy {
        optim: options(),
        train: (0..4).collect(),
        a,
        z,
        frozen: z_const.is_none(),
        z_initial: None,
    };
    let saved = json!({});
    let mut driver: Driver<Value> = Driver::new(out, "toy", RunControl::default(), &dev);
    let saved = driver.options(|| saved).unwrap();
    driver.start(4, &mut |_| {}).unwrap();
    let trained = driver.train(&saved, &varmap, &mut task, &mut |_| {}).unwrap();
    (trained.exported.unwrap(), task.z_initial.unwrap())
}

#[test]
fn a_frozen_group_trains_the_rest_as_constants_would() {
    let dir = tempfile::tempdir().unwrap();
    let (frozen, z0) = run(&dir.path().join("frozen"), None);
    let z_exported: Vec<f32> = frozen["z.weight"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(z_exported, z0, "the frozen variable moved");

    let z_const = Tensor::from_vec(z0, (4, 4), &Device::Cpu).unwrap();
    let (given, _) = run(&dir.path().join("given"), Some(&z_const));
    let a = |w: &HashMap<String, Tensor>| -> Vec<f32> {
        w["a.weight"].flatten_all().unwrap().to_vec1().unwrap()
    };
    assert!(!given.contains_key("z.weight"));
    assert_eq!(a(&frozen), a(&given), "the trained variable differs");
}
