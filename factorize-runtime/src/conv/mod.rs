//! [`Conv2D`]: a 2-D convolution for dfdx 0.13 on stable Rust (dfdx's own is nightly-only).
//!
//! `y[b, o, i, j] = bias[o] + Σ_{c, p, q} weight[o, c, p, q] · x[b, c, S·i + DIL·p − P, S·j + DIL·q − P]`
//! with zero padding, PyTorch's layout and semantics (`nn.Conv2d(I, O, K, stride=S, padding=P,
//! dilation=DIL)`). Output sizes follow PyTorch's formula `⌊(H + 2P − DIL·(K−1) − 1) / S⌋ + 1`;
//! stable Rust cannot compute them in a type from the const generics, so the output's spatial
//! dims are run-time `usize` dims (the batch and channel dims stay as given / `Const<O>`).
//! An input smaller than the dilated kernel gives an empty output, where PyTorch raises.
//!
//! On dfdx's `Cpu` device in f32 and f64 a convolution is one autograd op: each image is
//! unfolded (im2col) one band of output rows at a time and multiplied by the weight with
//! faer's GEMM, images in parallel, and the backward pass folds (col2im) the gradient the same
//! way (`conv/unfold.rs`, `conv/host.rs`, `conv/cpu.rs`). Other devices and dtypes compose
//! dfdx's own ops (a batched `gather`, then `matmul`; `conv/gather.rs`). Either way `backward`
//! reaches the input, the weight and the bias. Grouped convolutions are not offered.
//!
//! # Generics
//! `I` input channels, `O` output channels, `K` kernel size, `S` stride, `P` padding, `DIL`
//! dilation; `E`, `D` dtype and device. `K`, `S` and `DIL` of 0 do not build:
//!
//! ```compile_fail,E0080
//! use dfdx::prelude::*;
//! use factorize_runtime::conv::Conv2D;
//! let dev: Cpu = Default::default();
//! let conv = Conv2D::<3, 8, 3, 0, 1, 1, f32, Cpu>::build(&dev);
//! let _ = conv.forward(dev.zeros::<Rank4<2, 3, 16, 16>>());
//! ```
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

mod cpu;
mod gather;
pub(crate) mod host;
pub(crate) mod unfold;

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

/// PyTorch's output size, or 0 when the dilated kernel does not fit (or a kernel size, stride
/// or dilation is 0).
pub const fn output_size(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> usize {
    if kernel == 0 || stride == 0 || dilation == 0 {
        return 0;
    }
    let span = dilation * (kernel - 1) + 1;
    let padded = input + 2 * padding;
    if padded < span {
        0
    } else {
        (padded - span) / stride + 1
    }
}

/// A batched convolution's output: `B × O × OH × OW`, the spatial dims known at run time.
pub type Output4<B, const O: usize, E, D, T> = Tensor<(B, Const<O>, usize, usize), E, D, T>;

/// The convolution of `x` (`B × I × H × W`) with `weight` (`[O, I, K, K]`) and an optional bias:
/// the host kernel on `Cpu` in f32/f64, dfdx's composed ops elsewhere.
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
    const {
        assert!(
            K >= 1 && S >= 1 && DIL >= 1,
            "Conv2D needs a kernel size, stride and dilation of at least 1"
        )
    };
    // Contiguous (a no-op for the usual contiguous tensors), so that the host kernel may read
    // the buffers as they are; a copy's backward op on the tape routes gradients back.
    let (x, tape) = x.try_contiguous()?.split_tape();
    let (weight, weight_tape) = weight.retaped::<T>().try_contiguous()?.split_tape();
    let (bias, bias_tape) = match bias {
        Some(b) => {
            let (b, t) = b.retaped::<T>().try_contiguous()?.split_tape();
            (Some(b), t)
        }
        None => (None, T::default()),
    };
    let mut tape = tape.merge(weight_tape).merge(bias_tape);
    let record = T::OWNS_TAPE;
    let routed =
        cpu::on_cpu::<f32, I, O, K, S, P, DIL, B, H, W, E, D>(&x, &weight, bias.as_ref(), record)
            .or_else(|| {
                cpu::on_cpu::<f64, I, O, K, S, P, DIL, B, H, W, E, D>(
                    &x,
                    &weight,
                    bias.as_ref(),
                    record,
                )
            });
    match routed {
        Some(routed) => {
            let routed = routed?;
            if let Some(op) = routed.backward {
                tape.add_backward_op(op);
            }
            Ok(routed.output.put_tape(tape))
        }
        None => gather::conv2d::<I, O, K, S, P, DIL, B, H, W, E, D, T>(
            x.put_tape(tape),
            &weight,
            bias.as_ref(),
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Output and input/weight/bias gradients of `⟨conv(x), r⟩` through the routed op and
    /// through the composed ops, for one geometry.
    fn both_routes<const K: usize, const S: usize, const P: usize, const DIL: usize, E>(
        batch: usize,
        tolerance: f64,
    ) where
        E: Dtype + Float + SampleUniform + num_traits::AsPrimitive<f64>,
        Cpu: Device<E>,
        rand_distr::StandardNormal: rand_distr::Distribution<E>,
    {
        let dev = Cpu::seed_from_u64((batch * 1000 + K * 100 + S * 10 + P) as u64);
        let conv = Conv2D::<3, 5, K, S, P, DIL, E, Cpu>::build(&dev);
        let x: Tensor<(usize, Const<3>, usize, usize), E, Cpu> =
            dev.sample_normal_like(&(batch, Const, 9, 7));
        let (oh, ow) = (output_size(9, K, S, P, DIL), output_size(7, K, S, P, DIL));
        let r: Tensor<(usize, Const<5>, usize, usize), E, Cpu> =
            dev.sample_normal_like(&(batch, Const, oh, ow));
        let run = |routed: bool| {
            let y = if routed {
                conv2d::<3, 5, K, S, P, DIL, _, _, _, E, Cpu, _>(
                    x.leaky_trace(),
                    &conv.weight,
                    Some(&conv.bias),
                )
            } else {
                gather::conv2d::<3, 5, K, S, P, DIL, _, _, _, E, Cpu, _>(
                    x.leaky_trace(),
                    &conv.weight,
                    Some(&conv.bias),
                )
            }
            .unwrap();
            let values = y.as_vec();
            let grads = (y * r.clone()).sum::<Rank0, _>().backward();
            let dx = grads.get(&x).as_vec();
            (
                values,
                dx,
                grads.get(&conv.weight).as_vec(),
                grads.get(&conv.bias).as_vec(),
            )
        };
        let close = |a: &[E], b: &[E], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (u, v) in a.iter().zip(b) {
                let (u, v): (f64, f64) = (u.as_(), v.as_());
                assert!(
                    (u - v).abs() <= tolerance * (1.0 + v.abs()),
                    "{what}: {u} vs {v}"
                );
            }
        };
        let (y1, dx1, dw1, db1) = run(true);
        let (y2, dx2, dw2, db2) = run(false);
        close(&y1, &y2, "output");
        close(&dx1, &dx2, "input gradient");
        close(&dw1, &dw2, "weight gradient");
        close(&db1, &db2, "bias gradient");
    }

    #[test]
    fn the_host_kernel_agrees_with_the_composed_ops() {
        for batch in [1, 2, 3] {
            both_routes::<3, 1, 1, 1, f64>(batch, 1e-12);
            both_routes::<3, 2, 1, 2, f64>(batch, 1e-12);
            both_routes::<1, 1, 0, 1, f64>(batch, 1e-12);
            both_routes::<1, 2, 0, 1, f64>(batch, 1e-12);
            both_routes::<5, 1, 3, 1, f32>(batch, 1e-4);
            both_routes::<7, 3, 0, 1, f32>(batch, 1e-4);
        }
    }

    #[test]
    fn strided_inputs_are_read_in_logical_order_and_get_their_gradients() {
        let dev = Cpu::seed_from_u64(5);
        let conv = Conv2D::<3, 4, 3, 1, 1, 1, f64, Cpu>::build(&dev);
        // Stored as B × H × C × W; the conv sees the permuted view B × C × H × W.
        let stored: Tensor<Rank4<2, 6, 3, 5>, f64, Cpu> = dev.sample_normal();
        let copy: Tensor<Rank4<2, 3, 6, 5>, f64, Cpu> = dev.tensor_from_vec(
            stored.clone().permute::<_, Axes4<0, 2, 1, 3>>().as_vec(),
            Default::default(),
        );
        let y = conv.forward(stored.leaky_trace().permute::<_, Axes4<0, 2, 1, 3>>());
        assert_eq!(y.as_vec(), conv.forward(copy.clone()).as_vec());
        let grads = y.sum::<Rank0, _>().backward();
        let through_copy = conv
            .forward(copy.leaky_trace())
            .sum::<Rank0, _>()
            .backward();
        let want = through_copy
            .get(&copy)
            .permute::<_, Axes4<0, 2, 1, 3>>()
            .as_vec();
        assert_eq!(grads.get(&stored).as_vec(), want);
    }

    #[test]
    fn an_image_without_rows_reads_only_padding() {
        let dev = Cpu::seed_from_u64(6);
        let conv = Conv2D::<2, 3, 1, 1, 1, 1, f64, Cpu>::build(&dev);
        let x: Tensor<(Const<2>, Const<2>, usize, usize), f64, Cpu> =
            dev.zeros_like(&(Const, Const, 0, 3));
        let y = conv.forward(x.leaky_trace());
        assert_eq!(y.shape().concrete(), [2, 3, 2, 5]);
        let bias = conv.bias.as_vec();
        let values = y.as_vec();
        for (k, plane) in values.chunks_exact(10).enumerate() {
            assert!(plane.iter().all(|&v| v == bias[k % 3]), "{plane:?}");
        }
        let grads = y.sum::<Rank0, _>().backward();
        assert_eq!(grads.get(&conv.bias).as_vec(), [20.0; 3]);
        assert!(grads.get(&conv.weight).as_vec().iter().all(|&v| v == 0.0));
    }
}
