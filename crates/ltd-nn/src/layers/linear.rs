//! `torch.nn.Linear`, initialised for training as PyTorch initialises it (uniform in ±1/√fan_in
//! for weight and bias: `kaiming_uniform_(a=√5)`), and the row-times-weight product it shares
//! with the 1×1 convolution of [`super::conv`]. A loaded layer can be quantized in place
//! ([`Linear::quantize`], see [`crate::quantize`]).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::quantize::{Quantization, QuantizeReport};

/// Half-precision inputs on the CPU are multiplied in f32 and rounded once, after the bias, as
/// PyTorch's CPU kernels do (candle would round the product, then round again after adding the
/// bias; its CPU convolution has no bf16 kernel at all).
pub(super) fn widen_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16)
}

/// PyTorch's default initialisation of a layer with `fan_in` inputs per output.
pub(super) fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `y = x·Wᵀ + b` over the last dimension of an input of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight quantized; when set, the product uses it (and `weight` is a placeholder).
    quantized: Option<QMatMul>,
}

impl Linear {
    /// Fetches `weight` (`[out, in]`) and, with `bias`, `bias` (`[out]`).
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let init = torch_default_init(in_dim);
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", init)?) } else { None };
        Ok(Self { weight, bias, quantized: None })
    }

    /// Replaces the weight by its quantized form where its shape allows (see
    /// [`Quantization::fits`]); the f32 weight is released. Inference only: a quantized layer
    /// has no gradient.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        if self.quantized.is_some() {
            return Ok(QuantizeReport::default());
        }
        let Some(qm) = q.quantize(&self.weight)? else {
            return Ok(QuantizeReport::default());
        };
        let bytes_before = self.weight.elem_count() * self.weight.dtype().size_in_bytes();
        let bytes_after = match &qm {
            QMatMul::QTensor(t) => t.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        // Keeps the shape (for `out_dim`) without the storage: a zero-stride scalar.
        let (out, inp) = self.weight.dims2()?;
        self.weight = Tensor::zeros((), self.weight.dtype(), self.weight.device())?
            .broadcast_as((out, inp))?;
        self.quantized = Some(qm);
        Ok(QuantizeReport { tensors: 1, bytes_before, bytes_after })
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `GEGLU(x·Wᵀ + b)` for a weight of `2·inner` rows: diffusers' `GEGLU` module (its
    /// `proj`, then [`super::geglu`]). For f32 CPU tensors outside autograd on a CPU with AVX2
    /// and FMA, with at least as many rows as the product has columns (more than 64), one
    /// fused pass that halves each band of the product while it is in cache
    /// (`kernels::linear::rows_times_weight_geglu`: the same bits as the two steps, without
    /// writing the whole product); otherwise the two steps.
    pub fn forward_geglu(&self, x: &Tensor, inner: usize) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if let Some(y) = self.geglu_cpu(x, inner)? {
            return Ok(y);
        }
        super::geglu(&self.forward(x)?, inner)
    }

    /// [`Self::forward_geglu`]'s fused pass, when it applies.
    #[cfg(target_arch = "x86_64")]
    fn geglu_cpu(&self, x: &Tensor, inner: usize) -> Result<Option<Tensor>> {
        use crate::kernels::{linear, plain_f32, simd, Data};
        let b = self.bias.as_ref();
        if self.quantized.is_some()
            || !simd::available()
            || !plain_f32(x)
            || !plain_f32(&self.weight)
            || !b.is_none_or(plain_f32)
        {
            return Ok(None);
        }
        let (n, k) = self.weight.dims2()?;
        if n != 2 * inner || x.dims().last() != Some(&k) || b.is_some_and(|b| b.dims() != [n]) {
            // Mismatched shapes: the two steps report them.
            return Ok(None);
        }
        let rows = x.elem_count() / k.max(1);
        if !linear::geglu_fuses(rows, k, n) {
            return Ok(None);
        }
        let (xc, w, b) = (x.contiguous()?, self.weight.contiguous()?, b.map(|b| b.contiguous()));
        let b = b.transpose()?;
        let (xd, wd, bd) = (Data::new(&xc), Data::new(&w), b.as_ref().map(Data::new));
        // SAFETY: AVX2 and FMA checked above.
        let y = unsafe {
            linear::rows_times_weight_geglu(
                xd.f32()?,
                wd.f32()?,
                bd.as_ref().map(|d| d.f32()).transpose()?,
                (rows, k, n),
            )
        };
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok(Some(Tensor::from_vec(y, dims, x.device())?))
    }

    /// The output width.
    pub fn out_dim(&self) -> Result<usize> {
        self.weight.dim(0)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.quantized {
            Some(qm) => quantized_rows_times_weight(x, qm, self.bias.as_ref()),
            None => rows_times_weight(x, &self.weight, self.bias.as_ref()),
        }
    }
}

/// `x·Wᵀ + b` over the last dimension for `W: [out, in]`, as one 2-D product over all leading
/// dimensions (a single large GEMM is faster than a batch of small ones; the transposed weight
/// is read in place).
pub(super) fn rows_times_weight(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = x.dims();
    let (out_dim, in_dim) = weight.dims2()?;
    let rows = x.elem_count() / in_dim.max(1);
    let dtype = x.dtype();
    let widen = widen_on_cpu(x);
    let cast = |t: &Tensor| if widen { t.to_dtype(DType::F32) } else { Ok(t.clone()) };
    let (x2, w) = (cast(&x.reshape((rows, in_dim))?)?, cast(weight)?);
    let b = bias.map(cast).transpose()?;
    if let Some(y) = product_cpu(&x2, &w, b.as_ref())? {
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_dim;
        }
        return y.reshape(out_dims)?.to_dtype(dtype);
    }
    let y = x2.matmul(&w.t()?)?;
    let bias = b.as_ref();
    let y = match bias {
        Some(b) => add_bias(y, b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    y.reshape(out_dims)?.to_dtype(dtype)
}

/// `x·Wᵀ + b` by `kernels/linear.rs` for `x: [rows, in]`, when it applies: f32 CPU tensors
/// outside any autograd graph (inference).
fn product_cpu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    use crate::kernels::{linear, plain_f32, Data};
    if !plain_f32(x) || !plain_f32(w) || !b.is_none_or(plain_f32) {
        return Ok(None);
    }
    let (rows, k) = x.dims2()?;
    let (n, k_w) = w.dims2()?;
    if k_w != k || b.is_some_and(|b| b.dims() != [n]) {
        // Mismatched shapes: candle's product reports them.
        return Ok(None);
    }
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.map(|b| b.contiguous()).transpose()?);
    let (xd, wd, bd) = (Data::new(&x), Data::new(&w), b.as_ref().map(Data::new));
    let y = linear::rows_times_weight(
        xd.f32()?,
        wd.f32()?,
        bd.as_ref().map(|d| d.f32()).transpose()?,
        (rows, k, n),
    );
    Ok(Some(Tensor::from_vec(y, (rows, n), x.device())?))
}

/// `y + b` for a product `y: [rows, out]` and `b: [out]`: in place on the CPU outside
/// autograd (`y` is the product just computed, which nothing else holds; see
/// `kernels/bias.rs`), else `broadcast_add`. The same sums either way.
fn add_bias(y: Tensor, b: &Tensor) -> Result<Tensor> {
    use crate::kernels::{bias::AddRowBias, plain_f32};
    if plain_f32(&y) && y.is_contiguous() && plain_f32(b) && b.is_contiguous() {
        y.inplace_op2(b, &AddRowBias)?;
        return Ok(y);
    }
    y.broadcast_add(b)
}

/// [`rows_times_weight`] with a quantized weight: the product in f32 (candle's quantized
/// kernels take f32 activations), the bias added, the result in the input's dtype.
fn quantized_rows_times_weight(x: &Tensor, qm: &QMatMul, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims.last().copied().unwrap_or(1);
    let rows = x.elem_count() / in_dim.max(1);
    let y = qm.forward(&x.reshape((rows, in_dim))?.to_dtype(DType::F32)?)?;
    let y = match bias {
        Some(b) => add_bias(y, &b.to_dtype(DType::F32)?)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = y.dim(1)?;
    }
    y.reshape(out_dims)?.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    fn layer(k: usize, n: usize, bias: bool) -> Linear {
        let dev = Device::Cpu;
        let mut ts = HashMap::new();
        let w = ltd_test_support::uniform(n * k, 4);
        ts.insert("weight".to_string(), Tensor::from_vec(w, (n, k), &dev).unwrap());
        if bias {
            let b = ltd_test_support::uniform(n, 5);
            ts.insert("bias".to_string(), Tensor::from_vec(b, n, &dev).unwrap());
        }
        Linear::new(VarBuilder::from_tensors(ts, DType::F32, &dev), k, n, bias).unwrap()
    }

    /// `forward_geglu` on a `[batch, tokens, k]` input is `geglu(forward(x))` bit for bit,
    /// fused (tokens ≥ the product's width) and not (fewer), with and without a bias; the
    /// output keeps the leading dimensions.
    #[test]
    fn forward_geglu_is_the_two_steps() {
        let (k, inner) = (24, 40);
        for bias in [false, true] {
            let l = layer(k, 2 * inner, bias);
            for tokens in [30, 300] {
                let x = ltd_test_support::uniform(2 * tokens * k, 6);
                let x = Tensor::from_vec(x, (2, tokens, k), &Device::Cpu).unwrap();
                let fused = l.forward_geglu(&x, inner).unwrap();
                let want = super::super::geglu(&l.forward(&x).unwrap(), inner).unwrap();
                assert_eq!(fused.dims(), [2, tokens, inner]);
                let bits = |t: &Tensor| {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(bits(&fused), bits(&want), "tokens {tokens}, bias {bias}");
            }
        }
    }
}
