//! `scheduler_config.json`: the serde mirror ([`SchedulerConfig`]) and the enums its string
//! fields are validated into.
//!
//! The mirror keeps every field optional: diffusers' `from_config` only passes the fields that
//! were in the file, and each scheduler class fills the rest with *its own* defaults (Euler's
//! `timestep_spacing` defaults to `linspace`, PNDM's to `leading`). Each scheduler therefore
//! reads the fields its diffusers class knows, with that class's defaults, and ignores the rest,
//! which is exactly what swapping classes with `from_config` does.

use std::path::Path;

use ltd_nn::{ConfigError, Error, Result};
use serde::{Deserialize, Deserializer, Serialize};

/// Defines a config enum with its JSON spellings, `parse` (errors name the field) and `as_str`.
macro_rules! config_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in the order diffusers documents them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling used in `scheduler_config.json`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Parses the JSON spelling; an unknown value is an error naming `field`.
            pub fn parse(field: &str, value: &str) -> std::result::Result<Self, ConfigError> {
                match value {
                    $($text => Ok($name::$variant),)+
                    other => Err(ConfigError::new(
                        field,
                        format!(
                            "unsupported value {other:?} (supported: {})",
                            [$($text),+].join(", ")
                        ),
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

config_enum! {
    /// How the training betas are laid out over `num_train_timesteps`.
    BetaSchedule {
        /// `torch.linspace(beta_start, beta_end, T)`.
        Linear => "linear",
        /// `torch.linspace(beta_start**0.5, beta_end**0.5, T) ** 2` (Stable Diffusion).
        ScaledLinear => "scaled_linear",
        /// The Glide/iDDPM cosine schedule, betas capped at 0.999.
        SquaredCosCapV2 => "squaredcos_cap_v2",
    }
}

config_enum! {
    /// What the denoising model predicts.
    PredictionType {
        /// The added noise ε.
        Epsilon => "epsilon",
        /// The velocity v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022).
        VPrediction => "v_prediction",
        /// The clean sample x₀.
        Sample => "sample",
    }
}

config_enum! {
    /// How inference timesteps are spread over the training range (Lin et al. 2023, table 2).
    TimestepSpacing {
        /// Evenly from 0 to T−1, both ends included.
        Linspace => "linspace",
        /// Multiples of T / n from 0, plus `steps_offset`.
        Leading => "leading",
        /// Multiples of T / n counted down from T, minus one.
        Trailing => "trailing",
    }
}

config_enum! {
    /// The sigma the last step denoises to.
    FinalSigmasType {
        /// Zero: the last step returns the model's clean-sample estimate.
        Zero => "zero",
        /// The smallest training sigma.
        SigmaMin => "sigma_min",
    }
}

impl FinalSigmasType {
    /// The final sigma, given the smallest sigma of the schedule it ends.
    pub(crate) fn value(self, sigma_min: f32) -> f32 {
        match self {
            Self::Zero => 0.0,
            Self::SigmaMin => sigma_min,
        }
    }
}

config_enum! {
    /// What Euler passes to the model as the timestep.
    TimestepType {
        /// The (interpolated) training timestep.
        Discrete => "discrete",
        /// `0.25 * ln(sigma)` (EDM-style; only with v-prediction, as in diffusers).
        Continuous => "continuous",
    }
}

config_enum! {
    /// How Euler derives inference sigmas from the training sigmas.
    InterpolationType {
        /// Linear interpolation of sigma at the inference timesteps.
        Linear => "linear",
        /// Sigmas evenly spaced in log space between the extreme training sigmas.
        LogLinear => "log_linear",
    }
}

config_enum! {
    /// DDPM's posterior variance.
    DdpmVarianceType {
        /// β̃ₜ, the posterior variance (DDPM eq. 7).
        FixedSmall => "fixed_small",
        /// β̃ₜ computed through its logarithm (same values, as in the original code).
        FixedSmallLog => "fixed_small_log",
        /// βₜ.
        FixedLarge => "fixed_large",
        /// The model predicts the variance itself (its output has twice the sample's
        /// channels; the second half is the variance).
        Learned => "learned",
        /// The model predicts v ∈ [−1, 1] interpolating the log variance between β̃ₜ and βₜ
        /// (Nichol & Dhariwal 2021, eq. 15), in the second half of its channels.
        LearnedRange => "learned_range",
    }
}

config_enum! {
    /// Which DPM-Solver variant (Lu et al. 2022).
    DpmAlgorithm {
        /// DPM-Solver++: solves for the data prediction x₀.
        DpmSolverPlusPlus => "dpmsolver++",
        /// The stochastic DPM-Solver++ (SDE variant, draws noise every step).
        SdeDpmSolverPlusPlus => "sde-dpmsolver++",
    }
}

config_enum! {
    /// DPM-Solver's second-order variant.
    DpmSolverType {
        /// The midpoint form (diffusers' default).
        Midpoint => "midpoint",
        /// The Heun form.
        Heun => "heun",
    }
}

config_enum! {
    /// UniPC's B(h) choice (Zhao et al. 2023, eq. 11).
    UniPcSolverType {
        /// B(h) = h.
        Bh1 => "bh1",
        /// B(h) = eʰ − 1.
        Bh2 => "bh2",
    }
}

config_enum! {
    /// The diffusers scheduler classes this crate implements (`_class_name`).
    SchedulerClass {
        /// `DDPMScheduler`.
        Ddpm => "DDPMScheduler",
        /// `DDIMScheduler`.
        Ddim => "DDIMScheduler",
        /// `PNDMScheduler`.
        Pndm => "PNDMScheduler",
        /// `EulerDiscreteScheduler`.
        EulerDiscrete => "EulerDiscreteScheduler",
        /// `EulerAncestralDiscreteScheduler`.
        EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
        /// `HeunDiscreteScheduler`.
        HeunDiscrete => "HeunDiscreteScheduler",
        /// `LMSDiscreteScheduler`.
        LmsDiscrete => "LMSDiscreteScheduler",
        /// `DPMSolverMultistepScheduler`.
        DpmSolverMultistep => "DPMSolverMultistepScheduler",
        /// `DPMSolverSinglestepScheduler`.
        DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
        /// `UniPCMultistepScheduler`.
        UniPcMultistep => "UniPCMultistepScheduler",
        /// `LCMScheduler`.
        Lcm => "LCMScheduler",
    }
}

impl SchedulerClass {
    /// Whether this class's `step` takes η ([`crate::SamplerOptions::eta`]): in diffusers only
    /// `DDIMScheduler.step` has an `eta` argument (Euler a is ancestral with η fixed at 1), so
    /// a request can reject an η that would otherwise be silently ignored.
    pub fn uses_eta(self) -> bool {
        matches!(self, Self::Ddim)
    }
}

/// The fields of a diffusers `scheduler_config.json`, all optional (absent or `null` means "the
/// class default"); unknown fields are ignored. String-valued choices stay strings here and are
/// validated by the scheduler that reads them, so the error names the field and value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// `_class_name`: the diffusers class the file was written for.
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Number of training timesteps T.
    pub num_train_timesteps: Option<usize>,
    /// First beta of the linear / scaled-linear schedules.
    #[serde(deserialize_with = "lenient_f64")]
    pub beta_start: Option<f64>,
    /// Last beta of the linear / scaled-linear schedules.
    #[serde(deserialize_with = "lenient_f64")]
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: Option<String>,
    /// Added to `leading` timesteps.
    pub steps_offset: Option<i64>,
    /// Use ᾱ = 1 after the last step (DDIM, PNDM, LCM) instead of ᾱ₀.
    pub set_alpha_to_one: Option<bool>,
    /// Clip the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: Option<bool>,
    /// Bound for `clip_sample`.
    #[serde(deserialize_with = "lenient_f64")]
    pub clip_sample_range: Option<f64>,
    /// Imagen dynamic thresholding of the predicted x₀.
    pub thresholding: Option<bool>,
    /// Quantile of |x₀| used by dynamic thresholding.
    #[serde(deserialize_with = "lenient_f64")]
    pub dynamic_thresholding_ratio: Option<f64>,
    /// Upper bound of the dynamic threshold.
    #[serde(deserialize_with = "lenient_f64")]
    pub sample_max_value: Option<f64>,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: Option<bool>,
    /// DDPM's variance type, or DPM-Solver's learned-variance flag.
    pub variance_type: Option<String>,
    /// PNDM: skip the Runge-Kutta warm-up (PLMS only).
    pub skip_prk_steps: Option<bool>,
    /// Karras et al. (2022) sigma spacing.
    pub use_karras_sigmas: Option<bool>,
    /// Exponential sigma spacing (not supported; rejected when true).
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution sigma spacing (not supported; rejected when true).
    pub use_beta_sigmas: Option<bool>,
    /// Lower bound for Karras sigmas (Euler, UniPC).
    #[serde(deserialize_with = "lenient_f64")]
    pub sigma_min: Option<f64>,
    /// Upper bound for Karras sigmas (Euler, UniPC).
    #[serde(deserialize_with = "lenient_f64")]
    pub sigma_max: Option<f64>,
    /// `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// Euler: `discrete` or `continuous`.
    pub timestep_type: Option<String>,
    /// Euler: `linear` or `log_linear`.
    pub interpolation_type: Option<String>,
    /// Multistep solvers' order (1–3).
    pub solver_order: Option<usize>,
    /// DPM-Solver: `dpmsolver++` or `sde-dpmsolver++`.
    pub algorithm_type: Option<String>,
    /// DPM-Solver `midpoint`/`heun`, UniPC `bh1`/`bh2`.
    pub solver_type: Option<String>,
    /// Use lower-order updates for the last steps (stabilises < 15 steps).
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: first-order last step.
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: clip λ(t) from below (cosine schedules); JSON may hold `-Infinity`.
    #[serde(deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: lambda-uniform spacing (not supported; rejected when true).
    pub use_lu_lambdas: Option<bool>,
    /// Flow-matching sigmas (not supported; rejected when true).
    pub use_flow_sigmas: Option<bool>,
    /// Flow-matching shift (read only to reject flow configs).
    #[serde(deserialize_with = "lenient_f64")]
    pub flow_shift: Option<f64>,
    /// Resolution-dependent shifting (not supported; rejected when true).
    pub use_dynamic_shifting: Option<bool>,
    /// UniPC: predict x₀ (UniPC-x) rather than ε.
    pub predict_x0: Option<bool>,
    /// UniPC: step indices whose corrector is skipped.
    pub disable_corrector: Option<Vec<usize>>,
    /// LCM: the distillation schedule's number of steps.
    pub original_inference_steps: Option<usize>,
    /// LCM: multiplier of the timestep in the boundary-condition scalings.
    #[serde(deserialize_with = "lenient_f64")]
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`; errors name the file (and the field, for bad types).
    ///
    /// Accepts the non-standard `Infinity`/`-Infinity`/`NaN` tokens that Python's `json`
    /// writes (diffusers saves `"lambda_min_clipped": -Infinity`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON that came from `path` (the path is used in messages only).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        ltd_nn::config::parse_json(&quote_non_finite(text), path)
    }

    /// The class named by `_class_name`; missing or unknown is an error listing the classes.
    pub fn scheduler_class(&self) -> std::result::Result<SchedulerClass, ConfigError> {
        let name = self.class_name.as_deref().ok_or_else(|| {
            ConfigError::new("_class_name", "missing: cannot tell which scheduler the file is for")
        })?;
        SchedulerClass::parse("_class_name", name)
    }

    /// `prediction_type`; every class defaults to `epsilon`.
    pub fn prediction_type(&self) -> std::result::Result<PredictionType, ConfigError> {
        parse_or(
            "prediction_type",
            &self.prediction_type,
            PredictionType::Epsilon,
            PredictionType::parse,
        )
    }

    /// `prediction_type` for a class that cannot take `sample`; `why` says so in the error.
    pub(crate) fn prediction_type_except_sample(
        &self,
        why: &str,
    ) -> std::result::Result<PredictionType, ConfigError> {
        match self.prediction_type()? {
            PredictionType::Sample => Err(ConfigError::new(
                "prediction_type",
                format!("unsupported value \"sample\" ({why})"),
            )),
            prediction => Ok(prediction),
        }
    }

    /// `timestep_spacing`, with the reading class's default (`leading` for DDPM, DDIM and
    /// PNDM, `linspace` for the others).
    pub fn timestep_spacing(
        &self,
        class_default: TimestepSpacing,
    ) -> std::result::Result<TimestepSpacing, ConfigError> {
        parse_or("timestep_spacing", &self.timestep_spacing, class_default, TimestepSpacing::parse)
    }

    /// `beta_schedule`, with the reading class's default (`scaled_linear` for LCM, `linear`
    /// for the others).
    pub fn beta_schedule(
        &self,
        class_default: BetaSchedule,
    ) -> std::result::Result<BetaSchedule, ConfigError> {
        parse_or("beta_schedule", &self.beta_schedule, class_default, BetaSchedule::parse)
    }

    /// `final_sigmas_type`; every class that has it defaults to `zero`.
    pub fn final_sigmas_type(&self) -> std::result::Result<FinalSigmasType, ConfigError> {
        parse_or(
            "final_sigmas_type",
            &self.final_sigmas_type,
            FinalSigmasType::Zero,
            FinalSigmasType::parse,
        )
    }

    /// `timestep_type` (Euler), default `discrete`.
    pub fn timestep_type(&self) -> std::result::Result<TimestepType, ConfigError> {
        parse_or("timestep_type", &self.timestep_type, TimestepType::Discrete, TimestepType::parse)
    }

    /// `algorithm_type` (DPM-Solver), default `dpmsolver++`; `deis` means `dpmsolver++` (as
    /// diffusers maps it) and the deprecated `dpmsolver`/`sde-dpmsolver` are rejected.
    pub fn dpm_algorithm_type(&self) -> std::result::Result<DpmAlgorithm, ConfigError> {
        if let Some(a @ ("dpmsolver" | "sde-dpmsolver")) = self.algorithm_type.as_deref() {
            return Err(ConfigError::new(
                "algorithm_type",
                format!(
                    "unsupported value {a:?} (deprecated in diffusers; use dpmsolver++ or \
                     sde-dpmsolver++)"
                ),
            ));
        }
        let plus_plus = DpmAlgorithm::DpmSolverPlusPlus;
        parse_aliased(
            "algorithm_type",
            &self.algorithm_type,
            &["deis"],
            plus_plus,
            DpmAlgorithm::parse,
        )
    }

    /// `solver_type` as DPM-Solver reads it, default `midpoint`; UniPC's `logrho`, `bh1` and
    /// `bh2` mean `midpoint` (as diffusers maps them when swapping classes).
    pub fn dpm_solver_type(&self) -> std::result::Result<DpmSolverType, ConfigError> {
        let aliases = ["logrho", "bh1", "bh2"];
        let midpoint = DpmSolverType::Midpoint;
        parse_aliased("solver_type", &self.solver_type, &aliases, midpoint, DpmSolverType::parse)
    }

    /// `solver_type` as UniPC reads it, default `bh2`; DPM-Solver's `midpoint`, `heun` and
    /// `logrho` mean `bh2`.
    pub fn unipc_solver_type(&self) -> std::result::Result<UniPcSolverType, ConfigError> {
        let aliases = ["midpoint", "heun", "logrho"];
        let bh2 = UniPcSolverType::Bh2;
        parse_aliased("solver_type", &self.solver_type, &aliases, bh2, UniPcSolverType::parse)
    }

    /// `variance_type` as DDPM reads it, default `fixed_small`; `fixed_large_log` is rejected
    /// (diffusers 0.42.1 takes `log(beta) ** 0.5` there, NaN on every noised step).
    pub fn ddpm_variance_type(&self) -> std::result::Result<DdpmVarianceType, ConfigError> {
        if self.variance_type.as_deref() == Some("fixed_large_log") {
            return Err(ConfigError::new(
                "variance_type",
                "unsupported value \"fixed_large_log\": diffusers 0.42.1 computes \
                 log(beta_t) ** 0.5 for it, which is NaN",
            ));
        }
        let fixed_small = DdpmVarianceType::FixedSmall;
        parse_or("variance_type", &self.variance_type, fixed_small, DdpmVarianceType::parse)
    }

    /// `interpolation_type` (Euler), default `linear`.
    pub fn interpolation_type(&self) -> std::result::Result<InterpolationType, ConfigError> {
        parse_or(
            "interpolation_type",
            &self.interpolation_type,
            InterpolationType::Linear,
            InterpolationType::parse,
        )
    }
}

/// Rewrites the bare `NaN`, `Infinity` and `-Infinity` tokens Python's `json` emits into
/// strings (outside string literals), so serde_json can read them and [`lenient_f64`] can turn
/// them back into floats.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) =
            ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t))
        {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A float field that also accepts the strings `"Infinity"`, `"-Infinity"` and `"NaN"`.
fn lenient_f64<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Option::<Num>::deserialize(de)? {
        None => Ok(None),
        Some(Num::F(v)) => Ok(Some(v)),
        Some(Num::S(s)) => match s.as_str() {
            "Infinity" | "inf" => Ok(Some(f64::INFINITY)),
            "-Infinity" | "-inf" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            other => Err(serde::de::Error::custom(format!("expected a number, found {other:?}"))),
        },
    }
}

/// Parses an optional string field into `E`, or returns `default` when absent.
fn parse_or<E>(
    field: &str,
    value: &Option<String>,
    default: E,
    parse: fn(&str, &str) -> std::result::Result<E, ConfigError>,
) -> std::result::Result<E, ConfigError> {
    value.as_deref().map_or(Ok(default), |v| parse(field, v))
}

/// diffusers options that ltd does not implement; a class rejects those it reads when set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unimplemented {
    /// `use_exponential_sigmas`.
    ExponentialSigmas,
    /// `use_beta_sigmas`.
    BetaSigmas,
    /// `use_lu_lambdas`.
    LuLambdas,
    /// `use_flow_sigmas`.
    FlowSigmas,
    /// `use_dynamic_shifting`.
    DynamicShifting,
}

impl Unimplemented {
    /// The k-diffusion classes' (Euler, Heun, LMS).
    pub const K_SIGMAS: &'static [Self] = &[Self::ExponentialSigmas, Self::BetaSigmas];
    /// The solvers' (DPM-Solver singlestep, UniPC; multistep adds `use_lu_lambdas`).
    pub const SOLVER: &'static [Self] =
        &[Self::ExponentialSigmas, Self::BetaSigmas, Self::FlowSigmas, Self::DynamicShifting];
}

impl SchedulerConfig {
    /// An error naming the first of `options` that is set.
    pub(crate) fn reject_unimplemented(
        &self,
        options: &[Unimplemented],
    ) -> std::result::Result<(), ConfigError> {
        for &option in options {
            let (field, value) = match option {
                Unimplemented::ExponentialSigmas => {
                    ("use_exponential_sigmas", self.use_exponential_sigmas)
                }
                Unimplemented::BetaSigmas => ("use_beta_sigmas", self.use_beta_sigmas),
                Unimplemented::LuLambdas => ("use_lu_lambdas", self.use_lu_lambdas),
                Unimplemented::FlowSigmas => ("use_flow_sigmas", self.use_flow_sigmas),
                Unimplemented::DynamicShifting => {
                    ("use_dynamic_shifting", self.use_dynamic_shifting)
                }
            };
            reject_flag(field, value)?;
        }
        Ok(())
    }
}

/// [`parse_or`] where the values in `aliases` (another class's spellings) all mean `alias`,
/// which is also the default.
fn parse_aliased<E: Copy>(
    field: &str,
    value: &Option<String>,
    aliases: &[&str],
    alias: E,
    parse: fn(&str, &str) -> std::result::Result<E, ConfigError>,
) -> std::result::Result<E, ConfigError> {
    match value.as_deref() {
        Some(v) if aliases.contains(&v) => Ok(alias),
        _ => parse_or(field, value, alias, parse),
    }
}

/// Rejects a feature flag we do not implement when it is set.
fn reject_flag(field: &str, value: Option<bool>) -> std::result::Result<(), ConfigError> {
    if value == Some(true) {
        return Err(ConfigError::new(field, "unsupported value true (not implemented in ltd)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_outside_strings_are_quoted() {
        let text = r#"{"a": -Infinity, "b": "x -Infinity NaN \" Infinity", "c": NaN}"#;
        assert_eq!(
            quote_non_finite(text),
            r#"{"a": "-Infinity", "b": "x -Infinity NaN \" Infinity", "c": "NaN"}"#
        );
        let cfg =
            SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -Infinity}"#, Path::new("c"))
                .unwrap();
        assert_eq!(cfg.lambda_min_clipped, Some(f64::NEG_INFINITY));
    }

    #[test]
    fn enum_errors_name_field_and_value() {
        let err = BetaSchedule::parse("beta_schedule", "cosine").unwrap_err();
        assert_eq!(err.field, "beta_schedule");
        assert!(err.message.contains("\"cosine\""), "{}", err.message);
        assert!(err.message.contains("scaled_linear"), "{}", err.message);
    }
}
