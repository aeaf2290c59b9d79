//! Model-level data-aware factorization: every replaced layer fitted, in forward order, to the
//! inputs it sees in the already-factorized model.
//!
//! Inputs are captured by a recording pass: while a `Recording` is active on the thread,
//! every [`crate::FactorizedLinear`] forward appends its input rows, keyed by the layer's
//! address, so it works through the user's own forward, nested structs and tuples alike. For
//! `n` replaced layers the calibration forward runs `n + 1` times: once to learn the order in
//! which layers are reached, then once before each refit, so that layer `k` is fitted to the
//! outputs of layers `0..k` as already refitted. A pass converts only the inputs it keeps (none
//! on the first, the next layer's on the others): converting every layer's input on every
//! pass would cost `n` times the calibration data.

use std::cell::RefCell;
use std::collections::HashMap;

use dfdx::prelude::{Device, Dtype, HasShape, Shape, Storage, Tensor};

use crate::config::{Backend, Fit};
use crate::convert::host_f64;
use crate::cost::LayerShape;
use crate::error::FactorizeError;
use crate::report::{FactorizeReport, LayerReport};
pub use crate::stand_in::{DenseRoute, StandIn};
use crate::stand_in::{StandIns, Standing};

/// One recorded forward call of a layer: its input's shape and values (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedInput {
    /// The input tensor's dims, e.g. `[rows, in]` or `[batch, channels, height, width]`.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<f64>,
}

impl RecordedInput {
    /// The shape and values of `t`.
    pub fn of<S: Shape, E: Dtype, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Self {
        Self {
            shape: t.shape().concrete().into(),
            values: host_f64(t),
        }
    }
}

/// Recorded calls: layer address and input.
type Calls = Vec<(usize, RecordedInput)>;

/// Which layer inputs a recording keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capture {
    /// Only which layers run, in order (inputs left empty).
    Order,
    /// The inputs of the layer at this address.
    Layer(usize),
    /// The inputs of every layer.
    All,
}

thread_local! {
    static RECORDER: RefCell<Option<(Capture, Calls)>> = const { RefCell::new(None) };
}

/// The callback of [`VisitFactorized`]: a layer's path and the layer.
pub type FactorizedVisitor<'a> = dyn FnMut(&str, &mut dyn Refit) -> Result<(), FactorizeError> + 'a;

/// The callback of [`VisitDense`]: a layer's path, weight (`[out, in]`) and bias.
pub type DenseVisitor<'a> = dyn FnMut(&str, Vec<f64>, Vec<f64>) + 'a;

/// Records layer inputs on this thread until dropped.
pub(crate) struct Recording;

impl Recording {
    pub(crate) fn start(capture: Capture) -> Self {
        RECORDER.with(|r| *r.borrow_mut() = Some((capture, Vec::new())));
        Recording
    }

    /// The calls recorded so far: layer address and its input values (row-major).
    pub(crate) fn take(&self) -> Calls {
        RECORDER.with(|r| {
            r.borrow_mut()
                .as_mut()
                .map(|(_, calls)| std::mem::take(calls))
                .unwrap_or_default()
        })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        RECORDER.with(|r| *r.borrow_mut() = None);
    }
}

/// Whether a calibration pass records layer inputs on this thread: fused forwards that skip a
/// layer's own input (see [`crate::fast`]) then step aside.
pub(crate) fn recording() -> bool {
    RECORDER.with(|r| r.borrow().is_some())
}

/// A layer input that can be recorded: any dfdx tensor (its values, row-major).
pub trait RecordInput {
    /// Appends the values to the active recording, if any, under `layer`.
    fn record(&self, layer: usize);
}

impl<S: Shape, E: Dtype, D: Device<E> + Storage<E>, T> RecordInput for Tensor<S, E, D, T> {
    fn record(&self, layer: usize) {
        RECORDER.with(|r| {
            if let Some((capture, calls)) = r.borrow_mut().as_mut() {
                let input = match *capture {
                    Capture::Order => RecordedInput {
                        shape: Vec::new(),
                        values: Vec::new(),
                    },
                    Capture::Layer(address) if address != layer => return,
                    Capture::Layer(_) | Capture::All => RecordedInput::of(self),
                };
                calls.push((layer, input));
            }
        });
    }
}

/// A factorized layer that can be refitted to recorded inputs.
pub trait Refit {
    /// Identifies the layer in recordings.
    fn address(&self) -> usize;
    /// Its tensors' ids (factors and bias), for training them alone ([`crate::distill`]).
    fn parameter_ids(&self) -> Vec<dfdx::tensor::UniqueId>;
    /// Refits the layer to the dense layer `(weight, bias)` (the weight `[out, fan_in]`, a
    /// convolution's unfolded to `[O, I·K·K]`), on the inputs it received in the recorded
    /// forward calls, on `backend` (see [`crate::engine::calibrated::solve`]). `reference`:
    /// the same calls' inputs in the dense model, for [`Fit::Correcting`].
    fn refit(
        &mut self,
        path: &str,
        dense: (&[f64], &[f64]),
        inputs: &[RecordedInput],
        reference: Option<&[RecordedInput]>,
        fit: Fit,
        backend: Backend,
    ) -> Result<LayerReport, FactorizeError>;

    /// The dense layer `(weight, bias)`, of this layer's dense kind and on its device, to stand
    /// in for it.
    fn stand_in(&self, path: &str, dense: (&[f64], &[f64])) -> Result<StandIn, FactorizeError>;

    /// The dims of the dense layer it replaces.
    fn shape(&self) -> LayerShape;

    /// The calibration rows (`fan_in` wide) that recorded inputs give this layer's fits.
    fn rows(&self, path: &str, inputs: &[RecordedInput]) -> Result<Vec<f64>, FactorizeError>;

    /// The output nmse of the layer as it is against the dense layer `(weight, bias)`, on the
    /// recorded `inputs` (see [`crate::engine::calibrated::nmse`]).
    fn nmse_on(
        &self,
        path: &str,
        dense: (&[f64], &[f64]),
        inputs: &[RecordedInput],
    ) -> Result<f64, FactorizeError>;
}

/// Walks the factorized layers of a model (generated by the derive; implemented for layers,
/// tuples and carried-over modules here).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module that `#[derive(Factorizable)]` can carry over or factorize",
    label = "not Factorizable",
    note = "derive `Factorizable` for it, write `Linear<..>` or the tuple type out in the field \
            (aliases hide it from the derive), or mark the field `#[factorize(skip)]` to copy it as is"
)]
pub trait VisitFactorized {
    /// Calls `f` with the path and layer of every factorized layer, in field order.
    fn visit_factorized(
        &mut self,
        path: &str,
        f: &mut FactorizedVisitor<'_>,
    ) -> Result<(), FactorizeError>;
}

/// Walks the dense `Linear` layers of an original model, by path.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module that `#[derive(Factorizable)]` can carry over or factorize",
    label = "not Factorizable",
    note = "derive `Factorizable` for it, write `Linear<..>` or the tuple type out in the field \
            (aliases hide it from the derive), or mark the field `#[factorize(skip)]` to copy it as is"
)]
pub trait VisitDense {
    /// Calls `f` with the path, weight (`[out, in]`) and bias of every `Linear`, in field order.
    fn visit_dense(&self, path: &str, f: &mut DenseVisitor<'_>);
}

/// Dense layers by path: weight (`[out, in]`, unfolded for convolutions) and bias.
pub(crate) type DenseWeights = HashMap<String, (Vec<f64>, Vec<f64>)>;

/// The dense layers of `dense` by path.
pub(crate) fn dense_weights<M: VisitDense>(dense: &M) -> DenseWeights {
    let mut weights = HashMap::new();
    dense.visit_dense("", &mut |path, w, b| {
        weights.insert(path.to_string(), (w, b));
    });
    weights
}

pub(crate) fn missing_dense(path: &str) -> FactorizeError {
    FactorizeError::Calibration {
        layer: path.to_string(),
        reason: "no dense layer at this path in the original model".into(),
    }
}

/// The body of [`crate::Factorizable::evaluate_heldout`].
pub(crate) fn evaluate_heldout<M, V, F>(
    dense: &M,
    model: &mut V,
    report: &mut FactorizeReport,
    mut run: F,
) -> Result<(), FactorizeError>
where
    M: VisitDense,
    V: VisitFactorized,
    F: FnMut(&V),
{
    let weights = dense_weights(dense);
    let calls = {
        let recording = Recording::start(Capture::All);
        run(model);
        recording.take()
    };
    model.visit_factorized("", &mut |path, layer| {
        let address = layer.address();
        let inputs: Vec<RecordedInput> = calls
            .iter()
            .filter(|(a, _)| *a == address)
            .map(|(_, input)| input.clone())
            .collect();
        if inputs.is_empty() {
            return Ok(());
        }
        let (w, b) = weights.get(path).ok_or_else(|| missing_dense(path))?;
        let value = layer.nmse_on(path, (w, b), &inputs)?;
        if let Some(row) = report.layers.iter_mut().find(|r| r.path == path) {
            row.nmse_heldout = Some(value);
        }
        Ok(())
    })
}

/// The inputs of the layer at `address` in a run of `model`, with `stand_ins` standing in.
pub(crate) fn inputs_of<T, R, F: FnMut(&T) -> R>(
    model: &T,
    address: usize,
    stand_ins: &StandIns,
    run: &mut F,
) -> Vec<RecordedInput> {
    let _standing = Standing::start(stand_ins);
    let recording = Recording::start(Capture::Layer(address));
    run(model);
    recording
        .take()
        .into_iter()
        .map(|(_, input)| input)
        .collect()
}

/// The addresses of the factorized layers in the order a run of `model` first reaches them,
/// with `stand_ins` standing in.
pub(crate) fn forward_order<T, R, F: FnMut(&T) -> R>(
    model: &T,
    stand_ins: &StandIns,
    run: &mut F,
) -> Vec<usize> {
    let _standing = Standing::start(stand_ins);
    let recording = Recording::start(Capture::Order);
    run(model);
    let mut seen = Vec::new();
    for (address, _) in recording.take() {
        if !seen.contains(&address) {
            seen.push(address);
        }
    }
    seen
}

/// Dense layers standing in for every factorized layer of `model`: run so, it is the dense model.
pub(crate) fn dense_stand_ins<T: VisitFactorized>(
    model: &mut T,
    weights: &DenseWeights,
) -> Result<StandIns, FactorizeError> {
    let mut stand_ins = StandIns::new();
    model.visit_factorized("", &mut |path, layer| {
        let (w, b) = weights.get(path).ok_or_else(|| missing_dense(path))?;
        stand_ins.insert(layer.address(), layer.stand_in(path, (w, b))?);
        Ok(())
    })?;
    Ok(stand_ins)
}

/// The body of [`crate::Factorizable::factorize_calibrated`].
pub(crate) fn calibrate<M, V, F>(
    dense: &M,
    mut model: V,
    mut report: FactorizeReport,
    fit: Fit,
    backend: Backend,
    mut run: F,
) -> Result<(V, FactorizeReport), FactorizeError>
where
    M: VisitDense,
    V: VisitFactorized,
    F: FnMut(&V),
{
    let weights = dense_weights(dense);
    let order = forward_order(&model, &StandIns::new(), &mut run);
    // A correcting fit also needs each layer's inputs in the dense model.
    let dense_model = match fit {
        Fit::Correcting { .. } => Some(dense_stand_ins(&mut model, &weights)?),
        Fit::Exact { .. } | Fit::Als { .. } => None,
    };
    let none = StandIns::new();
    for address in order {
        let inputs = inputs_of(&model, address, &none, &mut run);
        let reference = dense_model
            .as_ref()
            .map(|stand_ins| inputs_of(&model, address, stand_ins, &mut run));
        model.visit_factorized("", &mut |path, layer| {
            if layer.address() != address {
                return Ok(());
            }
            let Some((w, b)) = weights.get(path) else {
                return Err(missing_dense(path));
            };
            let row = layer.refit(path, (w, b), &inputs, reference.as_deref(), fit, backend)?;
            match report.layers.iter_mut().find(|r| r.path == path) {
                Some(slot) => *slot = row,
                None => report.push(row),
            }
            Ok(())
        })?;
    }
    Ok((model, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::prelude::{Cpu, Rank2, Tensor, ZerosTensor};

    #[test]
    fn a_recording_converts_only_what_it_keeps() {
        let dev: Cpu = Default::default();
        let a: Tensor<Rank2<2, 3>, f32, Cpu> = dev.zeros();
        let b: Tensor<Rank2<4, 5>, f32, Cpu> = dev.zeros() + 1.0;
        let pass = |capture| {
            let recording = Recording::start(capture);
            a.record(10);
            b.record(20);
            a.record(10);
            recording.take()
        };
        let order = pass(Capture::Order);
        assert_eq!(order.iter().map(|c| c.0).collect::<Vec<_>>(), [10, 20, 10]);
        assert!(order.iter().all(|c| c.1.values.is_empty()));
        let only_b = pass(Capture::Layer(20));
        assert_eq!(only_b.len(), 1);
        assert_eq!(
            (only_b[0].1.shape.as_slice(), only_b[0].1.values.len()),
            (&[4, 5][..], 20)
        );
        assert!(only_b[0].1.values.iter().all(|&v| v == 1.0));
        assert_eq!(pass(Capture::All).len(), 3);
        // Without a recording nothing is kept.
        a.record(10);
        assert!(Recording::start(Capture::All).take().is_empty());
    }
}
