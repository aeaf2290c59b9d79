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

use std::time::Instant;

use dfdx::prelude::*;
use num_traits::Float;
use rand_distr::uniform::SampleUniform;

use crate::calibrate::{RecordInput, RecordedInput, Refit};
use crate::conv::unfold::Geometry;
use crate::conv::{Conv2D, UnbiasedConv2D};
use crate::cost::LayerKind;
use crate::engine::calibrated::{fit_linear_on, nmse, CalibratedFit, Calibration, Fit};
use crate::engine::{self, check_finite, WeightMatrix};
use crate::linear::{host_f64, to_device};
use crate::report::{LayerReport, Status};
use crate::{Backend, FactorizeConfig, FactorizeError, Method};

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
{
    type Output = <Conv2D<L, O, 1, 1, 0, 1, E, D> as Module<Y>>::Output;
    type Error = D::Err;

    fn try_forward(&self, x: X) -> Result<Self::Output, D::Err> {
        // A no-op unless a calibration pass is recording on this thread.
        x.record(self as *const Self as usize);
        self.second.try_forward(self.first.try_forward(x)?)
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
    /// The layer from host factors: `first` `[L, I·K·K]` and `second` `[O, L]`, row-major.
    fn from_host(
        dev: &D,
        first: &[f64],
        second: &[f64],
        bias: Tensor<Rank1<O>, E, D>,
        path: &str,
    ) -> Result<Self, FactorizeError> {
        Ok(FactorizedConv2D {
            first: UnbiasedConv2D {
                weight: to_device(
                    dev,
                    first,
                    (Const::<L>, Const::<I>, Const::<K>, Const::<K>),
                    path,
                )?,
            },
            second: Conv2D {
                weight: to_device(
                    dev,
                    second,
                    (Const::<O>, Const::<L>, Const::<1>, Const::<1>),
                    path,
                )?,
                bias,
            },
        })
    }

    /// Builds the factorized convolution from `conv` (truncated SVD of `[O, I·K·K]` by
    /// default); `conv` is only read.
    pub fn from_conv(
        conv: &Conv2D<I, O, K, S, P, DIL, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<Self, FactorizeError> {
        Self::from_conv_named("conv", conv, cfg).map(|(layer, _)| layer)
    }

    /// As [`Self::from_conv`], naming the layer `path` in errors and in the report row.
    pub fn from_conv_named(
        path: &str,
        conv: &Conv2D<I, O, K, S, P, DIL, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        let start = Instant::now();
        let fan_in = I * K * K;
        let weight = host_f64(&conv.weight);
        check_finite(path, "bias", &host_f64(&conv.bias))?;
        let w = WeightMatrix::new(path, &weight, O, fan_in)?;
        w.check_rank(L)?;
        let dev = conv.weight.device();
        let mut row = LayerReport::kept(path, LayerKind::Conv2d, I, O, K, Status::Replaced);
        let (first, second, error, backend, note) = match cfg.method {
            Method::Svd => {
                let solved = engine::solve(&w, L, cfg)?;
                let f = solved.factors;
                (
                    f.first,
                    f.second,
                    f.relative_error,
                    solved.backend,
                    solved.note,
                )
            }
            Method::Fresh => {
                let first = crate::linear::fresh_uniform(L * fan_in, fan_in, 1);
                let second = crate::linear::fresh_uniform(O * L, L, 2);
                let err = engine::relative_error(&w, &second, &first, L);
                (first, second, err, crate::Backend::Cpu, None)
            }
        };
        let bias = match cfg.method {
            Method::Svd => conv.bias.clone(),
            Method::Fresh => to_device(
                dev,
                &crate::linear::fresh_uniform(O, L, 3),
                (Const::<O>,),
                path,
            )?,
        };
        let layer = Self::from_host(dev, &first, &second, bias, path)?;
        row.set_replaced(L, error, backend, start.elapsed());
        row.note = note;
        Ok((layer, row))
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
    /// Builds the factorized convolution fitted to the outputs of `conv` on calibration images
    /// (`N × I × H × W`): every `K × K` patch (with the layer's stride, padding and dilation) is
    /// one calibration row of the unfolded weight `[O, I·K·K]`, fitted as
    /// [`crate::engine::calibrated::fit_linear`] does; the bias is refitted. The report row
    /// carries the calibration nmse over all output positions and the backend (the GPU when
    /// one is usable, as under [`Backend::Auto`], else the CPU; ALS always on the CPU).
    pub fn from_conv_calibrated<N: Dim, H: Dim, W: Dim>(
        path: &str,
        conv: &Conv2D<I, O, K, S, P, DIL, E, D>,
        images: &Tensor<(N, Const<I>, H, W), E, D>,
        fit: Fit,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        let (n, _, h, w) = *images.shape();
        let input = RecordedInput {
            shape: vec![n.size(), I, h.size(), w.size()],
            values: host_f64(images),
        };
        let weight = host_f64(&conv.weight);
        let bias = host_f64(&conv.bias);
        let (fitted, row) = fit_images::<I, L, O, K, S, P, DIL>(
            path,
            &weight,
            &bias,
            &[input],
            fit,
            Backend::Auto,
        )?;
        let dev = conv.weight.device();
        let bias = to_device(dev, &fitted.bias, (Const::<O>,), path)?;
        let layer = Self::from_host(
            dev,
            &fitted.factors.first,
            &fitted.factors.second,
            bias,
            path,
        )?;
        Ok((layer, row))
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
    > Refit for FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>
{
    fn address(&self) -> usize {
        self as *const Self as usize
    }

    fn refit(
        &mut self,
        path: &str,
        weight: &[f64],
        bias: &[f64],
        inputs: &[RecordedInput],
        fit: Fit,
        backend: Backend,
    ) -> Result<LayerReport, FactorizeError> {
        let (fitted, row) =
            fit_images::<I, L, O, K, S, P, DIL>(path, weight, bias, inputs, fit, backend)?;
        let dev = self.second.weight.device().clone();
        let bias = to_device(&dev, &fitted.bias, (Const::<O>,), path)?;
        // Replaces the layer only once the new one is complete.
        *self = Self::from_host(
            &dev,
            &fitted.factors.first,
            &fitted.factors.second,
            bias,
            path,
        )?;
        Ok(row)
    }

    fn nmse_on(
        &self,
        path: &str,
        weight: &[f64],
        bias: &[f64],
        inputs: &[RecordedInput],
    ) -> Result<f64, FactorizeError> {
        let fan_in = I * K * K;
        let rows = image_patches::<I, K, S, P, DIL>(path, inputs)?;
        let m = WeightMatrix::new(path, weight, O, fan_in)?;
        let calib = Calibration::new(path, &rows, rows.len() / fan_in, fan_in)?;
        let factors = crate::linear::current_factors(
            O,
            fan_in,
            L,
            host_f64(&self.first.weight),
            host_f64(&self.second.weight),
        );
        nmse(&m, bias, &factors, &host_f64(&self.second.bias), &calib)
    }
}

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

/// The data-aware fit of a convolution's unfolded weight `[O, I·K·K]` on the `K × K` patches of
/// the recorded images (`[n, I, h, w]` or `[I, h, w]` each), and its report row.
fn fit_images<
    const I: usize,
    const L: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
>(
    path: &str,
    weight: &[f64],
    bias: &[f64],
    inputs: &[RecordedInput],
    fit: Fit,
    backend: Backend,
) -> Result<(CalibratedFit, LayerReport), FactorizeError> {
    let start = Instant::now();
    let fan_in = I * K * K;
    let rows = image_patches::<I, K, S, P, DIL>(path, inputs)?;
    let m = WeightMatrix::new(path, weight, O, fan_in)?;
    let calib = Calibration::new(path, &rows, rows.len() / fan_in, fan_in)?;
    let (f, used) = fit_linear_on(&m, bias, &calib, L, fit, backend)?;
    let mut row = LayerReport::kept(path, LayerKind::Conv2d, I, O, K, Status::Replaced);
    row.set_replaced(L, f.factors.relative_error, used, start.elapsed());
    row.nmse = Some(f.nmse);
    Ok((f, row))
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
