//! The gradients of candle's backward pass as ltd patches it (`third_party/candle-core`: a
//! node's first gradient is stored, later ones added, instead of every one being added to
//! zeros): a tensor used several times, through additions and subtractions, must receive the
//! sum of all its contributions, and a tensor reached once its gradient exactly. And the
//! patched sum over leading dimensions, which reduces broadcast operands' gradients.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_use_of_a_tensor_adds_to_its_gradient() {
    let dev = Device::Cpu;
    let xs = [0.5f32, -1.25, 2.0, 3.0];
    let x = Var::new(&xs[..], &dev).unwrap();
    let b = Var::new(&[1.0f32, 2.0, -3.0, 0.25][..], &dev).unwrap();
    // y = x·x + x − (b + b) − b·x: dy/dx = 2x + 1 − b, dy/db = −2 − x.
    let xx = (x.as_tensor() * x.as_tensor()).unwrap();
    let twice_b = (b.as_tensor() + b.as_tensor()).unwrap();
    let bx = (b.as_tensor() * x.as_tensor()).unwrap();
    let y = (((xx + x.as_tensor()).unwrap() - twice_b).unwrap() - bx).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let bs = values(b.as_tensor());
    let gx = values(grads.get(x.as_tensor()).unwrap());
    let gb = values(grads.get(b.as_tensor()).unwrap());
    for i in 0..4 {
        // Exact: each term is a small multiple of values exact in f32.
        assert_eq!(gx[i], 2.0 * xs[i] + 1.0 - bs[i], "dy/dx[{i}]");
        assert_eq!(gb[i], -2.0 - xs[i], "dy/db[{i}]");
    }
}

#[test]
fn a_first_gradient_is_stored_contiguous_and_unchanged() {
    let dev = Device::Cpu;
    let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    // The gradient of a broadcast sum reaches `w` as a broadcast view of the upstream
    // gradient; the stored gradient must be a plain tensor of `w`'s shape.
    let y = w.as_tensor().sum_keepdim(1).unwrap().affine(3.0, 0.0).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap();
    assert_eq!(g.dims(), &[2, 2]);
    assert!(g.is_contiguous());
    assert_eq!(values(g), vec![3.0; 4]);
    // A tensor the loss does not depend on gets no gradient.
    let unused = Var::new(&[1.0f32], &dev).unwrap();
    assert!(grads.get(unused.as_tensor()).is_none());
}

/// ltd's second change to candle: a sum over one range of dimensions followed by kept ones
/// (how backward reduces the gradient of a broadcast bias) adds whole rows. Each sum must be
/// the same number the element-by-element loop gives: its terms added in index order.
#[test]
fn sums_over_leading_and_middle_dims_add_in_index_order() {
    let dev = Device::Cpu;
    let dims = [3usize, 4, 5, 6];
    let n: usize = dims.iter().product();
    let xs: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
    let x = Tensor::from_vec(xs.clone(), &dims, &dev).unwrap();
    for reduce in [&[0usize][..], &[0, 1], &[0, 1, 2], &[1], &[1, 2], &[2], &[0, 2]] {
        let ours = values(&x.sum_keepdim(reduce.to_vec()).unwrap());
        let mut expected = vec![0f32; ours.len()];
        for (i, &v) in xs.iter().enumerate() {
            // The output index: the input's with the reduced coordinates set to 0.
            let (mut rest, mut out, mut step) = (i, 0, 1);
            for d in (0..4).rev() {
                let coord = rest % dims[d];
                rest /= dims[d];
                if !reduce.contains(&d) {
                    out += coord * step;
                    step *= dims[d];
                }
            }
            expected[out] += v;
        }
        assert_eq!(ours, expected, "sum over {reduce:?}");
    }
}

/// ltd's fourth change to candle: a view that is the transpose of a contiguous pair of last
/// dimensions (how a linear layer's weight gradient reaches `accumulate`) is made contiguous
/// in tiles. Every element must land where the element-by-element copy put it: against the
/// definition, on shapes around the 16-wide tiles, with leading and unit dimensions, an
/// offset view, NCHW ↔ NHWC permutations (merged dimensions), and a permutation that is not
/// such a transpose (the general path).
#[test]
fn transposed_views_copy_element_for_element() {
    let dev = Device::Cpu;
    for dims in [
        vec![2usize, 2],
        vec![3, 17],
        vec![16, 16],
        vec![33, 5],
        vec![40, 70],
        vec![3, 19, 21],
        vec![2, 1, 18, 9],
        vec![1, 4, 31],
    ] {
        let n: usize = dims.iter().product();
        let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let x = Tensor::from_vec(xs.clone(), dims.as_slice(), &dev).unwrap();
        let r = dims.len();
        let t = x.transpose(r - 2, r - 1).unwrap();
        assert!(!t.is_contiguous());
        let got = values(&t.contiguous().unwrap());
        let (a, b) = (dims[r - 1], dims[r - 2]);
        let mut want = Vec::with_capacity(n);
        for batch in 0..n / (a * b) {
            for i in 0..a {
                for j in 0..b {
                    want.push(xs[batch * a * b + j * a + i]);
                }
            }
        }
        assert_eq!(got, want, "{dims:?}");
    }
    // An offset view (a narrowed batch) and a permutation of the leading dimensions too.
    let x =
        Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0, &dev).unwrap().reshape((2, 3, 4, 5)).unwrap();
    let narrowed = x.narrow(0, 1, 1).unwrap().transpose(2, 3).unwrap();
    let want: Vec<f32> = (0..3)
        .flat_map(|c| {
            (0..5).flat_map(move |i| (0..4).map(move |j| (60 + c * 20 + j * 5 + i) as f32))
        })
        .collect();
    assert_eq!(values(&narrowed.contiguous().unwrap()), want);
    // NCHW → NHWC and back: the spatial dimensions merge into one, then it is a transpose.
    let nhwc = x.permute((0, 2, 3, 1)).unwrap();
    let want: Vec<f32> = (0..2)
        .flat_map(|bb| {
            (0..4).flat_map(move |h| {
                (0..5).flat_map(move |w| (0..3).map(move |c| (bb * 60 + c * 20 + h * 5 + w) as f32))
            })
        })
        .collect();
    let nhwc = nhwc.contiguous().unwrap();
    assert_eq!(values(&nhwc), want);
    assert_eq!(values(&nhwc.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()), values(&x));
    let permuted = x.permute((1, 0, 3, 2)).unwrap();
    let want: Vec<f32> = (0..3)
        .flat_map(|c| {
            (0..2).flat_map(move |bb| {
                (0..5).flat_map(move |i| (0..4).map(move |j| (bb * 60 + c * 20 + j * 5 + i) as f32))
            })
        })
        .collect();
    assert_eq!(values(&permuted.contiguous().unwrap()), want);
}
