//! The low-rank pair: what every factorized layer kind shares, written once.
//!
//! A layer kind is a dense layer ([`DenseLayer`]: `Linear`, [`crate::conv::Conv2D`]) and the
//! pair that replaces it ([`LowRankPair`]: [`crate::FactorizedLinear`],
//! [`crate::FactorizedConv2D`]). Each says only what differs: its dims, its dense weight as a
//! matrix `[out, fan_in]`, how to build the pair from host factors, and how a recorded input
//! becomes calibration rows of width `fan_in`. Everything else is here, once: building a pair
//! with its report row (truncated SVD or fresh init), the data-aware fit and its bias refit,
//! the output nmse, rank reduction, and the [`Refit`] that calibration walks use.
//!
//! Both traits are sealed. A new layer kind implements them (tens of lines), adds a `Choose`
//! case to nothing (the derive's `Pick` already works for any [`DenseLayer`]), and teaches the
//! derive its syntax.

use std::time::Instant;

use dfdx::prelude::{ConstShape, Device, Dtype, Tensor};
use dfdx::tensor::UniqueId;

use crate::calibrate::{RecordedInput, Refit, StandIn};
use crate::config::{Backend, FactorizeConfig, Fit, Method};
use crate::convert::host_f64;
use crate::cost::{LayerKind, LayerShape};
use crate::distill::tensor_ids;
use crate::engine::calibrated::{self, nmse, CalibratedFit, Calibration};
use crate::engine::{self, check_finite, LowRank, WeightMatrix};
use crate::error::FactorizeError;
use crate::report::{LayerReport, Status};

mod sealed {
    /// Only this crate can name it, so only this crate can implement the traits that ask for it.
    #[derive(Debug)]
    pub struct Seal;
}
pub(crate) use sealed::Seal;

/// A dense layer that a [`LowRankPair`] can replace. Sealed.
pub trait DenseLayer: Clone + 'static {
    #[doc(hidden)]
    const SEAL: Seal;
    /// The element type.
    type Elem: Dtype;
    /// The device.
    type Dev: Device<Self::Elem>;
    /// The pair of rank `L` that replaces it.
    type Pair<const L: usize>: LowRankPair<Dense = Self>;
    /// Linear or convolution, for reports.
    const KIND: LayerKind;
    /// Input features or channels.
    const IN: usize;
    /// Output features or channels.
    const OUT: usize;
    /// Kernel size (1 for a linear).
    const KERNEL: usize;
    /// Columns of the weight seen as a matrix: `IN · KERNEL²`.
    const FAN_IN: usize = Self::IN * Self::KERNEL * Self::KERNEL;

    /// The weight (its row-major values are the matrix `[OUT, FAN_IN]`: a convolution's
    /// `[O, I, K, K]` unfolded) and the bias `[OUT]`.
    fn tensors(&self) -> [&dyn LayerTensor<Self::Dev>; 2];

    /// The weight as a matrix `[OUT, FAN_IN]` and the bias `[OUT]`, on the host.
    fn host_weights(&self) -> (Vec<f64>, Vec<f64>) {
        let [weight, bias] = self.tensors();
        (weight.host(), bias.host())
    }
    /// The device the weights live on.
    fn device(&self) -> Self::Dev {
        self.tensors()[0].device()
    }
    /// The layer from a host weight `[OUT, FAN_IN]` and bias `[OUT]`, on `dev`.
    fn from_host(
        dev: &Self::Dev,
        weight: &[f64],
        bias: &[f64],
        path: &str,
    ) -> Result<Self, FactorizeError>;
    /// The rows (each `FAN_IN` wide) that recorded inputs of this layer give a data-aware fit:
    /// a linear's input rows, a convolution's patches. Errors name `path`.
    fn calibration_rows(path: &str, inputs: &[RecordedInput]) -> Result<Vec<f64>, FactorizeError>;
}

/// A factorized pair: a rank-`RANK` map without bias, then a map with the bias. Sealed.
pub trait LowRankPair: Sized {
    #[doc(hidden)]
    const SEAL: Seal;
    /// The dense layer it replaces.
    type Dense: DenseLayer;
    /// The rank.
    const RANK: usize;

    /// The pair from host factors, row-major: `first` `[RANK, FAN_IN]`, `second`
    /// `[OUT, RANK]` and `bias` `[OUT]`.
    fn from_host(
        dev: &<Self::Dense as DenseLayer>::Dev,
        first: &[f64],
        second: &[f64],
        bias: &[f64],
        path: &str,
    ) -> Result<Self, FactorizeError>;
    /// The first factor, the second factor and the bias, in that order.
    fn tensors(&self) -> [&dyn LayerTensor<<Self::Dense as DenseLayer>::Dev>; 3];

    /// Its factors and bias on the host, in the layouts of [`Self::from_host`].
    fn host_factors(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let [first, second, bias] = self.tensors();
        (first.host(), second.host(), bias.host())
    }
    /// The device the weights live on.
    fn device(&self) -> <Self::Dense as DenseLayer>::Dev {
        self.tensors()[0].device()
    }
    /// Its tensors' ids (factors and bias), for training them alone.
    fn parameter_ids(&self) -> Vec<UniqueId> {
        self.tensors().iter().flat_map(|t| t.ids()).collect()
    }
}

/// One of a layer's tensors, whatever its shape: what the shared code reads of it.
pub trait LayerTensor<D> {
    /// Its values on the host, row-major.
    fn host(&self) -> Vec<f64>;
    /// Its id, in a vector (found through an optimizer: dfdx keeps a tensor's id private).
    fn ids(&self) -> Vec<UniqueId>;
    /// The device it lives on.
    fn device(&self) -> D;
}

impl<S: ConstShape, E: Dtype, D: Device<E>> LayerTensor<D> for Tensor<S, E, D> {
    fn host(&self) -> Vec<f64> {
        host_f64(self)
    }

    fn ids(&self) -> Vec<UniqueId> {
        tensor_ids(self)
    }

    fn device(&self) -> D {
        self.device().clone()
    }
}

/// A report row for `M` at `path`.
pub(crate) fn row<M: DenseLayer>(path: &str, status: Status) -> LayerReport {
    LayerReport::new(path, M::KIND, M::IN, M::OUT, M::KERNEL, status)
}

/// Builds the pair replacing `dense` as `cfg` says, with its report row. `dense` is only read.
pub(crate) fn build<P: LowRankPair>(
    path: &str,
    dense: &P::Dense,
    cfg: &FactorizeConfig,
) -> Result<(P, LayerReport), FactorizeError> {
    let start = Instant::now();
    let ((out, fan_in), rank) = (dims::<P::Dense>(), P::RANK);
    let _progress = crate::progress::Layer::start(cfg, path, &describe::<P::Dense>(rank));
    let (weight, bias) = dense.host_weights();
    let w = WeightMatrix::new(path, &weight, out, fan_in)?;
    check_finite(path, "bias", &bias)?;
    w.check_rank(rank)?;
    let mut row = row::<P::Dense>(path, Status::Replaced);
    let (first, second, bias, error, backend, note) = match cfg.method {
        Method::Svd => {
            let solved = engine::solve(&w, rank, cfg)?;
            let f = solved.value;
            let error = f.relative_error;
            (f.first, f.second, bias, error, solved.backend, solved.note)
        }
        Method::Fresh => {
            // PyTorch's (and dfdx's) default init: uniform in ±1/sqrt(fan_in), from fixed-seed
            // streams so that runs are reproducible.
            let first = fresh_uniform(rank * fan_in, fan_in, 1);
            let second = fresh_uniform(out * rank, rank, 2);
            let error = engine::relative_error(&w, &second, &first, rank);
            let bias = fresh_uniform(out, rank, 3);
            (first, second, bias, error, Backend::Cpu, None)
        }
    };
    let pair = P::from_host(&dense.device(), &first, &second, &bias, path)?;
    row.set_replaced(rank, error, backend, start.elapsed());
    row.note = note;
    Ok((pair, row))
}

/// The pair fitted to the outputs of the dense layer (`weight` `[OUT, FAN_IN]`, `bias`) on
/// calibration `rows` (and the dense model's `reference` rows, see [`Fit::Correcting`]), as
/// `fit` says and on `backend`, with its report row.
pub(crate) fn fit<P: LowRankPair>(
    path: &str,
    (weight, bias): (&[f64], &[f64]),
    (rows, reference): (&[f64], Option<&[f64]>),
    fit: Fit,
    backend: Backend,
    dev: &<P::Dense as DenseLayer>::Dev,
) -> Result<(P, LayerReport), FactorizeError> {
    let start = Instant::now();
    let (w, calib) = operands::<P::Dense>(path, weight, (rows, reference))?;
    let solved = calibrated::solve(&w, bias, &calib, P::RANK, fit, backend)?;
    let f = &solved.value;
    let pair = P::from_host(dev, &f.factors.first, &f.factors.second, &f.bias, path)?;
    let mut row = row::<P::Dense>(path, Status::Replaced);
    row.set_replaced(
        P::RANK,
        f.factors.relative_error,
        solved.backend,
        start.elapsed(),
    );
    row.nmse = Some(f.nmse);
    row.note = calibrated_note(f, calib.rows(), w.in_dim(), solved.note);
    Ok((pair, row))
}

/// The dense weight `[OUT, FAN_IN]` and the calibration rows (with their reference rows, if
/// any) of a layer of kind `M`, checked.
fn operands<'a, M: DenseLayer>(
    path: &'a str,
    weight: &'a [f64],
    (rows, reference): (&'a [f64], Option<&'a [f64]>),
) -> Result<(WeightMatrix<'a>, Calibration<'a>), FactorizeError> {
    let (out, fan_in) = dims::<M>();
    let w = WeightMatrix::new(path, weight, out, fan_in)?;
    let calib = Calibration::of_rows(path, rows, fan_in, reference)?;
    Ok((w, calib))
}

/// The pair fitted to `dense`'s outputs on recorded inputs (see [`fit`]).
pub(crate) fn fit_dense<P: LowRankPair>(
    path: &str,
    dense: &P::Dense,
    inputs: &[RecordedInput],
    fit_kind: Fit,
    cfg: &FactorizeConfig,
) -> Result<(P, LayerReport), FactorizeError> {
    let (weight, bias) = dense.host_weights();
    let rows = P::Dense::calibration_rows(path, inputs)?;
    fit::<P>(
        path,
        (&weight, &bias),
        (&rows, None),
        fit_kind,
        cfg.backend,
        &dense.device(),
    )
}

/// What a data-aware fit's report row should say: a fallback, and rows too few to span the
/// inputs.
fn calibrated_note(
    f: &CalibratedFit,
    rows: usize,
    fan_in: usize,
    fallback: Option<String>,
) -> Option<String> {
    let deficient = f.rank_deficient.then(|| {
        format!(
            "{rows} calibration rows cannot span {fan_in} inputs (ridge {:.3e})",
            f.ridge
        )
    });
    match (fallback, deficient) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }
}

/// The pair's current factors as a [`LowRank`], for measuring them.
fn current<P: LowRankPair>(pair: &P) -> (LowRank, Vec<f64>) {
    let (out_dim, in_dim) = dims::<P::Dense>();
    let (first, second, bias) = pair.host_factors();
    let factors = LowRank {
        out_dim,
        in_dim,
        rank: P::RANK,
        first,
        second,
        singular_values: Vec::new(),
        relative_error: f64::NAN,
        iterations: 0,
    };
    (factors, bias)
}

/// `second · first`, row-major `[OUT, FAN_IN]`, and the bias: the dense layer the pair
/// computes, the start of a rank reduction.
pub(crate) fn product<P: LowRankPair>(pair: &P) -> (Vec<f64>, Vec<f64>) {
    let (factors, bias) = current(pair);
    (factors.product(), bias)
}

/// The best rank-`Q::RANK` pair for the dense layer that `pair` computes (truncated SVD of its
/// product, bias kept).
pub(crate) fn reduce<P: LowRankPair, Q: LowRankPair<Dense = P::Dense>>(
    pair: &P,
    cfg: &FactorizeConfig,
) -> Result<Q, FactorizeError> {
    let (out, fan_in) = dims::<P::Dense>();
    let (weight, bias) = product(pair);
    let w = WeightMatrix::new("reduce", &weight, out, fan_in)?;
    let f = match cfg.method {
        Method::Svd => engine::solve(&w, Q::RANK, cfg)?.value,
        // A reduction keeps what the pair computes; a fresh init would discard it.
        Method::Fresh => engine::low_rank(&w, Q::RANK, cfg.precision)?,
    };
    Q::from_host(&pair.device(), &f.first, &f.second, &bias, "reduce")
}

/// The dims of a dense layer kind.
const fn shape<M: DenseLayer>() -> LayerShape {
    LayerShape::new(M::KIND, M::IN, M::OUT, M::KERNEL)
}

/// `(OUT, FAN_IN)` of a dense layer kind.
const fn dims<M: DenseLayer>() -> (usize, usize) {
    (M::OUT, M::FAN_IN)
}

/// What the progress line says about a layer: `1024→4096, rank 128` (`3×3` for a convolution).
fn describe<M: DenseLayer>(rank: usize) -> String {
    match M::KIND {
        LayerKind::Linear => format!("{}→{}, rank {rank}", M::IN, M::OUT),
        LayerKind::Conv2D => format!("{}→{} {k}×{k}, rank {rank}", M::IN, M::OUT, k = M::KERNEL),
    }
}

/// `count` values uniform in `±1/sqrt(fan_in)`, reproducible from `seed`.
fn fresh_uniform(count: usize, fan_in: usize, seed: u64) -> Vec<f64> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let mut rng = engine::Gaussian::new(seed);
    (0..count)
        .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
        .collect()
}

impl<P: LowRankPair> Refit for P {
    fn address(&self) -> usize {
        self as *const Self as usize
    }

    fn parameter_ids(&self) -> Vec<UniqueId> {
        LowRankPair::parameter_ids(self)
    }

    fn refit(
        &mut self,
        path: &str,
        dense: (&[f64], &[f64]),
        inputs: &[RecordedInput],
        reference: Option<&[RecordedInput]>,
        fit_kind: Fit,
        backend: Backend,
    ) -> Result<LayerReport, FactorizeError> {
        let rows = P::Dense::calibration_rows(path, inputs)?;
        let reference = match reference {
            Some(inputs) => Some(P::Dense::calibration_rows(path, inputs)?),
            None => None,
        };
        let (pair, row) = fit::<P>(
            path,
            dense,
            (&rows, reference.as_deref()),
            fit_kind,
            backend,
            &self.device(),
        )?;
        // Replaces the layer only once the new one is complete.
        *self = pair;
        Ok(row)
    }

    fn stand_in(
        &self,
        path: &str,
        (weight, bias): (&[f64], &[f64]),
    ) -> Result<StandIn, FactorizeError> {
        P::Dense::from_host(&self.device(), weight, bias, path).map(StandIn::new)
    }

    fn shape(&self) -> LayerShape {
        shape::<P::Dense>()
    }

    fn rows(&self, path: &str, inputs: &[RecordedInput]) -> Result<Vec<f64>, FactorizeError> {
        P::Dense::calibration_rows(path, inputs)
    }

    fn nmse_on(
        &self,
        path: &str,
        (weight, bias): (&[f64], &[f64]),
        inputs: &[RecordedInput],
    ) -> Result<f64, FactorizeError> {
        let rows = P::Dense::calibration_rows(path, inputs)?;
        let (w, calib) = operands::<P::Dense>(path, weight, (&rows, None))?;
        let (factors, pair_bias) = current(self);
        nmse(&w, bias, &factors, &pair_bias, &calib)
    }
}
