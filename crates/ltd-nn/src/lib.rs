//! Shared foundations of ltd's model crates: errors, config reading, memory-mapped
//! safetensors loading with completeness reports, device/dtype selection, randomness, the one
//! attention implementation, the CPU kernels, and the neural-network layers that at least two
//! of the text encoders, the U-Net and the VAE have in common.

pub mod alloc;
pub mod attention;
pub mod config;
pub mod device;
pub mod error;
mod kernels;
pub mod layers;
pub mod patch;
pub mod quantize;
pub mod rng;
pub mod runtime;
pub mod weights;

pub use config::{load_config, read_json, OneOrMany};
pub use device::{default_dtype, parse_dtype, DeviceChoice};
pub use error::{ConfigError, Error, LoadReport, Mismatch, Result};
pub use kernels::{contiguous as cpu_contiguous, Data as CpuData};
pub use patch::{LowRankDelta, WeightPatches};
pub use quantize::{Quantization, QuantizeReport};
pub use rng::{NoiseSource, PhiloxRng, TorchRng};
pub use runtime::{on_cpu_pool, pin_cpu_threads, RuntimeOptions};
pub use weights::{load_checked, record_shapes, Alias, SafetensorsFiles};
