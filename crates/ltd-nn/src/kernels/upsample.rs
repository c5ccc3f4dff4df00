//! Nearest-neighbour upsampling by whole factors (diffusers' `Upsample2D`, ×2) and its
//! backward pass, the sum over each input pixel's block of output pixels.
//!
//! Why not candle's: its backward of `upsample_nearest2d` is a grouped convolution with a
//! kernel of ones (one group per channel, stride = the factor), which ran through candle's
//! generic convolution: 3.9% of a `train-vae` step on one thread (AMD EPYC), against the one
//! memory pass it needs. Its forward indexes every output element from the input on one
//! thread; here each output row is written once and copied to the rows below it.
//!
//! Every value is what PyTorch's CPU kernels give: the forward copies; the backward sums a
//! block's gradients in the order PyTorch's `upsample_nearest2d_backward` adds them (output
//! rows in order, left to right within each, into a zero), so the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{contiguous, for_each_row};

/// `[B, C, H, W]` → `[B, C, H·sh, W·sw]`, each input pixel repeated over an `sh × sw` block,
/// for a contiguous f32 CPU tensor. Backward: [`BlockSumOp`].
pub(crate) struct NearestUpOp {
    pub sh: usize,
    pub sw: usize,
}

/// `[B, C, H·sh, W·sw]` → `[B, C, H, W]`: each output pixel the sum of its `sh × sw` block of
/// the input (the gradient of [`NearestUpOp`]). Backward: [`NearestUpOp`].
pub(crate) struct BlockSumOp {
    pub sh: usize,
    pub sw: usize,
}

/// `(batch·channels, h, w)` of a rank-4 layout.
fn planes(l: &Layout) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok((b * c, h, w))
}

impl CustomOp1 for NearestUpOp {
    fn name(&self) -> &'static str {
        "ltd-upsample-nearest"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l)?;
        let (n, h, w) = planes(l)?;
        let (sh, sw) = (self.sh, self.sw);
        let (oh, ow) = (h * sh, w * sw);
        let mut out = vec![0f32; n * oh * ow];
        if ow > 0 {
            for_each_row(x, &mut out, (h * w, oh * ow), |_, src, dst| {
                for (row, block) in src.chunks_exact(w).zip(dst.chunks_exact_mut(sh * ow)) {
                    let (first, rest) = block.split_at_mut(ow);
                    if sw == 2 {
                        // The factor diffusers uses: two plain stores per element (a `fill`
                        // per pair took 100 ms against 80 for 256 channels to 512², one
                        // thread, AMD EPYC).
                        for (pair, &v) in first.chunks_exact_mut(2).zip(row) {
                            pair[0] = v;
                            pair[1] = v;
                        }
                    } else {
                        for (run, &v) in first.chunks_exact_mut(sw).zip(row) {
                            run.fill(v);
                        }
                    }
                    for copy in rest.chunks_exact_mut(ow) {
                        copy.copy_from_slice(first);
                    }
                }
            });
        }
        let (b, c, _, _) = l.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = BlockSumOp { sh: self.sh, sw: self.sw };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

impl CustomOp1 for BlockSumOp {
    fn name(&self) -> &'static str {
        "ltd-block-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous::<f32>(s, l)?;
        let (n, gh, gw) = planes(l)?;
        let (sh, sw) = (self.sh, self.sw);
        if sh == 0 || sw == 0 || gh % sh != 0 || gw % sw != 0 {
            candle_core::bail!("block sum: {gh}×{gw} is not a multiple of {sh}×{sw}")
        }
        let (h, w) = (gh / sh, gw / sw);
        let mut out = vec![0f32; n * h * w];
        if w > 0 {
            for_each_row(g, &mut out, (gh * gw, h * w), |_, src, dst| {
                for (block, row) in src.chunks_exact(sh * gw).zip(dst.chunks_exact_mut(w)) {
                    // PyTorch's order: into zero, the block's first output row left to right,
                    // then the next rows.
                    for (d, run) in row.iter_mut().zip(block[..gw].chunks_exact(sw)) {
                        *d = run.iter().fold(0.0, |acc, &v| acc + v);
                    }
                    for below in block[gw..].chunks_exact(gw) {
                        for (d, run) in row.iter_mut().zip(below.chunks_exact(sw)) {
                            *d = run.iter().fold(*d, |acc, &v| acc + v);
                        }
                    }
                }
            });
        }
        let (b, c, _, _) = l.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = NearestUpOp { sh: self.sh, sw: self.sw };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The forward equals candle's `upsample_nearest2d` (PyTorch's nearest: source index
    /// `⌊dst / factor⌋`) exactly, and the gradient equals the definition's sums in PyTorch's
    /// order exactly, on ragged shapes and factors other than 2 (several planes, so the rows
    /// are split over threads where there are two).
    #[test]
    fn matches_candle_forward_and_the_block_sum_backward() {
        let dev = Device::Cpu;
        for &(b, c, h, w, sh, sw) in
            &[(2, 3, 5, 7, 2, 2), (1, 40, 16, 16, 2, 2), (1, 2, 3, 4, 3, 1), (2, 1, 1, 1, 1, 4)]
        {
            let n = b * c * h * w;
            let x = Var::from_vec(ltd_test_support::uniform(n, 1), (b, c, h, w), &dev).unwrap();
            let ours = x.as_tensor().apply_op1(NearestUpOp { sh, sw }).unwrap();
            let theirs = x.as_tensor().upsample_nearest2d(h * sh, w * sw).unwrap();
            let (a, t) = (ours.flatten_all().unwrap(), theirs.flatten_all().unwrap());
            assert_eq!(a.to_vec1::<f32>().unwrap(), t.to_vec1::<f32>().unwrap());

            let (oh, ow) = (h * sh, w * sw);
            let gv = ltd_test_support::uniform(b * c * oh * ow, 2);
            let g = Tensor::from_vec(gv.clone(), (b, c, oh, ow), &dev).unwrap();
            let grads = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut want = vec![0f32; n];
            for (plane, out) in want.chunks_exact_mut(h * w).enumerate() {
                let gp = &gv[plane * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    for ox in 0..ow {
                        out[(oy / sh) * w + ox / sw] += gp[oy * ow + ox];
                    }
                }
            }
            assert_eq!(dx, want, "{:?}", (b, c, h, w, sh, sw));
        }
    }

    /// A block sum of a shape that is not a multiple of the factor is an error, not a panic.
    #[test]
    fn block_sum_rejects_ragged_shapes() {
        let t = Tensor::zeros((1, 1, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = t.apply_op1(BlockSumOp { sh: 2, sw: 2 }).unwrap_err().to_string();
        assert!(err.contains("not a multiple"), "{err}");
    }
}
