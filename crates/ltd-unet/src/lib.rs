//! ltd-unet
