//! Tiled decoding and encoding against our own untiled results: where the tiled output is not
//! blended (away from the seams) it is exactly each tile's own untiled result, and an image that
//! fits in one tile comes out unchanged. (Against diffusers' tiled output: see `parity.rs`.)
//!
//! Note what is *not* claimed: that tiled equals untiled away from seams for the whole image.
//! Group norm statistics are per tile and the mid-block attention spans the tile, so every
//! tile's content depends on the tile; with these random-weight fixtures the difference is large
//! (the blending only hides the seams).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use ltd_nn::RuntimeOptions;
use ltd_test_support::{max_abs_diff, randn};
use ltd_vae::{AutoencoderKL, TilingOptions};

fn vae(dir: &str) -> AutoencoderKL {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(dir);
    AutoencoderKL::load(&dir, None, DType::F32, &Device::Cpu, &RuntimeOptions::default()).unwrap()
}

/// Checks every tile's unblended region: `out[.., a.., b..]` for tile `(i, j)` against `f` of
/// that tile alone. `stride_in`/`tile_in` index the input, `limit`/`extent` the output.
fn check_unblended(
    input: &Tensor,
    out: &Tensor,
    t: (usize, usize),
    o: (usize, usize),
    f: impl Fn(&Tensor) -> Tensor,
) -> usize {
    let ((stride_in, tile_in), (limit, extent)) = (t, o);
    let (_, _, h, w) = input.dims4().unwrap();
    let mut checked = 0;
    for (ti, i) in (0..h).step_by(stride_in).enumerate() {
        for (tj, j) in (0..w).step_by(stride_in).enumerate() {
            let tile = input.i((.., .., i..(i + tile_in).min(h), j..(j + tile_in).min(w))).unwrap();
            let alone = f(&tile);
            let (ah, aw) = (alone.dim(2).unwrap().min(limit), alone.dim(3).unwrap().min(limit));
            // Rows/columns blended with the tile above/left start at 0; the first ones are not.
            let (r0, c0) = (if ti > 0 { extent } else { 0 }, if tj > 0 { extent } else { 0 });
            if r0 >= ah || c0 >= aw {
                continue;
            }
            let expected = alone.i((.., .., r0..ah, c0..aw)).unwrap();
            let (y, x) = (ti * limit, tj * limit);
            let got = out.i((.., .., y + r0..y + ah, x + c0..x + aw)).unwrap();
            let err = max_abs_diff(&got, &expected);
            assert!(err <= 1e-6, "tile ({ti}, {tj}): max abs error {err}");
            checked += 1;
        }
    }
    checked
}

#[test]
fn tiled_decode_is_each_tiles_decode_away_from_seams() {
    for (dir, tile) in [("pipelines/sd1/vae", 4), ("models/vae-b", 8)] {
        let vae = vae(dir);
        let f = vae.config().scale_factor();
        let opts = TilingOptions {
            tile_sample_min_size: tile * f,
            tile_latent_min_size: tile,
            tile_overlap_factor: 0.25,
        };
        let z = randn((1, vae.config().latent_channels, 3 * tile + 1, 2 * tile + 3), 11);
        let out = vae.tiled_decode(&z, &opts).unwrap();
        assert_eq!(out.dims()[2..], [z.dim(2).unwrap() * f, z.dim(3).unwrap() * f]);
        let stride = (tile as f64 * 0.75) as usize;
        let extent = (opts.tile_sample_min_size as f64 * 0.25) as usize;
        let limit = opts.tile_sample_min_size - extent;
        let checked =
            check_unblended(&z, &out, (stride, tile), (limit, extent), |t| vae.decode(t).unwrap());
        assert!(checked >= 9, "{dir}: only {checked} tiles checked");
    }
}

#[test]
fn tiled_encode_is_each_tiles_encode_away_from_seams() {
    let vae = vae("models/vae-b");
    let f = vae.config().scale_factor();
    let tile = 8;
    let opts = TilingOptions {
        tile_sample_min_size: tile * f,
        tile_latent_min_size: tile,
        tile_overlap_factor: 0.25,
    };
    let x = randn((1, 3, 3 * tile * f, 2 * tile * f + 4), 12);
    let mean = vae.tiled_encode(&x, &opts).unwrap().mean;
    let stride = (opts.tile_sample_min_size as f64 * 0.75) as usize;
    let extent = (tile as f64 * 0.25) as usize;
    let checked = check_unblended(&x, &mean, (stride, tile * f), (tile - extent, extent), |t| {
        vae.encode(t).unwrap().mean
    });
    assert!(checked >= 9, "only {checked} tiles checked");
}

#[test]
fn an_image_within_one_tile_is_unchanged() {
    let vae = vae("pipelines/sd1/vae");
    let opts = TilingOptions::with_sample_tile(vae.config(), 64);
    assert_eq!(opts.tile_latent_min_size, 8);
    let z = randn((1, 4, 6, 5), 13);
    let tiled = vae.tiled_decode(&z, &opts).unwrap();
    assert!(max_abs_diff(&tiled, &vae.decode(&z).unwrap()) == 0.0);
    // And `decode_with_tiling` only tiles what exceeds a tile.
    let auto = vae.decode_with_tiling(&z, Some(&opts)).unwrap();
    assert!(max_abs_diff(&auto, &vae.decode(&z).unwrap()) == 0.0);
    let x = randn((1, 3, 40, 24), 14);
    let tiled = vae.tiled_encode(&x, &opts).unwrap();
    assert!(max_abs_diff(&tiled.mean, &vae.encode(&x).unwrap().mean) == 0.0);
}
