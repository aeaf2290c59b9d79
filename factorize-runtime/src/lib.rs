//! factorize: cheaper dfdx networks by splitting big linear operators into pairs of small ones.
#![warn(missing_docs)]

pub mod config;
pub mod cost;
pub mod engine;
mod error;
mod factorizable;
mod linear;
pub mod report;
pub mod synthetic;
pub mod weights;

pub use config::{Backend, FactorizeConfig, Method, Precision};
pub use cost::{Decision, FactorizeParams, Latent, LayerKind};
pub use error::FactorizeError;
pub use factorizable::Factorizable;
pub use factorize_derive::{mirror, Factorizable};

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
pub use linear::FactorizedLinear;

/// Builder types, as in `dfdx::nn::builders`.
pub mod builders {
    pub use crate::linear::builder::FactorizedLinear;
}
pub use report::{FactorizeReport, LayerReport, Status};
