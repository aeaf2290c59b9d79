//! What a model file needs, in one import beside dfdx's: `use dfdx::prelude::*;
//! use factorize_runtime::prelude::*;`.
//!
//! The derives and attribute macros, the traits that build variants, the run-time options and
//! the factorized layers. Names that would clash with `dfdx::prelude` (the `Conv2D` module and
//! builders) stay in [`crate::conv`] and [`crate::builders`].
//!
//! ```
//! use dfdx::nn::modules::Linear;
//! use dfdx::prelude::*;
//! use factorize_runtime::prelude::*;
//!
//! #[derive(Factorizable, TensorCollection)]
//! #[factorize(latent_features = 64)]
//! pub struct Ffn<E: Dtype, D: Device<E>> {
//!     pub up: Linear<512, 2048, E, D>,
//! }
//!
//! let dev: Cpu = Default::default();
//! let model = Ffn::<f32, Cpu>::build(&dev);
//! let small = model.factorize(&FactorizeConfig::default())?;
//! let _: &FactorizedLinear<512, 64, 2048, f32, Cpu> = &small.up;
//! # Ok::<(), FactorizeError>(())
//! ```

pub use crate::report::FactorizeReport;
pub use crate::{
    mirror, sequential, Backend, Factorizable, FactorizeAs, FactorizeConfig, FactorizeError,
    FactorizedConv2D, FactorizedLinear, Fit, Method, Precision, TensorCollection,
};
