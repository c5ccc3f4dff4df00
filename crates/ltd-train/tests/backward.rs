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

/// The elements of a contiguous tensor `xs` of shape `dims`, permuted by `perm` (the view's
/// dimension `k` is the tensor's `perm[k]`), in the view's row-major order: the definition a
/// copy of the view must match.
fn permuted_by_definition(xs: &[f32], dims: &[usize], perm: &[usize]) -> Vec<f32> {
    let mut strides = vec![1usize; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * dims[d + 1];
    }
    let view: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
    (0..xs.len())
        .map(|flat| {
            // The view's multi-index of `flat`, mapped back to the tensor's element.
            let (mut rest, mut src) = (flat, 0);
            for k in (0..view.len()).rev() {
                src += (rest % view[k]) * strides[perm[k]];
                rest /= view[k];
            }
            xs[src]
        })
        .collect()
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
    let last_two = |r: usize| -> Vec<usize> {
        let mut p: Vec<usize> = (0..r).collect();
        p.swap(r - 2, r - 1);
        p
    };
    let mut cases: Vec<(Vec<usize>, Vec<usize>)> = [
        vec![2usize, 2],
        vec![3, 17],
        vec![16, 16],
        vec![33, 5],
        vec![40, 70],
        vec![3, 19, 21],
        vec![2, 1, 18, 9],
        vec![1, 4, 31],
    ]
    .into_iter()
    .map(|d| {
        let p = last_two(d.len());
        (d, p)
    })
    .collect();
    // NCHW → NHWC and NHWC → NCHW (the spatial dimensions merge into one, then it is a
    // transpose), and a permutation that is not such a transpose.
    cases.push((vec![2, 3, 4, 5], vec![0, 2, 3, 1]));
    cases.push((vec![2, 4, 5, 3], vec![0, 3, 1, 2]));
    cases.push((vec![2, 3, 4, 5], vec![1, 0, 3, 2]));
    for (dims, perm) in cases {
        let n: usize = dims.iter().product();
        let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let x = Tensor::from_vec(xs.clone(), dims.as_slice(), &dev).unwrap();
        let view = x.permute(perm.clone()).unwrap();
        assert!(!view.is_contiguous(), "{dims:?} {perm:?}");
        let want = permuted_by_definition(&xs, &dims, &perm);
        assert_eq!(values(&view.contiguous().unwrap()), want, "{dims:?} {perm:?}");
    }
    // An offset view: the second of two batches, its last two dimensions transposed.
    let xs: Vec<f32> = (0..120).map(|i| i as f32).collect();
    let x = Tensor::from_vec(xs.clone(), (2, 3, 4, 5), &dev).unwrap();
    let narrowed = x.narrow(0, 1, 1).unwrap().transpose(2, 3).unwrap();
    let want = permuted_by_definition(&xs[60..], &[1, 3, 4, 5], &[0, 1, 3, 2]);
    assert_eq!(values(&narrowed.contiguous().unwrap()), want);
}
