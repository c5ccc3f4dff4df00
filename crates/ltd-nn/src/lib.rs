//! Shared foundations of ltd's model crates: errors, config reading, memory-mapped
//! safetensors loading with completeness reports, device/dtype selection, and the neural
//! network layers the text encoders, the U-Net and the VAE have in common.

pub mod config;
pub mod device;
pub mod error;
pub mod weights;

pub use config::{load_config, read_json, OneOrMany};
pub use device::{default_dtype, parse_dtype, DeviceChoice};
pub use error::{ConfigError, Error, Result};
pub use weights::{load_checked, record_shapes, LoadReport, SafetensorsFiles};
pub mod attention;
