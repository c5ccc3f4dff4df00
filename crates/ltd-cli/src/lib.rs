//! What `ltd-gen` shares with other front ends (`ltd-serve`): the model and device flags and
//! the loading they describe, the embedded default model, and image bytes in and out (PNG with
//! the `parameters` chunk), so that every front end loads the same model and writes the same
//! PNG bytes for the same request.

pub mod default_model;
pub mod image_io;
pub mod model_args;

pub use image_io::{decode_image, encode_png, random_seed};
pub use model_args::{DeviceArgs, ModelArgs};
