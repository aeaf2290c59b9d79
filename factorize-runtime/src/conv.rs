//! [`Conv2D`]: a 2-D convolution for dfdx 0.13 on stable Rust (dfdx's own is nightly-only).
//!
//! `y[b, o, i, j] = bias[o] + Σ_{c, p, q} weight[o, c, p, q] · x[b, c, S·i + DIL·p − P, S·j + DIL·q − P]`
//! with zero padding, PyTorch's layout and semantics (`nn.Conv2d(I, O, K, stride=S, padding=P,
//! dilation=DIL)`). Output sizes follow PyTorch's formula `⌊(H + 2P − DIL·(K−1) − 1) / S⌋ + 1`;
//! stable Rust cannot compute them in a type from the const generics, so the output's spatial
//! dims are run-time `usize` dims (the batch and channel dims stay as given / `Const<O>`).
//! An input smaller than the dilated kernel gives an empty output, where PyTorch raises.
//!
//! Autograd comes from dfdx's own ops (im2col as a batched `gather` from the channels-last
//! input with one extra zero row standing for the padding, then one `matmul`), so `backward`
//! reaches the input, the weight and the bias. Grouped convolutions are not offered.
//!
//! # Generics
//! `I` input channels, `O` output channels, `K` kernel size, `S` stride, `P` padding, `DIL`
//! dilation; `E`, `D` dtype and device.
//!
//! ```
//! use dfdx::prelude::*;
//! use factorize_runtime::conv::Conv2D;
//! let dev: Cpu = Default::default();
//! let conv = Conv2D::<3, 8, 3, 1, 1, 1, f32, Cpu>::build(&dev);
//! let y = conv.forward(dev.zeros::<Rank4<2, 3, 16, 16>>());
//! assert_eq!(y.shape().concrete(), [2, 8, 16, 16]);
//! ```

use dfdx::prelude::*;
use num_traits::Float;
use rand_distr::uniform::SampleUniform;
use rand_distr::Uniform;

/// A `K × K` convolution `I → O` with stride `S`, zero padding `P` and dilation `DIL`.
#[derive(Debug, Clone)]
pub struct Conv2D<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// `[O, I, K, K]`.
    pub weight: Tensor<Rank4<O, I, K, K>, E, D>,
    /// `[O]`.
    pub bias: Tensor<Rank1<O>, E, D>,
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Storage<E>,
    > NonMutableModule for Conv2D<I, O, K, S, P, DIL, E, D>
{
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype + Float + SampleUniform,
        D: Device<E>,
    > TensorCollection<E, D> for Conv2D<I, O, K, S, P, DIL, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = Conv2D<I, O, K, S, P, DIL, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::tensor(
                    "weight",
                    |s| &s.weight,
                    |s| &mut s.weight,
                    TensorOptions::reset_with(pytorch_init::<_, E, D, I, K>),
                ),
                Self::tensor(
                    "bias",
                    |s| &s.bias,
                    |s| &mut s.bias,
                    TensorOptions::reset_with(pytorch_init::<_, E, D, I, K>),
                ),
            ),
            |(weight, bias)| Conv2D { weight, bias },
        )
    }
}

/// PyTorch's default init of a convolution's weight and bias: uniform in ±1/sqrt(fan_in),
/// fan_in = `I·K·K`.
fn pytorch_init<
    S: Shape,
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
    const I: usize,
    const K: usize,
>(
    t: &mut Tensor<S, E, D>,
) -> Result<(), D::Err> {
    let b = E::ONE / E::from_usize(I * K * K).unwrap_or(E::ONE).sqrt();
    t.try_fill_with_distr(Uniform::new(-b, b))
}

/// PyTorch's output size, or 0 when the dilated kernel does not fit.
pub const fn output_size(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> usize {
    let span = dilation * (kernel - 1) + 1;
    let padded = input + 2 * padding;
    if padded < span || stride == 0 {
        0
    } else {
        (padded - span) / stride + 1
    }
}

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

/// A batched convolution's output: `B × O × OH × OW`, the spatial dims known at run time.
pub type Output4<B, const O: usize, E, D, T> = Tensor<(B, Const<O>, usize, usize), E, D, T>;

/// The convolution of `x` (`B × I × H × W`) with `weight` (`[O, I, K, K]`) and an optional bias.
pub(crate) fn conv2d<
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

impl<
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
    > Module<Tensor<(B, Const<I>, H, W), E, D, T>> for Conv2D<I, O, K, S, P, DIL, E, D>
{
    type Output = Tensor<(B, Const<O>, usize, usize), E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<(B, Const<I>, H, W), E, D, T>) -> Result<Self::Output, D::Err> {
        conv2d::<I, O, K, S, P, DIL, B, H, W, E, D, T>(x, &self.weight, Some(&self.bias))
    }
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        H: Dim,
        W: Dim,
        E: Dtype,
        D: Device<E>,
        T: Tape<E, D> + Merge<NoneTape>,
    > Module<Tensor<(Const<I>, H, W), E, D, T>> for Conv2D<I, O, K, S, P, DIL, E, D>
{
    type Output = Tensor<(Const<O>, usize, usize), E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<(Const<I>, H, W), E, D, T>) -> Result<Self::Output, D::Err> {
        let (_, h, w) = *x.shape();
        let x = x.try_reshape_like(&(Const::<1>, Const::<I>, h, w))?;
        let y = self.try_forward(x)?;
        let (_, _, oh, ow) = *y.shape();
        y.try_reshape_like(&(Const::<O>, oh, ow))
    }
}

/// A convolution without bias: the first map of [`crate::FactorizedConv2D`].
#[derive(Debug, Clone)]
pub struct UnbiasedConv2D<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// `[O, I, K, K]`.
    pub weight: Tensor<Rank4<O, I, K, K>, E, D>,
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Storage<E>,
    > NonMutableModule for UnbiasedConv2D<I, O, K, S, P, DIL, E, D>
{
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype + Float + SampleUniform,
        D: Device<E>,
    > TensorCollection<E, D> for UnbiasedConv2D<I, O, K, S, P, DIL, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = UnbiasedConv2D<I, O, K, S, P, DIL, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            Self::tensor(
                "weight",
                |s| &s.weight,
                |s| &mut s.weight,
                TensorOptions::reset_with(pytorch_init::<_, E, D, I, K>),
            ),
            |weight| UnbiasedConv2D { weight },
        )
    }
}

impl<
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
    > Module<Tensor<(B, Const<I>, H, W), E, D, T>> for UnbiasedConv2D<I, O, K, S, P, DIL, E, D>
{
    type Output = Tensor<(B, Const<O>, usize, usize), E, D, T>;
    type Error = D::Err;

    fn try_forward(&self, x: Tensor<(B, Const<I>, H, W), E, D, T>) -> Result<Self::Output, D::Err> {
        conv2d::<I, O, K, S, P, DIL, B, H, W, E, D, T>(x, &self.weight, None)
    }
}
