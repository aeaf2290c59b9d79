//! [`FactorizedLinear`]: a `Linear(I → O)` replaced by `Linear(I → L, no bias)` then
//! `Linear(L → O)`.
//!
//! `y = B·(A·x) + b` with `A: [L, I]` (`first.weight`) and `B: [O, L]`, `b: [O]`
//! (`second.weight`, `second.bias`). It costs `L·(I + O)` multiply-adds per row instead of `I·O`.
//! PyTorch equivalent: `nn.Sequential(nn.Linear(I, L, bias=False), nn.Linear(L, O))`, which is
//! what Composer's `FactorizedLinear` computes.
//!
//! # Generics
//! - `I`: input features, `L`: rank (latent features), `O`: output features.
//! - `E`, `D`: dfdx dtype and device.
//!
//! # Examples
//! ```
//! use dfdx::prelude::*;
//! use factorize_runtime::{FactorizedLinear, FactorizeConfig};
//! let dev: Cpu = Default::default();
//! let dense = dev.build_module::<Linear<8, 6>, f32>();
//! let small: FactorizedLinear<8, 2, 6, f32, Cpu> =
//!     FactorizedLinear::from_linear(&dense, &FactorizeConfig::default()).unwrap();
//! // Same input and output types as the dense layer.
//! let y: Tensor<Rank2<3, 6>, f32, Cpu> = small.forward(dev.zeros::<Rank2<3, 8>>());
//! assert_eq!(y.array()[0], dense.bias.array());
//! ```

use std::time::Instant;

use dfdx::nn::modules::{Linear, UnbiasedLinear};
use dfdx::prelude::*;
use num_traits::Float;
use rand_distr::uniform::SampleUniform;

use crate::calibrate::{RecordInput, RecordedInput, Refit};
use crate::cost::LayerKind;
use crate::engine::calibrated::{fit_linear_on, nmse, Calibration, Fit};
use crate::engine::{self, check_finite, WeightMatrix};
use crate::report::{LayerReport, Status};
use crate::{Backend, FactorizeConfig, FactorizeError, Method};

/// The builder type, for `dev.build_module::<builder::FactorizedLinear<I, L, O>, E>()`.
pub mod builder {
    /// Builds a [`super::FactorizedLinear`] with dfdx's default init.
    #[derive(Debug, Copy, Clone, Eq, PartialEq)]
    pub struct FactorizedLinear<const I: usize, const L: usize, const O: usize>;
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>> BuildOnDevice<D, E>
    for builder::FactorizedLinear<I, L, O>
where
    FactorizedLinear<I, L, O, E, D>: BuildModule<D, E>,
{
    type Built = FactorizedLinear<I, L, O, E, D>;
    fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
        Self::Built::try_build(device)
    }
}

/// A factorized linear layer: `I → L` without bias, then `L → O` with bias.
#[derive(Debug, Clone)]
pub struct FactorizedLinear<const I: usize, const L: usize, const O: usize, E: Dtype, D: Storage<E>>
{
    /// The first map, `A: [L, I]`.
    pub first: UnbiasedLinear<I, L, E, D>,
    /// The second map, `B: [O, L]` and the bias `[O]`.
    pub second: Linear<L, O, E, D>,
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for FactorizedLinear<I, L, O, E, D>
{
}

impl<const I: usize, const L: usize, const O: usize, E, D> TensorCollection<E, D>
    for FactorizedLinear<I, L, O, E, D>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = FactorizedLinear<I, L, O, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("first", |s| &s.first, |s| &mut s.first),
                Self::module("second", |s| &s.second, |s| &mut s.second),
            ),
            |(first, second)| FactorizedLinear { first, second },
        )
    }
}

impl<const I: usize, const L: usize, const O: usize, E, D, T, U> Module<T>
    for FactorizedLinear<I, L, O, E, D>
where
    E: Dtype,
    D: Device<E>,
    T: RecordInput,
    UnbiasedLinear<I, L, E, D>: Module<T, Output = U, Error = D::Err>,
    Linear<L, O, E, D>: Module<U, Error = D::Err>,
{
    type Output = <Linear<L, O, E, D> as Module<U>>::Output;
    type Error = D::Err;

    fn try_forward(&self, x: T) -> Result<Self::Output, D::Err> {
        // A no-op unless a calibration pass is recording on this thread.
        x.record(self as *const Self as usize);
        self.second.try_forward(self.first.try_forward(x)?)
    }
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>> Refit
    for FactorizedLinear<I, L, O, E, D>
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
        let start = Instant::now();
        let w = WeightMatrix::new(path, weight, O, I)?;
        let inputs: Vec<f64> = inputs
            .iter()
            .flat_map(|x| x.values.iter().copied())
            .collect();
        let calib = Calibration::new(path, &inputs, inputs.len() / I, I)?;
        let (f, used) = fit_linear_on(&w, bias, &calib, L, fit, backend)?;
        let dev = self.second.weight.device().clone();
        let bias = to_device(&dev, &f.bias, (Const::<O>,), path)?;
        // Replaces the layer only once the new one is complete.
        *self = Self::from_host(&dev, &f.factors.first, &f.factors.second, bias, path)?;
        Ok(calibrated_row(path, I, O, &f, calib.rows(), used, start))
    }

    fn nmse_on(
        &self,
        path: &str,
        weight: &[f64],
        bias: &[f64],
        inputs: &[RecordedInput],
    ) -> Result<f64, FactorizeError> {
        let w = WeightMatrix::new(path, weight, O, I)?;
        let inputs: Vec<f64> = inputs
            .iter()
            .flat_map(|x| x.values.iter().copied())
            .collect();
        let calib = Calibration::new(path, &inputs, inputs.len() / I, I)?;
        let factors = current_factors(
            O,
            I,
            L,
            host_f64(&self.first.weight),
            host_f64(&self.second.weight),
        );
        nmse(&w, bias, &factors, &host_f64(&self.second.bias), &calib)
    }
}

/// A layer's current factors as a [`crate::engine::LowRank`], for measuring it.
pub(crate) fn current_factors(
    out_dim: usize,
    in_dim: usize,
    rank: usize,
    first: Vec<f64>,
    second: Vec<f64>,
) -> crate::engine::LowRank {
    crate::engine::LowRank {
        out_dim,
        in_dim,
        rank,
        first,
        second,
        singular_values: Vec::new(),
        relative_error: f64::NAN,
        iterations: 0,
    }
}

/// The report row of a data-aware fit.
fn calibrated_row(
    path: &str,
    i: usize,
    o: usize,
    f: &crate::engine::calibrated::CalibratedFit,
    rows: usize,
    backend: Backend,
    start: Instant,
) -> LayerReport {
    let mut row = LayerReport::kept(path, LayerKind::Linear, i, o, 1, Status::Replaced);
    row.set_replaced(
        f.factors.rank,
        f.factors.relative_error,
        backend,
        start.elapsed(),
    );
    row.nmse = Some(f.nmse);
    if f.rank_deficient {
        row.note = Some(format!(
            "{rows} calibration rows cannot span {i} inputs (ridge {:.3e})",
            f.ridge
        ));
    }
    row
}

/// `count` values uniform in `±1/sqrt(fan_in)`, reproducible from `seed`.
pub(crate) fn fresh_uniform(count: usize, fan_in: usize, seed: u64) -> Vec<f64> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let mut rng = crate::engine::Gaussian::new(seed);
    (0..count)
        .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
        .collect()
}

/// Reads a tensor (with or without a tape) to `f64` on the host; NaN where a value has no
/// `f64` form, so that the finiteness checks catch it.
pub(crate) fn host_f64<S: Shape, E: Dtype, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Vec<f64> {
    use rayon::prelude::*;
    // dfdx's `as_vec` panics on a tensor without elements (a calibration batch of 0 rows).
    if t.shape().num_elements() == 0 {
        return Vec::new();
    }
    // `as_vec` walks the tensor element by element; a contiguous tensor (a no-op to get for
    // stored weights) is one bulk copy, converted on all cores: a 4096×4096 weight is 16M
    // values, read once per factorization.
    let values = match t.retaped::<NoneTape>().try_contiguous() {
        Ok(c) => {
            let mut values = crate::engine::touched(c.shape().num_elements());
            c.copy_into(&mut values);
            values
        }
        Err(_) => t.as_vec(),
    };
    values
        .into_par_iter()
        .map(|x| x.to_f64().unwrap_or(f64::NAN))
        .collect()
}

/// Writes `f64` host values into a new tensor of `shape` on `dev`.
pub(crate) fn to_device<S: Shape, E: Dtype, D: Device<E>>(
    dev: &D,
    values: &[f64],
    shape: S,
    layer: &str,
) -> Result<Tensor<S, E, D>, FactorizeError> {
    use rayon::prelude::*;
    let data: Vec<E> = values
        .par_iter()
        .map(|&x| E::from_f64(x).unwrap_or_default())
        .collect();
    dev.try_tensor_from_vec(data, shape)
        .map_err(|e| FactorizeError::Device {
            layer: layer.to_string(),
            reason: format!("{e:?}"),
        })
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>>
    FactorizedLinear<I, L, O, E, D>
{
    /// The layer from host factors: `first` `[L, I]` and `second` `[O, L]`, row-major.
    fn from_host(
        dev: &D,
        first: &[f64],
        second: &[f64],
        bias: Tensor<Rank1<O>, E, D>,
        path: &str,
    ) -> Result<Self, FactorizeError> {
        Ok(FactorizedLinear {
            first: UnbiasedLinear {
                weight: to_device(dev, first, (Const::<L>, Const::<I>), path)?,
            },
            second: Linear {
                weight: to_device(dev, second, (Const::<O>, Const::<L>), path)?,
                bias,
            },
        })
    }

    /// Builds the factorized layer from `linear` as `cfg` says (truncated SVD by default).
    ///
    /// `linear` is only read. Errors: NaN/Inf in its weight or bias, `L > min(I, O)`, a failed
    /// solver or an unavailable backend; the layer is called `linear` in messages (see
    /// [`Self::from_linear_named`] to name it).
    pub fn from_linear(
        linear: &Linear<I, O, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<Self, FactorizeError> {
        Self::from_linear_named("linear", linear, cfg).map(|(layer, _)| layer)
    }

    /// As [`Self::from_linear`], naming the layer `path` in errors and in the report row it returns.
    pub fn from_linear_named(
        path: &str,
        linear: &Linear<I, O, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        let start = Instant::now();
        let _progress = crate::progress::Layer::start(cfg, path, &format!("{I}→{O}, rank {L}"));
        let weight = host_f64(&linear.weight);
        let bias = host_f64(&linear.bias);
        let w = WeightMatrix::new(path, &weight, O, I)?;
        check_finite(path, "bias", &bias)?;
        w.check_rank(L)?;
        let dev = linear.weight.device();
        let mut row = LayerReport::kept(path, LayerKind::Linear, I, O, 1, Status::Replaced);
        let layer = match cfg.method {
            Method::Svd => {
                let solved = engine::solve(&w, L, cfg)?;
                let f = &solved.factors;
                let layer = Self::from_host(dev, &f.first, &f.second, linear.bias.clone(), path)?;
                row.set_replaced(L, f.relative_error, solved.backend, start.elapsed());
                row.note = solved.note;
                layer
            }
            Method::Fresh => {
                // PyTorch's (and dfdx's) default init: uniform in ±1/sqrt(fan_in), here from a
                // fixed-seed stream so that runs are reproducible.
                let first = fresh_uniform(L * I, I, 1);
                let second = fresh_uniform(O * L, L, 2);
                let err = engine::relative_error(&w, &second, &first, L);
                let bias = to_device(dev, &fresh_uniform(O, L, 3), (Const::<O>,), path)?;
                let layer = Self::from_host(dev, &first, &second, bias, path)?;
                row.set_replaced(L, err, crate::Backend::Cpu, start.elapsed());
                layer
            }
        };
        Ok((layer, row))
    }
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>>
    FactorizedLinear<I, L, O, E, D>
{
    /// Builds the layer fitted to the outputs of `linear` on calibration inputs `inputs`
    /// (rows × `I`), as [`Fit`] says: the exact output-optimal pair (default) or Composer's ALS.
    /// The bias of the second map is refitted. The report row carries the calibration nmse and
    /// the backend: the exact fit runs on the GPU when one is usable (as under
    /// [`Backend::Auto`]), else on the CPU; ALS always on the CPU.
    ///
    /// Errors: NaN/Inf in weights or inputs, no rows, `L > min(I, O)`.
    pub fn from_linear_calibrated<N: Dim>(
        path: &str,
        linear: &Linear<I, O, E, D>,
        inputs: &Tensor<(N, Const<I>), E, D>,
        fit: Fit,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        let weight = host_f64(&linear.weight);
        let bias = host_f64(&linear.bias);
        Self::fit_weights(path, &weight, &bias, inputs, fit, linear.weight.device())
    }

    /// Lowers the rank to `L2 < L` (checked when the call is compiled): the best rank-`L2`
    /// approximation of this layer's `B·A` (truncated SVD of the product), bias kept.
    ///
    /// Raising the rank does not build:
    ///
    /// ```compile_fail,E0080
    /// use dfdx::prelude::*;
    /// use factorize_runtime::{builders, FactorizeConfig, FactorizedLinear};
    /// let dev: Cpu = Default::default();
    /// let f = dev.build_module::<builders::FactorizedLinear<8, 2, 6>, f32>();
    /// let _ = f.reduce::<3>(&FactorizeConfig::default());
    /// ```
    pub fn reduce<const L2: usize>(
        &self,
        cfg: &FactorizeConfig,
    ) -> Result<FactorizedLinear<I, L2, O, E, D>, FactorizeError> {
        const {
            assert!(
                L2 < L,
                "reduce::<L2>() needs L2 < L: a rank can only be lowered"
            )
        };
        let product = self.product();
        let linear = Linear {
            weight: to_device(
                self.second.weight.device(),
                &product,
                (Const::<O>, Const::<I>),
                "reduce",
            )?,
            bias: self.second.bias.clone(),
        };
        FactorizedLinear::<I, L2, O, E, D>::from_linear(&linear, cfg)
    }

    /// Lowers the rank to `L2 < L` fitted to this layer's own outputs on `inputs` (on the
    /// backends of [`FactorizedLinear::from_linear_calibrated`]).
    pub fn reduce_calibrated<const L2: usize, N: Dim>(
        &self,
        path: &str,
        inputs: &Tensor<(N, Const<I>), E, D>,
        fit: Fit,
    ) -> Result<(FactorizedLinear<I, L2, O, E, D>, LayerReport), FactorizeError> {
        const {
            assert!(
                L2 < L,
                "reduce_calibrated::<L2>() needs L2 < L: a rank can only be lowered"
            )
        };
        let bias = host_f64(&self.second.bias);
        FactorizedLinear::<I, L2, O, E, D>::fit_weights(
            path,
            &self.product(),
            &bias,
            inputs,
            fit,
            self.second.weight.device(),
        )
    }

    /// `B·A`, row-major `[O, I]`, in f64.
    fn product(&self) -> Vec<f64> {
        let a = host_f64(&self.first.weight);
        let b = host_f64(&self.second.weight);
        let am = faer::MatRef::from_row_major_slice(&a, L, I);
        let bm = faer::MatRef::from_row_major_slice(&b, O, L);
        let p = bm * am;
        (0..O)
            .flat_map(|o| (0..I).map(move |i| (o, i)))
            .map(|(o, i)| p[(o, i)])
            .collect()
    }

    fn fit_weights<N: Dim>(
        path: &str,
        weight: &[f64],
        bias: &[f64],
        inputs: &Tensor<(N, Const<I>), E, D>,
        fit: Fit,
        dev: &D,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        let start = Instant::now();
        let w = WeightMatrix::new(path, weight, O, I)?;
        let x = host_f64(inputs);
        let rows = inputs.shape().0.size();
        let calib = Calibration::new(path, &x, rows, I)?;
        let (f, used) = fit_linear_on(&w, bias, &calib, L, fit, Backend::Auto)?;
        let bias = to_device(dev, &f.bias, (Const::<O>,), path)?;
        let layer = Self::from_host(dev, &f.factors.first, &f.factors.second, bias, path)?;
        Ok((layer, calibrated_row(path, I, O, &f, rows, used, start)))
    }
}

#[cfg(test)]
mod tests {
    use super::host_f64;
    use dfdx::prelude::*;

    #[test]
    fn host_values_are_in_logical_order() {
        let dev: Cpu = Default::default();
        let t: Tensor<Rank2<2, 3>, f32, Cpu> = dev.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        assert_eq!(host_f64(&t), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // A permuted view shares the buffer with other strides: read as the logical 3×2.
        let p: Tensor<Rank2<3, 2>, f32, Cpu> = t.clone().permute();
        assert_eq!(host_f64(&p), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let traced: Tensor<Rank2<2, 3>, f32, Cpu, OwnedTape<f32, Cpu>> = t.leaky_trace();
        assert_eq!(host_f64(&traced), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let empty: Tensor<(usize, Const<3>), f64, Cpu> = dev.zeros_like(&(0, Const));
        assert!(host_f64(&empty).is_empty());
    }
}
