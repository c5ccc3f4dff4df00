//! Tiled encoding and decoding, exactly as diffusers' `AutoencoderKL.tiled_decode` and
//! `_tiled_encode`: overlapping tiles are processed one at a time and blended linearly over the
//! overlap (`blend_v`, `blend_h`), so memory is bounded by one tile's activations however large
//! the image is. Only the previous row of tiles is kept for blending (diffusers keeps them all;
//! the result is the same).

use candle_core::{bail, Module, Result, Tensor};

use crate::autoencoder_kl::{AutoencoderKL, DiagonalGaussian};
use crate::config::VaeConfig;

/// Tile geometry (diffusers' `tile_sample_min_size`, `tile_latent_min_size`,
/// `tile_overlap_factor`).
///
/// As in diffusers, the output is exactly `scale_factor` times the input only when the tile
/// stride maps onto the kept part of a tile
/// (`⌊latent·(1 − overlap)⌋·f = sample − ⌊sample·overlap⌋`), e.g. for tile sizes that are
/// multiples of 4 with the default overlap of a quarter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TilingOptions {
    /// Tile size in image pixels (encoding input, decoding output).
    pub tile_sample_min_size: usize,
    /// Tile size in latent pixels (encoding output, decoding input).
    pub tile_latent_min_size: usize,
    /// Fraction of a tile that overlaps its neighbour.
    pub tile_overlap_factor: f64,
}

impl TilingOptions {
    /// diffusers' defaults: tiles of the config's `sample_size`, overlapping by a quarter.
    pub fn for_config(cfg: &VaeConfig) -> Self {
        Self::with_sample_tile(cfg, cfg.sample_size)
    }

    /// Tiles of `tile_sample_min_size` image pixels (and the matching latent size), overlapping
    /// by a quarter.
    pub fn with_sample_tile(cfg: &VaeConfig, tile_sample_min_size: usize) -> Self {
        Self {
            tile_sample_min_size,
            tile_latent_min_size: (tile_sample_min_size as f64 / cfg.scale_factor() as f64)
                as usize,
            tile_overlap_factor: 0.25,
        }
    }
}

/// `b` with its first `extent` rows (axis 2, or columns with `axis` 3) replaced by a linear
/// ramp from `a`'s last rows to `b`'s: diffusers' `blend_v` / `blend_h`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, axis: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(axis)?).min(b.dim(axis)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    // Weights computed in double precision and rounded once, as torch does with Python floats.
    let ramp = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let w: Vec<f32> = (0..extent).map(|y| f(y as f64 / extent as f64) as f32).collect();
        let mut shape = [1usize; 4];
        shape[axis] = extent;
        Tensor::from_vec(w, &shape[..], b.device())?.to_dtype(b.dtype())
    };
    let (w_a, w_b) = (ramp(&|w| 1.0 - w)?, ramp(&|w| w)?);
    let a_tail = a.narrow(axis, a.dim(axis)? - extent, extent)?;
    let b_head = b.narrow(axis, 0, extent)?;
    let mixed = (a_tail.broadcast_mul(&w_a)? + b_head.broadcast_mul(&w_b)?)?;
    let rest = b.dim(axis)? - extent;
    if rest == 0 {
        Ok(mixed)
    } else {
        Tensor::cat(&[&mixed, &b.narrow(axis, extent, rest)?], axis)
    }
}

/// Applies `f` to overlapping tiles of `input` (`in_tile` wide, every `in_tile·(1 − overlap)`)
/// and blends the outputs (`out_tile` wide) over `out_tile·overlap` pixels.
fn tiled(
    input: &Tensor,
    in_tile: usize,
    out_tile: usize,
    overlap: f64,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let stride = (in_tile as f64 * (1.0 - overlap)) as usize;
    let blend_extent = (out_tile as f64 * overlap) as usize;
    if stride == 0 || blend_extent > out_tile {
        bail!("tiling: tiles of {in_tile} with overlap {overlap} do not advance")
    }
    let row_limit = out_tile - blend_extent;
    let (_, _, h, w) = input.dims4()?;
    let mut previous_row: Vec<Tensor> = Vec::new();
    let mut result_rows = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::new();
        let mut kept = Vec::new();
        for (j_idx, j) in (0..w).step_by(stride).enumerate() {
            let tile = input.narrow(2, i, in_tile.min(h - i))?.narrow(3, j, in_tile.min(w - j))?;
            let mut out = f(&tile)?;
            if let Some(above) = previous_row.get(j_idx) {
                out = blend(above, &out, blend_extent, 2)?;
            }
            if let Some(left) = row.last() {
                out = blend(left, &out, blend_extent, 3)?;
            }
            let (oh, ow) = (out.dim(2)?, out.dim(3)?);
            kept.push(out.narrow(2, 0, row_limit.min(oh))?.narrow(3, 0, row_limit.min(ow))?);
            row.push(out);
        }
        result_rows.push(Tensor::cat(&kept, 3)?);
        previous_row = row;
    }
    Tensor::cat(&result_rows, 2)
}

impl AutoencoderKL {
    /// diffusers' `tiled_encode`: the posterior of `x`, encoded tile by tile.
    pub fn tiled_encode(&self, x: &Tensor, opts: &TilingOptions) -> Result<DiagonalGaussian> {
        let moments = tiled(
            &x.to_dtype(self.dtype())?,
            opts.tile_sample_min_size,
            opts.tile_latent_min_size,
            opts.tile_overlap_factor,
            |tile| self.encode_moments(tile),
        )?;
        DiagonalGaussian::from_moments(&moments)
    }

    /// diffusers' `tiled_decode`: the image of `z`, decoded tile by tile.
    pub fn tiled_decode(&self, z: &Tensor, opts: &TilingOptions) -> Result<Tensor> {
        tiled(
            &z.to_dtype(self.dtype())?,
            opts.tile_latent_min_size,
            opts.tile_sample_min_size,
            opts.tile_overlap_factor,
            |tile| {
                let tile = match &self.post_quant_conv {
                    Some(p) => p.forward(tile)?,
                    None => tile.clone(),
                };
                self.decoder.forward(&tile)
            },
        )
    }

    /// `encode` as diffusers does with tiling enabled: tiled when `x` is larger than a tile.
    pub fn encode_with_tiling(
        &self,
        x: &Tensor,
        tiling: Option<&TilingOptions>,
    ) -> Result<DiagonalGaussian> {
        match tiling {
            Some(t) if x.dim(2)? > t.tile_sample_min_size || x.dim(3)? > t.tile_sample_min_size => {
                self.tiled_encode(x, t)
            }
            _ => self.encode(x),
        }
    }

    /// `decode` as diffusers does with tiling enabled: tiled when `z` is larger than a tile.
    pub fn decode_with_tiling(&self, z: &Tensor, tiling: Option<&TilingOptions>) -> Result<Tensor> {
        match tiling {
            Some(t) if z.dim(2)? > t.tile_latent_min_size || z.dim(3)? > t.tile_latent_min_size => {
                self.tiled_decode(z, t)
            }
            _ => self.decode(z),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn blend_is_diffusers_ramp() {
        let a = Tensor::full(10f32, (1, 1, 3, 2), &Device::Cpu).unwrap();
        let b = Tensor::zeros((1, 1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        // extent 2: rows y = 0, 1 get a·(1 − y/2) + b·(y/2).
        let v = blend(&a, &b, 2, 2).unwrap().squeeze(0).unwrap().squeeze(0).unwrap();
        assert_eq!(v.to_vec2::<f32>().unwrap(), [[10.0, 10.0], [5.0, 5.0], [0.0, 0.0]]);
        let h = blend(&a, &b, 5, 3).unwrap().squeeze(0).unwrap().squeeze(0).unwrap();
        assert_eq!(h.to_vec2::<f32>().unwrap(), [[10.0, 5.0]; 3], "extent clamped to 2");
    }
}
