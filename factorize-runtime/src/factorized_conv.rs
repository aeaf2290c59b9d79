//! [`FactorizedConv2D`]: a `K × K` convolution `I → O` replaced by a `K × K` convolution `I → L`
//! (same stride, padding and dilation, no bias) and a `1 × 1` convolution `L → O` with bias.
//!
//! It costs `L·(I·K·K + O)` multiply-adds per output position instead of `I·K·K·O`. The weights
//! come from the truncated SVD of the dense weight seen as a matrix `[O, I·K·K]`: the first
//! factor reshaped to `[L, I, K, K]`, the second to `[O, L, 1, 1]`; the relative error of that
//! matrix is the Eckart–Young optimum, as for [`crate::FactorizedLinear`].
//!
//! ```
//! use dfdx::prelude::*;
//! use factorize_runtime::conv::Conv2D;
//! use factorize_runtime::{FactorizeConfig, FactorizedConv2D};
//! let dev: Cpu = Default::default();
//! let dense = Conv2D::<16, 32, 3, 1, 1, 1, f32, Cpu>::build(&dev);
//! let small = FactorizedConv2D::<16, 8, 32, 3, 1, 1, 1, f32, Cpu>::from_conv(&dense, &FactorizeConfig::default()).unwrap();
//! let y = small.forward(dev.zeros::<Rank4<1, 16, 10, 10>>());
//! assert_eq!(y.shape().concrete(), [1, 32, 10, 10]);
//! ```

use dfdx::prelude::*;
use num_traits::Float;
use rand_distr::uniform::SampleUniform;

use crate::calibrate::{RecordInput, RecordedInput};
use crate::config::{FactorizeConfig, Fit};
use crate::conv::unfold::Geometry;
use crate::conv::{Conv2D, UnbiasedConv2D};
use crate::convert::to_device;
use crate::cost::LayerKind;
use crate::error::FactorizeError;
use crate::pair::{self, DenseLayer, LayerTensor, LowRankPair, Seal};
use crate::report::LayerReport;
use crate::stand_in::{stand_in, DenseRoute};

/// A factorized convolution: `K × K`, `I → L`, no bias; then `1 × 1`, `L → O`, with bias.
#[derive(Debug, Clone)]
pub struct FactorizedConv2D<
    const I: usize,
    const L: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    E: Dtype,
    D: Storage<E>,
> {
    /// The `K × K` map to `L` channels.
    pub first: UnbiasedConv2D<I, L, K, S, P, DIL, E, D>,
    /// The `1 × 1` map to `O` channels, with the bias.
    pub second: Conv2D<L, O, 1, 1, 0, 1, E, D>,
}

impl<
        const I: usize,
        const L: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Storage<E>,
    > NonMutableModule for FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>
{
}

impl<
        const I: usize,
        const L: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype + Float + SampleUniform,
        D: Device<E>,
    > TensorCollection<E, D> for FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>
{
    type To<E2: Dtype, D2: Device<E2>> = FactorizedConv2D<I, L, O, K, S, P, DIL, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("first", |s| &s.first, |s| &mut s.first),
                Self::module("second", |s| &s.second, |s| &mut s.second),
            ),
            |(first, second)| FactorizedConv2D { first, second },
        )
    }
}

impl<
        const I: usize,
        const L: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Device<E>,
        X,
        Y,
    > Module<X> for FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>
where
    X: RecordInput,
    UnbiasedConv2D<I, L, K, S, P, DIL, E, D>: Module<X, Output = Y, Error = D::Err>,
    Conv2D<L, O, 1, 1, 0, 1, E, D>: Module<Y, Error = D::Err>,
    Y: DenseRoute<
        Conv2D<I, O, K, S, P, DIL, E, D>,
        X,
        <Conv2D<L, O, 1, 1, 0, 1, E, D> as Module<Y>>::Output,
        D::Err,
    >,
{
    type Output = <Conv2D<L, O, 1, 1, 0, 1, E, D> as Module<Y>>::Output;
    type Error = D::Err;

    fn try_forward(&self, x: X) -> Result<Self::Output, D::Err> {
        let address = self as *const Self as usize;
        // No-ops unless a calibration pass is recording, or a dense layer stands in.
        x.record(address);
        if let Some(dense) = stand_in::<Conv2D<I, O, K, S, P, DIL, E, D>>(address) {
            return Y::dense_forward(&dense, x);
        }
        self.second.try_forward(self.first.try_forward(x)?)
    }
}

impl<
        const I: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Device<E>,
    > DenseLayer for Conv2D<I, O, K, S, P, DIL, E, D>
{
    const SEAL: Seal = Seal;
    type Elem = E;
    type Dev = D;
    type Pair<const L: usize> = FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>;
    const KIND: LayerKind = LayerKind::Conv2D;
    const IN: usize = I;
    const OUT: usize = O;
    const KERNEL: usize = K;

    fn tensors(&self) -> [&dyn LayerTensor<D>; 2] {
        [&self.weight, &self.bias]
    }

    fn from_host(
        dev: &D,
        weight: &[f64],
        bias: &[f64],
        path: &str,
    ) -> Result<Self, FactorizeError> {
        let (i, o, k) = (Const::<I>, Const::<O>, Const::<K>);
        Ok(Conv2D {
            weight: to_device(dev, weight, (o, i, k, k), path)?,
            bias: to_device(dev, bias, (o,), path)?,
        })
    }

    /// Every `K × K` patch of the recorded images (with the layer's stride, padding and
    /// dilation) is one row.
    fn calibration_rows(path: &str, inputs: &[RecordedInput]) -> Result<Vec<f64>, FactorizeError> {
        image_patches::<I, K, S, P, DIL>(path, inputs)
    }
}

impl<
        const I: usize,
        const L: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Device<E>,
    > LowRankPair for FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>
{
    type Dense = Conv2D<I, O, K, S, P, DIL, E, D>;
    const SEAL: Seal = Seal;
    const RANK: usize = L;

    fn from_host(
        dev: &D,
        first: &[f64],
        second: &[f64],
        bias: &[f64],
        path: &str,
    ) -> Result<Self, FactorizeError> {
        let (l, i, o, k, one) = (Const::<L>, Const::<I>, Const::<O>, Const::<K>, Const::<1>);
        Ok(FactorizedConv2D {
            first: UnbiasedConv2D {
                weight: to_device(dev, first, (l, i, k, k), path)?,
            },
            second: Conv2D {
                weight: to_device(dev, second, (o, l, one, one), path)?,
                bias: to_device(dev, bias, (o,), path)?,
            },
        })
    }

    fn tensors(&self) -> [&dyn LayerTensor<D>; 3] {
        [&self.first.weight, &self.second.weight, &self.second.bias]
    }
}

impl<
        const I: usize,
        const L: usize,
        const O: usize,
        const K: usize,
        const S: usize,
        const P: usize,
        const DIL: usize,
        E: Dtype,
        D: Device<E>,
    > FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>
{
    /// Builds the factorized convolution from `conv` (truncated SVD of `[O, I·K·K]` by
    /// default); `conv` is only read.
    pub fn from_conv(
        conv: &Conv2D<I, O, K, S, P, DIL, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<Self, FactorizeError> {
        pair::build(CONV, conv, cfg).map(|(layer, _)| layer)
    }

    /// As [`Self::from_conv`], naming the layer `path` in errors and in the report row it also
    /// returns.
    pub fn from_conv_with_report(
        path: &str,
        conv: &Conv2D<I, O, K, S, P, DIL, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        pair::build(path, conv, cfg)
    }

    /// Builds the factorized convolution fitted to the outputs of `conv` on calibration images
    /// (`N × I × H × W`): every `K × K` patch (with the layer's stride, padding and dilation) is
    /// one calibration row of the unfolded weight `[O, I·K·K]`, fitted as
    /// [`FactorizedLinear::from_linear_calibrated`](crate::FactorizedLinear::from_linear_calibrated)
    /// fits, on `cfg.backend`; the bias is refitted. The report row carries the calibration
    /// nmse over all output positions and the backend used.
    pub fn from_conv_calibrated<N: Dim, H: Dim, W: Dim>(
        path: &str,
        conv: &Conv2D<I, O, K, S, P, DIL, E, D>,
        images: &Tensor<(N, Const<I>, H, W), E, D>,
        fit: Fit,
        cfg: &FactorizeConfig,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        pair::fit_dense(path, conv, &[RecordedInput::of(images)], fit, cfg)
    }

    /// Lowers the rank to `L2 < L` (checked when the call is compiled): the best rank-`L2`
    /// approximation of the convolution this pair computes (truncated SVD of its unfolded
    /// product `[O, I·K·K]`, on `cfg.backend`), bias kept.
    pub fn reduce<const L2: usize>(
        &self,
        cfg: &FactorizeConfig,
    ) -> Result<FactorizedConv2D<I, L2, O, K, S, P, DIL, E, D>, FactorizeError> {
        const {
            assert!(
                L2 < L,
                "reduce::<L2>() needs L2 < L: a rank can only be lowered"
            )
        };
        pair::reduce(self, cfg)
    }
}

/// The name of a layer built without a path.
const CONV: &str = "conv";

/// The `K × K` patches of the recorded images (`[n, I, h, w]` or `[I, h, w]` each), as rows.
fn image_patches<
    const I: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
>(
    path: &str,
    inputs: &[RecordedInput],
) -> Result<Vec<f64>, FactorizeError> {
    let mut rows = Vec::new();
    for input in inputs {
        let (n, h, w) = match input.shape.as_slice() {
            [n, c, h, w] if *c == I => (*n, *h, *w),
            [c, h, w] if *c == I => (1, *h, *w),
            other => {
                return Err(FactorizeError::Calibration {
                    layer: path.to_string(),
                    reason: format!("expected images with {I} channels, got dims {other:?}"),
                })
            }
        };
        rows.extend(patches::<I, K, S, P, DIL>(&input.values, n, h, w));
    }
    if rows.is_empty() {
        return Err(FactorizeError::Calibration {
            layer: path.to_string(),
            reason: format!("no {K}×{K} patch fits in the calibration images"),
        });
    }
    Ok(rows)
}

/// The `K × K` patches of `images` (`n × I × h × w`, row-major) as rows of length `I·K·K`
/// ordered like the unfolded weight `[O, I, K, K]` (channel, then kernel row, then column),
/// zero where a patch reaches into the padding: each image's unfolded matrix, transposed.
fn patches<const I: usize, const K: usize, const S: usize, const P: usize, const DIL: usize>(
    images: &[f64],
    n: usize,
    h: usize,
    w: usize,
) -> Vec<f64> {
    let g = Geometry::new(I, (h, w), K, S, P, DIL);
    let (fan_in, positions) = (g.fan_in(), g.positions());
    let mut unfolded = vec![0.0; fan_in * positions];
    let mut rows = vec![0.0; n * positions * fan_in];
    if rows.is_empty() {
        return rows;
    }
    for (image, rows) in images
        .chunks_exact(g.image_len())
        .zip(rows.chunks_exact_mut(positions * fan_in))
    {
        g.unfold(image, 0..g.out_height, &mut unfolded);
        for (r, column) in unfolded.chunks_exact(positions).enumerate() {
            for (position, &v) in column.iter().enumerate() {
                rows[position * fan_in + r] = v;
            }
        }
    }
    rows
}
