//! The convolution composed from dfdx's own ops, for every device and dtype the host kernel
//! does not cover (dfdx's `Cuda`, `f16`): im2col as a batched `gather` from the channels-last
//! input with one extra zero row standing for the padding, then one `matmul`. Autograd comes
//! from those ops.

use dfdx::prelude::*;

use super::{output_size, Output4};

/// For every output position and kernel offset, the row (`h·W + w`) of the channels-last input
/// it reads, or `H·W` (the zero row) where it falls in the padding. Repeated for each batch item.
fn patch_rows(
    batch: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    dil: usize,
) -> (Vec<usize>, usize, usize) {
    let (oh, ow) = (output_size(h, k, s, p, dil), output_size(w, k, s, p, dil));
    let mut one = Vec::with_capacity(oh * ow * k * k);
    for i in 0..oh {
        for j in 0..ow {
            for a in 0..k {
                for b in 0..k {
                    let (r, c) = (
                        (s * i + dil * a) as isize - p as isize,
                        (s * j + dil * b) as isize - p as isize,
                    );
                    let inside = r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w;
                    one.push(if inside {
                        r as usize * w + c as usize
                    } else {
                        h * w
                    });
                }
            }
        }
    }
    let mut all = Vec::with_capacity(batch * one.len());
    for _ in 0..batch {
        all.extend_from_slice(&one);
    }
    (all, oh, ow)
}

/// The convolution of `x` (`B × I × H × W`) with `weight` (`[O, I, K, K]`) and an optional bias.
pub(super) fn conv2d<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    B: Dim,
    H: Dim,
    W: Dim,
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D> + Merge<NoneTape>,
>(
    x: Tensor<(B, Const<I>, H, W), E, D, T>,
    weight: &Tensor<Rank4<O, I, K, K>, E, D>,
    bias: Option<&Tensor<Rank1<O>, E, D>>,
) -> Result<Output4<B, O, E, D, T>, D::Err> {
    let (b, _, h, w) = *x.shape();
    let (hh, ww) = (h.size(), w.size());
    let dev = x.device().clone();
    let (rows, oh, ow) = patch_rows(b.size(), hh, ww, K, S, P, DIL);
    if oh == 0 || ow == 0 {
        // The dilated kernel does not fit: an empty output (PyTorch raises instead).
        let (_, tape) = x.split_tape();
        let empty: Tensor<(B, Const<O>, usize, usize), E, D> =
            dev.try_zeros_like(&(b, Const::<O>, oh, ow))?;
        return Ok(empty.put_tape(tape));
    }
    // Channels last, one row per pixel, then the zero row that stands for the padding.
    let x = x.try_permute::<_, Axes4<0, 2, 3, 1>>()?;
    let x = x.try_reshape_like(&(b, hh * ww, Const::<I>))?;
    let zeros: Tensor<(B, usize, Const<I>), E, D> = dev.try_zeros_like(&(b, 1usize, Const::<I>))?;
    let x = (x, zeros).try_concat_along(Axis::<1>)?;
    let idx = dev.try_tensor_from_vec(rows, (b, oh * ow * K * K))?;
    let patches: Tensor<(B, usize, Const<I>), E, D, T> = x.try_gather(idx)?;
    let patches = patches.try_reshape_like(&(b, oh * ow, K * K * I))?;
    // weight [O, I, K, K] as a (K·K·I) × O matrix, rows ordered like the patches: (kh, kw, c).
    let wmat = weight
        .retaped::<T>()
        .try_permute::<_, Axes4<2, 3, 1, 0>>()?
        .try_reshape_like(&(K * K * I, Const::<O>))?;
    let y = patches.try_matmul(wmat)?;
    let y = match bias {
        Some(bias) => {
            let shape = *y.shape();
            y.try_add(bias.retaped::<T>().try_broadcast_like(&shape)?)?
        }
        None => y,
    };
    y.try_permute::<_, Axes3<0, 2, 1>>()?
        .try_reshape_like(&(b, Const::<O>, oh, ow))
}
