//! Device and dtype selection: `--device auto|cpu|cuda[:N]|metal[:N]`, `--dtype f32|f16|bf16`.
//!
//! A backend that was not compiled in is a runtime error that says how to get it, never a panic.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A compiled-in GPU that is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
    /// The Metal device with this ordinal.
    Metal(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::msg(format!(
                "unknown device `{s}`: expected auto, cpu, cuda, cuda:N, metal or metal:N"
            ))
        };
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|_| bad())?)),
            None => (s, None),
        };
        Ok(match (kind.to_ascii_lowercase().as_str(), ordinal) {
            ("auto", None) => Self::Auto,
            ("cpu", None) => Self::Cpu,
            ("cuda", n) => Self::Cuda(n.unwrap_or(0)),
            ("metal", n) => Self::Metal(n.unwrap_or(0)),
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                    Self::Cuda(0).open()
                } else if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                    Self::Metal(0).open()
                } else {
                    Ok(Device::Cpu)
                }
            }
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::msg(
                        "this build of ltd has no CUDA support: rebuild with `--features cuda`",
                    ));
                }
                Device::new_cuda(n).map_err(|e| Error::msg(format!("cannot open cuda:{n}: {e}")))
            }
            Self::Metal(n) => {
                if !cfg!(feature = "metal") {
                    return Err(Error::msg(
                        "this build of ltd has no Metal support: rebuild with `--features metal`",
                    ));
                }
                Device::new_metal(n).map_err(|e| Error::msg(format!("cannot open metal:{n}: {e}")))
            }
        }
    }
}

/// Parses `f32`, `f16` or `bf16` (also `float32`, `fp16`, `float16`, `bfloat16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => return Err(Error::msg(format!("unknown dtype `{s}`: expected f32, f16 or bf16"))),
    })
}

/// The default compute dtype on a device: f16 on GPUs, f32 on the CPU (half precision on
/// CPUs without native support is slow and lossy).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        for (s, d) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
            ("metal", DeviceChoice::Metal(0)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), d, "{s}");
        }
        for bad in ["gpu", "cuda:x", "cpu:1", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(err.contains("unknown device"), "{bad}: {err}");
        }
    }

    #[test]
    fn missing_backends_are_errors() {
        if !cfg!(feature = "cuda") {
            let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("F16").unwrap(), DType::F16);
        assert!(parse_dtype("f8").unwrap_err().to_string().contains("f32, f16 or bf16"));
    }
}
