//! The one error type of the crate. Every variant names the layer it concerns, `<model>` where
//! an error concerns the whole model (distillation's).

use crate::config::Backend;

/// Why a factorization failed. The source model is never changed, whatever the error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FactorizeError {
    /// The layer's weights hold NaN or ±Inf.
    #[error("layer `{layer}`: {tensor} holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        /// The layer's path, e.g. `encoder.fc1`.
        layer: String,
        /// Which tensor: `weight`, `bias` or `calibration input`.
        tensor: &'static str,
        /// The flat index of the first offending element.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A weight buffer does not match the dims it was given with.
    #[error("layer `{layer}`: {tensor} has {actual} elements, expected {expected} ({shape})")]
    Shape {
        /// The layer's path.
        layer: String,
        /// Which tensor.
        tensor: &'static str,
        /// The number of elements the dims imply.
        expected: usize,
        /// The number of elements given.
        actual: usize,
        /// The dims, written out.
        shape: String,
    },
    /// A requested rank is zero or larger than `min(in, out)`.
    #[error("layer `{layer}`: rank {rank} is not in 1..={max} (min(in, out))")]
    Rank {
        /// The layer's path.
        layer: String,
        /// The requested rank.
        rank: usize,
        /// `min(in, out)`.
        max: usize,
    },
    /// The numerical routine failed to converge.
    #[error("layer `{layer}`: the {routine} did not converge")]
    NoConvergence {
        /// The layer's path.
        layer: String,
        /// Which routine.
        routine: &'static str,
    },
    /// The requested backend cannot be used here.
    #[error("layer `{layer}`: backend {backend:?} is unavailable: {reason}")]
    BackendUnavailable {
        /// The layer's path.
        layer: String,
        /// The backend asked for.
        backend: Backend,
        /// Why it cannot be used, and what to do.
        reason: String,
    },
    /// A parameter of the cost rule is invalid.
    #[error("layer `{layer}`: invalid parameter `{parameter}`: {reason}")]
    Parameter {
        /// The layer's path.
        layer: String,
        /// The parameter's name.
        parameter: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Calibration data is unusable (empty, or of the wrong width).
    #[error("layer `{layer}`: calibration data: {reason}")]
    Calibration {
        /// The layer's path.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// A weights file could not be read.
    #[error("cannot read `{path}`: {reason}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The device refused an operation (allocation, copy).
    #[error("layer `{layer}`: device error: {reason}")]
    Device {
        /// The layer's path.
        layer: String,
        /// The device's message.
        reason: String,
    },
}
