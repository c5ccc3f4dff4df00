//! Timestep embeddings: the sinusoidal projection of DDPM (Ho et al. 2020, after the
//! Transformer's positional encoding) and the two-layer MLP diffusers calls `TimestepEmbedding`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use ltd_nn::attention::{merge_heads, softmax_last_dim, split_heads};
use ltd_nn::layers::{Activation, LayerNorm, Linear};

/// diffusers' `get_timestep_embedding`: for `t: [N]` (fractional values allowed), returns
/// `[N, dim]` = `[sin(t·f), cos(t·f)]` (or `[cos, sin]` with `flip_sin_to_cos`), with
/// frequencies `f_i = exp(−ln(10000)·i / (dim/2 − freq_shift))`, zero-padded to an odd `dim`.
///
/// Computed in f32 in the same order of operations as diffusers, since at `t ≈ 1000` one ulp
/// of a frequency shows in the sine. The frequencies depend on nothing but `dim` and are
/// computed on the host; the products, sines and cosines run on `t`'s device, so a step on a
/// GPU never waits to copy its timesteps back to the host (a synchronisation per U-Net call).
/// On the CPU the values are those of the former host loop, bit for bit (`f32::sin`/`cos`).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln_max_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((ln_max_period * i as f32) / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let ts = t.to_dtype(DType::F32)?.flatten_all()?;
    let args = ts.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let (first, second) = if flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
    let emb = Tensor::cat(&[first, second], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `Timesteps`: the parameter-free sinusoidal projection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timesteps {
    /// Width of the embedding.
    pub num_channels: usize,
    /// `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` (the config's `freq_shift`).
    pub freq_shift: f64,
}

impl Timesteps {
    /// Embeds `t: [N]` as `[N, num_channels]` f32.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        timestep_embedding(t, self.num_channels, self.flip_sin_to_cos, self.freq_shift)
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(x + cond_proj(c))))`, optionally
/// followed by `post_act`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    cond_proj: Option<Linear>,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// `in_channels → time_embed_dim → time_embed_dim`, with a bias-free `cond_proj` from
    /// `cond_proj_dim` when given (LCM's guidance embedding).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
        cond_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let linear_1 = Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim, true)?;
        let linear_2 = Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?;
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(Linear::new(vb.pp("cond_proj"), d, in_channels, false)?),
            None => None,
        };
        Ok(Self { linear_1, linear_2, cond_proj, act, post_act })
    }

    /// Embeds `x: [N, in_channels]`, adding `cond_proj(condition)` first when both exist.
    pub fn forward(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => (x + proj.forward(&c.to_dtype(x.dtype())?)?)?,
            _ => x.clone(),
        };
        let x = self.act.forward(&self.linear_1.forward(&x)?)?;
        let x = self.linear_2.forward(&x)?;
        match self.post_act {
            Some(act) => act.forward(&x),
            None => Ok(x),
        }
    }
}

/// diffusers' `AttentionPooling` (from DeepFloyd IF): the text states attend to their mean plus
/// a learned positional embedding, one query token; the result is that token.
#[derive(Debug, Clone)]
pub struct AttentionPooling {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    num_heads: usize,
}

impl AttentionPooling {
    /// Fetches `positional_embedding` (`[1, embed_dim]`), `q_proj`, `k_proj` and `v_proj`.
    pub fn new(vb: VarBuilder, num_heads: usize, embed_dim: usize) -> Result<Self> {
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 / (embed_dim as f64).sqrt() };
        Ok(Self {
            positional_embedding: vb.get_with_hints(
                (1, embed_dim),
                "positional_embedding",
                init,
            )?,
            q_proj: Linear::new(vb.pp("q_proj"), embed_dim, embed_dim, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), embed_dim, embed_dim, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), embed_dim, embed_dim, true)?,
            num_heads,
        })
    }

    /// `x: [B, L, D] → [B, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let class_token =
            x.mean_keepdim(1)?.broadcast_add(&self.positional_embedding.to_dtype(dt)?)?;
        let x = Tensor::cat(&[&class_token, x], 1)?;
        let heads = |t: Tensor| split_heads(&t, self.num_heads)?.contiguous();
        let q = heads(self.q_proj.forward(&class_token)?)?;
        let k = heads(self.k_proj.forward(&x)?)?;
        let v = heads(self.v_proj.forward(&x)?)?;
        // Both operands scaled by d^(-1/4), as diffusers does (for f16's range).
        let scale = 1.0 / ((q.dim(3)? as f64).sqrt().sqrt());
        let weight = (q * scale)?.matmul(&(k * scale)?.t()?)?;
        let weight = softmax_last_dim(&weight.to_dtype(DType::F32)?)?.to_dtype(dt)?;
        let a = merge_heads(&weight.matmul(&v)?)?;
        a.squeeze(1)
    }
}

/// diffusers' `TextTimeEmbedding` (`addition_embed_type: "text"`, DeepFloyd IF):
/// `norm2(proj(pool(norm1(text states))))`, added to the time embedding. (Not to be confused
/// with SDXL's `"text_time"`, [`crate::config::TextTimeEmbedding`].)
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    norm1: LayerNorm,
    pool: AttentionPooling,
    proj: Linear,
    norm2: LayerNorm,
}

impl TextTimeEmbedding {
    /// `encoder_dim` (the text states' width) → `time_embed_dim`, pooled with `num_heads`.
    pub fn new(
        vb: VarBuilder,
        encoder_dim: usize,
        time_embed_dim: usize,
        num_heads: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), encoder_dim, 1e-5)?,
            pool: AttentionPooling::new(vb.pp("pool"), num_heads, encoder_dim)?,
            proj: Linear::new(vb.pp("proj"), encoder_dim, time_embed_dim, true)?,
            norm2: LayerNorm::new(vb.pp("norm2"), time_embed_dim, 1e-5)?,
        })
    }

    /// `text: [B, L, encoder_dim] → [B, time_embed_dim]`.
    pub fn forward(&self, text: &Tensor) -> Result<Tensor> {
        let h = self.pool.forward(&self.norm1.forward(text)?)?;
        self.norm2.forward(&self.proj.forward(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The embedding as the former host loop computed it (before it moved onto the device).
    fn host_loop(ts: &[f32], dim: usize, flip: bool, shift: f64) -> Vec<Vec<f32>> {
        let half = dim / 2;
        let ln_max_period = -(10000f64.ln()) as f32;
        let denom = (half as f64 - shift) as f32;
        let freqs: Vec<f32> =
            (0..half).map(|i| ((ln_max_period * i as f32) / denom).exp()).collect();
        ts.iter()
            .map(|&t| {
                let (sin, cos): (Vec<f32>, Vec<f32>) =
                    freqs.iter().map(|f| t * f).map(|a| (a.sin(), a.cos())).unzip();
                let (a, b) = if flip { (cos, sin) } else { (sin, cos) };
                let mut row = [a, b].concat();
                row.resize(dim, 0.0);
                row
            })
            .collect()
    }

    #[test]
    fn tensor_form_equals_the_host_loop_bit_for_bit() {
        let ts = [0f32, 1.5, 20.25, 501.0, 999.0];
        let t = Tensor::new(&ts, &Device::Cpu).unwrap();
        for (dim, flip, shift) in [(320, true, 0.0), (256, false, 1.0), (7, true, 1.0)] {
            let got = timestep_embedding(&t, dim, flip, shift).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(
                got,
                host_loop(&ts, dim, flip, shift),
                "dim {dim} flip {flip} shift {shift}"
            );
        }
    }

    #[test]
    fn matches_diffusers_get_timestep_embedding() {
        // diffusers.models.embeddings.get_timestep_embedding(torch.tensor([0., 1.5, 999.]), 7,
        // flip_sin_to_cos=True, downscale_freq_shift=1)
        let t = Tensor::new(&[0f32, 1.5, 999.0], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 7, true, 1.0).unwrap().to_vec2::<f32>().unwrap();
        let expected = [
            [1.0f64, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.070737198, 0.999887526, 1.0, 0.997494996, 0.0149994371, 1.49999978e-4, 0.0],
            [
                0.999649823,
                -0.844469786,
                0.995014131,
                -0.0264607519,
                -0.535603166,
                0.0997339115,
                0.0,
            ],
        ];
        for (row, exp) in e.iter().zip(expected) {
            for (a, b) in row.iter().zip(exp) {
                assert!((*a as f64 - b).abs() < 2e-6, "{e:?}");
            }
        }
    }
}
