//! Biased sampling of training timesteps: diffusers' `--timestep_bias_strategy`,
//! `--timestep_bias_multiplier`, `--timestep_bias_portion`, `--timestep_bias_begin` and
//! `--timestep_bias_end` (`train_text_to_image_sdxl.py`, `generate_timestep_weights`).
//!
//! Every timestep has weight 1, those of the chosen part of the schedule `multiplier`; a batch
//! draws its timesteps with probability proportional to the weights. `later` with a multiplier
//! above 1 trains the noisiest steps more, where a sample's layout is decided (which is where
//! make-shapes' position words act; min-SNR-γ gives those steps almost no weight).

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Which timesteps get the multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BiasStrategy {
    /// Uniform sampling (the multiplier is ignored).
    #[default]
    None,
    /// The first `portion` of the timesteps (the least noisy).
    Earlier,
    /// The last `portion` of the timesteps (the noisiest).
    Later,
    /// Timesteps `begin..end`.
    Range,
}

impl std::str::FromStr for BiasStrategy {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "earlier" => Ok(Self::Earlier),
            "later" => Ok(Self::Later),
            "range" => Ok(Self::Range),
            _ => Err(TrainError::option(
                "timestep-bias-strategy",
                format!("`{s}`: expected none, earlier, later or range"),
            )),
        }
    }
}

/// The bias options, with diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TimestepBias {
    /// Which timesteps are biased.
    pub strategy: BiasStrategy,
    /// Their weight relative to the others (> 0; below 1 trains them less).
    pub multiplier: f64,
    /// The fraction of the timesteps `earlier` and `later` bias.
    pub portion: f64,
    /// First biased timestep of `range`.
    pub begin: usize,
    /// One past the last biased timestep of `range`.
    pub end: usize,
}

impl Default for TimestepBias {
    fn default() -> Self {
        Self { strategy: BiasStrategy::None, multiplier: 1.0, portion: 0.25, begin: 0, end: 1000 }
    }
}

impl TimestepBias {
    /// The cumulative sampling distribution over `0..num_timesteps` (last entry 1), or `None`
    /// for uniform sampling; invalid options are errors naming the flag.
    pub fn cdf(&self, num_timesteps: usize) -> Result<Option<Vec<f64>>> {
        let biased = match self.strategy {
            BiasStrategy::None => return Ok(None),
            BiasStrategy::Earlier | BiasStrategy::Later => {
                if !(self.portion > 0.0 && self.portion <= 1.0) {
                    return Err(TrainError::option(
                        "timestep-bias-portion",
                        format!("{} is not in (0, 1]", self.portion),
                    ));
                }
                // diffusers: int(portion * T).
                let n = (self.portion * num_timesteps as f64) as usize;
                if n == 0 {
                    return Err(TrainError::option(
                        "timestep-bias-portion",
                        format!("{} of {num_timesteps} timesteps is none", self.portion),
                    ));
                }
                if self.strategy == BiasStrategy::Earlier {
                    0..n
                } else {
                    num_timesteps - n..num_timesteps
                }
            }
            BiasStrategy::Range => {
                if self.begin >= self.end || self.end > num_timesteps {
                    let flag = if self.end > num_timesteps {
                        "timestep-bias-end"
                    } else {
                        "timestep-bias-begin"
                    };
                    return Err(TrainError::option(
                        flag,
                        format!(
                            "the range {}..{} is not a non-empty part of 0..{num_timesteps}",
                            self.begin, self.end
                        ),
                    ));
                }
                self.begin..self.end
            }
        };
        if !(self.multiplier > 0.0 && self.multiplier.is_finite()) {
            return Err(TrainError::option(
                "timestep-bias-multiplier",
                format!("{} is not positive", self.multiplier),
            ));
        }
        let weights: Vec<f64> = (0..num_timesteps)
            .map(|t| if biased.contains(&t) { self.multiplier } else { 1.0 })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w;
                acc / total
            })
            .collect();
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Ok(Some(cdf))
    }
}

/// The timestep whose cumulative probability first exceeds `u` ∈ [0, 1).
pub fn sample(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c <= u).min(cdf.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bias(strategy: BiasStrategy, multiplier: f64) -> TimestepBias {
        TimestepBias { strategy, multiplier, ..TimestepBias::default() }
    }

    /// `later` ×3 over the last quarter of 8 steps: weights 1,1,1,1,1,1,3,3 (sum 12).
    #[test]
    fn later_multiplies_the_noisiest_portion() {
        let cdf = bias(BiasStrategy::Later, 3.0).cdf(8).unwrap().unwrap();
        let want = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0, 12.0].map(|x| x / 12.0);
        for (c, w) in cdf.iter().zip(want) {
            assert!((c - w).abs() < 1e-12, "{cdf:?}");
        }
        assert_eq!([sample(&cdf, 0.0), sample(&cdf, 0.49), sample(&cdf, 0.5)], [0, 5, 6]);
        assert_eq!(sample(&cdf, 0.999_999), 7);
        let earlier = bias(BiasStrategy::Earlier, 3.0).cdf(8).unwrap().unwrap();
        assert!((earlier[1] - 6.0 / 12.0).abs() < 1e-12, "{earlier:?}");
    }

    #[test]
    fn range_and_none() {
        let b = TimestepBias { begin: 2, end: 4, ..bias(BiasStrategy::Range, 0.5) };
        let cdf = b.cdf(4).unwrap().unwrap();
        assert_eq!(cdf, vec![1.0 / 3.0, 2.0 / 3.0, 2.5 / 3.0, 1.0]);
        assert_eq!(bias(BiasStrategy::None, 7.0).cdf(4).unwrap(), None);
    }

    #[test]
    fn bad_options_name_their_flag() {
        let flag = |b: TimestepBias| b.cdf(1000).unwrap_err().to_string();
        assert!(flag(bias(BiasStrategy::Later, 0.0)).contains("timestep-bias-multiplier"));
        let p = TimestepBias { portion: 1.5, ..bias(BiasStrategy::Later, 2.0) };
        assert!(flag(p).contains("timestep-bias-portion"));
        let r = TimestepBias { begin: 900, end: 1001, ..bias(BiasStrategy::Range, 2.0) };
        assert!(flag(r).contains("timestep-bias-end"));
        let r = TimestepBias { begin: 900, end: 900, ..bias(BiasStrategy::Range, 2.0) };
        assert!(flag(r).contains("timestep-bias-begin"));
        assert!("sideways".parse::<BiasStrategy>().unwrap_err().to_string().contains("strategy"));
    }
}
