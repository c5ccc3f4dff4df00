//! ltd-vae
