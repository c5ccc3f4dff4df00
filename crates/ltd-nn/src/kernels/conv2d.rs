//! Stride-1 2-D convolution on the CPU without an unfolded (`im2col`) copy of the input.
//!
//! With the input zero-padded and each channel's rows laid end to end (`W'` = padded width),
//! the input seen from kernel tap `(ky, kx)` is the same buffer shifted by `ky·W' + kx`: a plain
//! strided matrix `[C_in, rows·W']`. The convolution is then a sum of `k²` matrix products,
//! `out += W[:, :, ky, kx] · shift(x)`, accumulated in place by the `gemm` crate (which packs
//! its operands into cache-sized blocks itself), and each output row carries `k − 1` extra
//! columns that are dropped when the bias is added. An unfolded copy would be `k²` times the
//! input, written to and read back from main memory; here everything a product touches is a
//! band of rows that stays in cache.
//!
//! Work is split into units of (image, band of output rows, block of output channels), taken
//! from a shared counter by a few threads, so a thread slowed down by other processes does not
//! hold the others up.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{contiguous, im2col, Data, Mat};

/// Bytes of one band's working set (padded input rows and output rows) that a unit aims for:
/// small enough to stay in the L2/L3 caches while its `k²` products run over it.
const BAND_BYTES: usize = 2 << 20;
/// Smallest band width in matrix columns (`rows · W'`): narrower products waste the
/// micro-kernel's tiles and repeat the packing of the weights too often.
const MIN_BAND_COLUMNS: usize = 512;
/// Smallest block of output channels a unit computes.
const MIN_CHANNEL_BLOCK: usize = 64;

/// Shape of a convolution: `x: [batch, cin, h, w]`, `weight: [cout, cin, k, k]`, padding `pad`
/// on all four sides, stride 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h + 2 * self.pad + 1 - self.k, self.w + 2 * self.pad + 1 - self.k)
    }

    /// Whether the shape is one this kernel computes (the kernel fits in the padded input).
    pub fn valid(&self) -> bool {
        self.k > 0 && self.h + 2 * self.pad >= self.k && self.w + 2 * self.pad >= self.k
    }
}

/// What is added to the products before they are stored: the bias per output channel, and
/// optionally a per-image, per-channel term (a time embedding) and a residual of the output's
/// shape; the sum is then divided by `scale`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub bias: &'a [f32],
    /// `[batch, cout]`.
    pub channel_add: Option<&'a [f32]>,
    /// `[batch, cout, hout, wout]`.
    pub residual: Option<&'a [f32]>,
    pub scale: f32,
}

/// The output pointer shared by the worker threads (here and in `winograd.rs`).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every user writes a disjoint set of output elements (here a unit's image, rows and
// channels; see each use) into a buffer that outlives the scoped threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `conv(x, weight) + epilogue` for contiguous f32 `x` and `weight`; returns
/// `[batch, cout, hout, wout]`. Shapes whose per-image products are too small for this kernel
/// (few pixels or input channels, see `im2col::pays`) are unfolded over the batch instead.
pub(crate) fn conv2d(x: &[f32], weight: &[f32], s: ConvShape, epi: Epilogue<'_>) -> Vec<f32> {
    if super::im2col::pays(s, false) {
        super::im2col::conv(x, weight, s, 1, epi)
    } else {
        direct(x, weight, s, epi)
    }
}

/// [`conv2d`] by the direct kernel, whatever the shape.
pub(super) fn direct(x: &[f32], weight: &[f32], s: ConvShape, epi: Epilogue<'_>) -> Vec<f32> {
    let (hout, wout) = s.out_hw();
    let wp = s.w + 2 * s.pad;
    let kk = s.k * s.k;
    debug_assert_eq!(x.len(), s.batch * s.cin * s.h * s.w);
    debug_assert_eq!(weight.len(), s.cout * s.cin * kk);
    let mut out = vec![0f32; s.batch * s.cout * hout * wout];
    if out.is_empty() {
        return out;
    }

    // Band height: the working set of a band is its padded input rows (all input channels)
    // and its output rows (all output channels).
    let row_bytes = (s.cin + s.cout) * wp * 4;
    let rows = (BAND_BYTES / row_bytes.max(1)).max(MIN_BAND_COLUMNS.div_ceil(wp)).clamp(1, hout);
    let bands = hout.div_ceil(rows);
    let threads = super::threads();
    // Split the output channels only when images × bands leave threads idle.
    let per_image = (2 * threads).div_ceil(s.batch * bands);
    let blocks = per_image.min(s.cout / MIN_CHANNEL_BLOCK).max(1);
    let block = s.cout.div_ceil(blocks);
    let blocks = s.cout.div_ceil(block);
    let units = s.batch * bands * blocks;

    // The weights regrouped per tap, `[k², cin, cout]`: each product's operand is then a
    // row-major matrix, which the matrix kernel packs with plain copies instead of gathering
    // every k²-th element.
    let mut taps = vec![0f32; weight.len()];
    for (co, filters) in weight.chunks_exact(s.cin * kk).enumerate() {
        for (ci, filter) in filters.chunks_exact(kk).enumerate() {
            for (tap, &v) in filter.iter().enumerate() {
                taps[(tap * s.cin + ci) * s.cout + co] = v;
            }
        }
    }
    let taps = &taps;

    let out_ptr = OutPtr(out.as_mut_ptr());
    // Padded input rows of one band: `k` extra rows, plus one so that the extra columns of the
    // last row read zeros rather than past the buffer.
    let extra = if s.k > 1 { s.k } else { 0 };
    let plane = (rows + extra) * wp;
    let scratch = || (vec![0f32; s.cin * plane], vec![0f32; block * rows * wp]);
    super::for_each_unit(threads, units, scratch, |(input, acc), unit| {
        // Rebinding takes the whole `Sync` wrapper; without it the closure would capture only
        // its raw-pointer field, which is not `Sync`.
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        let (image, rest) = (unit / (bands * blocks), unit % (bands * blocks));
        let (band, blk) = (rest / blocks, rest % blocks);
        let y0 = band * rows;
        let nrows = rows.min(hout - y0);
        let co0 = blk * block;
        let nco = block.min(s.cout - co0);
        let x_img = &x[image * s.cin * s.h * s.w..(image + 1) * s.cin * s.h * s.w];
        fill_band(input, x_img, s, y0, nrows + extra, plane);
        let n = nrows * wp;
        for tap in 0..kk {
            let (ky, kx) = (tap / s.k, tap % s.k);
            // SAFETY: lhs is `taps[tap][ci][co0 + i]` for i < nco, ci < cin; rhs reads
            // `input[ci·plane + ky·wp + kx + j]` for j < nrows·wp, at most
            // `(cin−1)·plane + (k−1)·wp + k−1 + nrows·wp − 1 < cin·plane` since
            // `plane ≥ (nrows + k)·wp`; dst is `acc[i·n + j]`, within `block·rows·wp`.
            unsafe {
                super::gemm(
                    (nco, n, s.cin),
                    Mat { ptr: acc.as_mut_ptr(), row: n, col: 1 },
                    tap > 0,
                    Mat { ptr: taps.as_ptr().add(tap * s.cin * s.cout + co0), row: 1, col: s.cout },
                    Mat { ptr: input.as_ptr().add(ky * wp + kx), row: plane, col: 1 },
                );
            }
        }
        for i in 0..nco {
            let co = co0 + i;
            let (bias, temb) = (epi.bias[co], epi.channel_add.map(|t| t[image * s.cout + co]));
            let base = ((image * s.cout + co) * hout + y0) * wout;
            for r in 0..nrows {
                let src = &acc[i * n + r * wp..i * n + r * wp + wout];
                let off = base + r * wout;
                // SAFETY: (image, co, y0 + r) is written by this unit only, and
                // `off + wout ≤ out.len()`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(off), wout) };
                let residual = epi.residual.map(|res| &res[off..off + wout]);
                store_row(dst, src, bias, temb, residual, epi.scale);
            }
        }
    });
    out
}

/// Copies the padded input rows `y0 − pad ..` (`count` rows, zeros outside the image) of every
/// channel into `band` (`plane` elements per channel, `W'` per row).
fn fill_band(band: &mut [f32], x: &[f32], s: ConvShape, y0: usize, count: usize, plane: usize) {
    let wp = s.w + 2 * s.pad;
    for ci in 0..s.cin {
        let chan = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        let dst = &mut band[ci * plane..(ci + 1) * plane];
        for r in 0..count {
            let row = &mut dst[r * wp..(r + 1) * wp];
            // Padded row y0 + r is image row y0 + r − pad.
            match (y0 + r).checked_sub(s.pad).filter(|&y| y < s.h) {
                Some(y) => {
                    row[..s.pad].fill(0.0);
                    row[s.pad..s.pad + s.w].copy_from_slice(&chan[y * s.w..(y + 1) * s.w]);
                    row[s.pad + s.w..].fill(0.0);
                }
                None => row.fill(0.0),
            }
        }
        dst[count * wp..].fill(0.0);
    }
}

/// Writes one output row: `(residual + ((acc + bias) + temb)) / scale`, in diffusers' order of
/// operations, with the terms that are absent left out.
#[inline]
pub(super) fn store_row(
    dst: &mut [f32],
    acc: &[f32],
    bias: f32,
    temb: Option<f32>,
    residual: Option<&[f32]>,
    scale: f32,
) {
    match temb {
        Some(t) => dst.iter_mut().zip(acc).for_each(|(o, &a)| *o = (a + bias) + t),
        None => dst.iter_mut().zip(acc).for_each(|(o, &a)| *o = a + bias),
    }
    if let Some(res) = residual {
        dst.iter_mut().zip(res).for_each(|(o, &r)| *o += r);
    }
    if scale != 1.0 {
        dst.iter_mut().for_each(|o| *o /= scale);
    }
}

/// The input gradient of a stride-1 convolution, `[batch, cin, h, w]`, from the output gradient
/// `g: [batch, cout, hout, wout]`: the convolution of `g`, padded by `k − 1 − pad`, with the
/// weights flipped in space and their channel axes swapped. Needs `pad < k`.
pub(crate) fn conv2d_input_grad(g: &[f32], weight: &[f32], s: ConvShape) -> Vec<f32> {
    let (hout, wout) = s.out_hw();
    let kk = s.k * s.k;
    let mut flipped = vec![0f32; weight.len()];
    for co in 0..s.cout {
        for ci in 0..s.cin {
            let src = &weight[(co * s.cin + ci) * kk..(co * s.cin + ci + 1) * kk];
            let dst = &mut flipped[(ci * s.cout + co) * kk..(ci * s.cout + co + 1) * kk];
            for (tap, &v) in src.iter().enumerate() {
                dst[kk - 1 - tap] = v;
            }
        }
    }
    let t = ConvShape {
        batch: s.batch,
        cin: s.cout,
        h: hout,
        w: wout,
        cout: s.cin,
        k: s.k,
        pad: s.k - 1 - s.pad,
    };
    let zeros = vec![0f32; s.cin];
    let epi = Epilogue { bias: &zeros, channel_add: None, residual: None, scale: 1.0 };
    conv2d(g, &flipped, t, epi)
}

/// The weight gradient of a stride-1 convolution, `[cout, cin, k, k]`, from its input `x` and
/// output gradient `g` (by unfolding, `im2col::weight_grad`, unless the output channels are
/// few: see `im2col::pays`).
///
/// With the input padded and laid out as in [`conv2d`] (rows of `W'`, one extra zero row) and
/// `g`'s rows widened to `W'` with zeros, tap `(ky, kx)` is one matrix product per image,
/// `dW[:, :, ky, kx] += g · shift(x)ᵀ`, with no unfolded copy. Taps are split over threads;
/// each sums its images in order, so the result does not depend on the thread count.
pub(crate) fn conv2d_weight_grad(x: &[f32], g: &[f32], s: ConvShape) -> Vec<f32> {
    if super::im2col::pays(s, true) {
        return super::im2col::weight_grad(x, g, s, 1);
    }
    let (hout, wout) = s.out_hw();
    let wp = s.w + 2 * s.pad;
    let kk = s.k * s.k;
    let plane = (s.h + 2 * s.pad + 1) * wp;
    let n = hout * wp;
    let mut xp = vec![0f32; s.batch * s.cin * plane];
    for (b, img) in x.chunks_exact(s.cin * s.h * s.w).enumerate() {
        let band = &mut xp[b * s.cin * plane..(b + 1) * s.cin * plane];
        fill_band(band, img, s, 0, s.h + 2 * s.pad, plane);
    }
    let mut gp = vec![0f32; s.batch * s.cout * n];
    for (row, src) in g.chunks_exact(wout).enumerate() {
        gp[row * wp..row * wp + wout].copy_from_slice(src);
    }
    let mut taps = vec![0f32; kk * s.cout * s.cin];
    let per_tap = s.cout * s.cin;
    let threads = super::threads().min(kk).max(1);
    let taps_per_thread = kk.div_ceil(threads);
    let (xp, gp) = (&xp, &gp);
    let work = |first: usize, out: &mut [f32]| {
        for (i, dst) in out.chunks_exact_mut(per_tap).enumerate() {
            let tap = first + i;
            let shift = (tap / s.k) * wp + tap % s.k;
            for b in 0..s.batch {
                // SAFETY: lhs is `gp[b][co][j]` for co < cout, j < n; rhs reads
                // `xp[b][ci·plane + shift + j]`, at most `(cin−1)·plane + (k−1)·wp + k − 1 +
                // hout·wp − 1 < cin·plane` (the extra zero row); dst is `cout × cin`.
                unsafe {
                    super::gemm(
                        (s.cout, s.cin, n),
                        Mat { ptr: dst.as_mut_ptr(), row: s.cin, col: 1 },
                        b > 0,
                        Mat { ptr: gp.as_ptr().add(b * s.cout * n), row: n, col: 1 },
                        Mat { ptr: xp.as_ptr().add(b * s.cin * plane + shift), row: 1, col: plane },
                    );
                }
            }
        }
    };
    let chunks = taps.chunks_mut((taps_per_thread * per_tap).max(1)).enumerate().collect();
    super::for_each_parallel(chunks, |(t, chunk)| work(t * taps_per_thread, chunk));
    let mut out = vec![0f32; taps.len()];
    for tap in 0..kk {
        for co in 0..s.cout {
            for ci in 0..s.cin {
                out[(co * s.cin + ci) * kk + tap] = taps[(tap * s.cout + co) * s.cin + ci];
            }
        }
    }
    out
}

/// The bias gradient, `[cout]`: `g: [batch, cout, …]` summed over images and pixels (each
/// plane as `run_sums` sums it, the planes in f64).
pub(crate) fn conv2d_bias_grad(g: &[f32], cout: usize, batch: usize) -> Vec<f32> {
    let mut sums = vec![0f64; cout];
    let plane = (g.len() / (batch * cout).max(1)).max(1);
    // Each plane summed as `run_sums` sums (in parallel), the planes in order.
    let mut planes = vec![0f64; g.len() / plane];
    super::for_each_row(g, &mut planes, (plane, 1), |_, src, dst| {
        dst[0] = super::run_sums(src, |v| v)
    });
    for (i, v) in planes.into_iter().enumerate() {
        sums[i % cout] += v;
    }
    sums.into_iter().map(|v| v as f32).collect()
}

/// A convolution with bias under autograd, on f32 CPU tensors. At stride 1 the direct kernel
/// of `conv2d` forwards, and its backward is one convolution (input gradient) and the weight
/// gradient's products over the whole batch; strided (the downsamplers), `im2col`'s unfolded
/// product forwards, and backwards its input gradient (`Wᵀ · g` folded back) and weight
/// gradient. Composed from candle's ops, the same convolution spent most of a small training
/// step on copying shifted views and their gradients, and candle's strided convolution and its
/// backward ran on one thread with a dot product per output.
pub(crate) struct Conv2dTrainOp {
    shape: ConvShape,
    stride: usize,
}

impl Conv2dTrainOp {
    /// The op for `x` and `weight` at `stride`, if the kernels compute it (at stride 1,
    /// `pad < k`, so that the input gradient is itself a padded convolution).
    pub(crate) fn new(
        x: &Tensor,
        weight: &Tensor,
        padding: usize,
        stride: usize,
    ) -> Result<Option<Self>> {
        let (batch, cin, h, w) = x.dims4()?;
        let (cout, cin_w, k, k2) = weight.dims4()?;
        let shape = ConvShape { batch, cin, h, w, cout, k, pad: padding };
        let fits = stride > 1 || padding < k;
        let ok = cin_w == cin && k == k2 && stride > 0 && fits && shape.valid();
        Ok(ok.then_some(Self { shape, stride }))
    }
}

impl CustomOp3 for Conv2dTrainOp {
    fn name(&self) -> &'static str {
        "ltd-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) =
            (contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?, contiguous(s3, l3)?);
        let s = self.shape;
        let epi = Epilogue { bias: b, channel_add: None, residual: None, scale: 1.0 };
        let (hout, wout) = im2col::out_hw(s, self.stride);
        let out = match self.stride {
            1 => conv2d(x, w, s, epi),
            stride => im2col::conv(x, w, s, stride, epi),
        };
        Ok((CpuStorage::F32(out), Shape::from((s.batch, s.cout, hout, wout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.shape;
        let (x, weight, grad) = (x.contiguous()?, weight.contiguous()?, grad.contiguous()?);
        let (xd, wd, gd) = (Data::new(&x), Data::new(&weight), Data::new(&grad));
        let (xs, ws, gs) = (xd.f32()?, wd.f32()?, gd.f32()?);
        let dev = x.device();
        let (dx, dw) = match self.stride {
            1 => (conv2d_input_grad(gs, ws, s), conv2d_weight_grad(xs, gs, s)),
            stride => {
                (im2col::input_grad(gs, ws, s, stride), im2col::weight_grad(xs, gs, s, stride))
            }
        };
        let db = conv2d_bias_grad(gs, s.cout, s.batch);
        Ok((
            Some(Tensor::from_vec(dx, (s.batch, s.cin, s.h, s.w), dev)?),
            Some(Tensor::from_vec(dw, (s.cout, s.cin, s.k, s.k), dev)?),
            Some(Tensor::from_vec(db, s.cout, dev)?),
        ))
    }
}
