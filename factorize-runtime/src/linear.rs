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

use dfdx::nn::modules::{Linear, UnbiasedLinear};
use dfdx::prelude::*;
use num_traits::Float;
use rand_distr::uniform::SampleUniform;

use crate::calibrate::{RecordInput, RecordedInput};
use crate::config::{FactorizeConfig, Fit};
use crate::convert::{host_f64, to_device};
use crate::cost::LayerKind;
use crate::error::FactorizeError;
use crate::pair::{self, DenseLayer, LayerTensor, LowRankPair, Seal};
use crate::report::LayerReport;
use crate::stand_in::{stand_in, DenseRoute};

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
    U: DenseRoute<Linear<I, O, E, D>, T, <Linear<L, O, E, D> as Module<U>>::Output, D::Err>,
{
    type Output = <Linear<L, O, E, D> as Module<U>>::Output;
    type Error = D::Err;

    fn try_forward(&self, x: T) -> Result<Self::Output, D::Err> {
        let address = self as *const Self as usize;
        // No-ops unless a calibration pass is recording, or a dense layer stands in.
        x.record(address);
        if let Some(dense) = stand_in::<Linear<I, O, E, D>>(address) {
            return U::dense_forward(&dense, x);
        }
        self.second.try_forward(self.first.try_forward(x)?)
    }
}

impl<const I: usize, const O: usize, E: Dtype, D: Device<E>> DenseLayer for Linear<I, O, E, D> {
    const SEAL: Seal = Seal;
    type Elem = E;
    type Dev = D;
    type Pair<const L: usize> = FactorizedLinear<I, L, O, E, D>;
    const KIND: LayerKind = LayerKind::Linear;
    const IN: usize = I;
    const OUT: usize = O;
    const KERNEL: usize = 1;

    fn tensors(&self) -> [&dyn LayerTensor<D>; 2] {
        [&self.weight, &self.bias]
    }

    fn from_host(
        dev: &D,
        weight: &[f64],
        bias: &[f64],
        path: &str,
    ) -> Result<Self, FactorizeError> {
        Ok(Linear {
            weight: to_device(dev, weight, (Const::<O>, Const::<I>), path)?,
            bias: to_device(dev, bias, (Const::<O>,), path)?,
        })
    }

    /// Every recorded input `[.., I]` is rows of `I` values.
    fn calibration_rows(_path: &str, inputs: &[RecordedInput]) -> Result<Vec<f64>, FactorizeError> {
        Ok(inputs
            .iter()
            .flat_map(|x| x.values.iter().copied())
            .collect())
    }
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>> LowRankPair
    for FactorizedLinear<I, L, O, E, D>
{
    type Dense = Linear<I, O, E, D>;
    const SEAL: Seal = Seal;
    const RANK: usize = L;

    fn from_host(
        dev: &D,
        first: &[f64],
        second: &[f64],
        bias: &[f64],
        path: &str,
    ) -> Result<Self, FactorizeError> {
        Ok(FactorizedLinear {
            first: UnbiasedLinear {
                weight: to_device(dev, first, (Const::<L>, Const::<I>), path)?,
            },
            second: Linear {
                weight: to_device(dev, second, (Const::<O>, Const::<L>), path)?,
                bias: to_device(dev, bias, (Const::<O>,), path)?,
            },
        })
    }

    fn tensors(&self) -> [&dyn LayerTensor<D>; 3] {
        [&self.first.weight, &self.second.weight, &self.second.bias]
    }
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>>
    FactorizedLinear<I, L, O, E, D>
{
    /// Builds the factorized layer from `linear` as `cfg` says (truncated SVD by default).
    ///
    /// `linear` is only read. Errors: NaN/Inf in its weight or bias, `L > min(I, O)`, a failed
    /// solver or an unavailable backend; the layer is called `linear` in messages (see
    /// [`Self::from_linear_with_report`] to name it).
    pub fn from_linear(
        linear: &Linear<I, O, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<Self, FactorizeError> {
        pair::build(LINEAR, linear, cfg).map(|(layer, _)| layer)
    }

    /// As [`Self::from_linear`], naming the layer `path` in errors and in the report row it
    /// also returns.
    pub fn from_linear_with_report(
        path: &str,
        linear: &Linear<I, O, E, D>,
        cfg: &FactorizeConfig,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        pair::build(path, linear, cfg)
    }

    /// Builds the layer fitted to the outputs of `linear` on calibration inputs `inputs`
    /// (rows × `I`), as [`Fit`] says: the exact output-optimal pair (default) or Composer's ALS,
    /// on `cfg.backend` (see [`crate::engine::calibrated::solve`]). The bias of the second map
    /// is refitted. The report row carries the calibration nmse and the backend used.
    ///
    /// Errors: NaN/Inf in weights or inputs, no rows, `L > min(I, O)`, `Backend::Cuda` without
    /// a usable GPU.
    pub fn from_linear_calibrated<N: Dim>(
        path: &str,
        linear: &Linear<I, O, E, D>,
        inputs: &Tensor<(N, Const<I>), E, D>,
        fit: Fit,
        cfg: &FactorizeConfig,
    ) -> Result<(Self, LayerReport), FactorizeError> {
        pair::fit_dense(path, linear, &[RecordedInput::of(inputs)], fit, cfg)
    }

    /// Lowers the rank to `L2 < L` (checked when the call is compiled): the best rank-`L2`
    /// approximation of this layer's `B·A` (truncated SVD of the product, on `cfg.backend`),
    /// bias kept.
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
        pair::reduce(self, cfg)
    }

    /// Lowers the rank to `L2 < L` fitted to this layer's own outputs on `inputs` (as
    /// [`FactorizedLinear::from_linear_calibrated`] fits).
    pub fn reduce_calibrated<const L2: usize, N: Dim>(
        &self,
        path: &str,
        inputs: &Tensor<(N, Const<I>), E, D>,
        fit: Fit,
        cfg: &FactorizeConfig,
    ) -> Result<(FactorizedLinear<I, L2, O, E, D>, LayerReport), FactorizeError> {
        const {
            assert!(
                L2 < L,
                "reduce_calibrated::<L2>() needs L2 < L: a rank can only be lowered"
            )
        };
        let (weight, bias) = pair::product(self);
        let rows = host_f64(inputs);
        pair::fit(
            path,
            (&weight, &bias),
            (&rows, None),
            fit,
            cfg.backend,
            &self.device(),
        )
    }
}

/// The name of a layer built without a path.
const LINEAR: &str = "linear";
