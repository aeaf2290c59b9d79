//! Cheaper [dfdx](https://docs.rs/dfdx/0.13) networks: big linear layers split into pairs of
//! small ones, chosen by the compiler and filled from the trained weights.
//!
//! A `Linear(I → O)` costs `I·O` multiply-adds per row; `Linear(I → L, no bias)` followed by
//! `Linear(L → O)` costs `L·(I + O)`. The cost rule ([`cost`], MosaicML Composer's `Factorize`
//! rule) replaces a layer only when that is strictly cheaper and the layer is wide enough.
//!
//! # The derive
//!
//! `#[derive(Factorizable)]` on a dfdx model struct generates `{Name}Factorized`, whose field
//! types the compiler picks by evaluating the cost rule on each `Linear`'s dims, and
//! `impl Factorizable for {Name}`, which builds it from the model's weights by truncated SVD.
//! `#[mirror]` on the model's `Module` impl gives the variant the same forward.
//!
//! ```
//! use dfdx::nn::modules::{Linear, ReLU};
//! use dfdx::prelude::*;
//! use factorize_runtime::{mirror, Factorizable, FactorizeConfig, FactorizedLinear};
//!
//! const D_MODEL: usize = 512;
//!
//! #[derive(Factorizable)]
//! #[factorize(latent_features = 64)] // the six parameters, Composer's names and defaults
//! pub struct Ffn<E: Dtype, D: Device<E>> {
//!     pub up: Linear<D_MODEL, { 4 * D_MODEL }, E, D>, // replaced: 64 <= break-even 409
//!     pub act: ReLU,                                  // carried over
//!     pub down: Linear<{ 4 * D_MODEL }, D_MODEL, E, D>,
//!     pub head: Linear<D_MODEL, 10, E, D>,             // kept: narrower than min_features
//! }
//!
//! #[mirror]
//! impl<E: Dtype, D: Device<E>, B: Dim> Module<Tensor<(B, Const<D_MODEL>), E, D>> for Ffn<E, D> {
//!     type Output = Tensor<(B, Const<10>), E, D>;
//!     type Error = D::Err;
//!     fn try_forward(&self, x: Tensor<(B, Const<D_MODEL>), E, D>) -> Result<Self::Output, D::Err> {
//!         let h = self.act.try_forward(self.up.try_forward(x)?)?;
//!         self.head.try_forward(self.down.try_forward(h)?)
//!     }
//! }
//!
//! let dev: Cpu = Default::default();
//! let model = Ffn::<f32, Cpu> {
//!     up: BuildModule::build(&dev),
//!     act: ReLU,
//!     down: BuildModule::build(&dev),
//!     head: BuildModule::build(&dev),
//! };
//! let (small, report) = model.factorize_with_report(&FactorizeConfig::default())?;
//! println!("{report}");
//! let _: &FactorizedLinear<512, 64, 2048, f32, Cpu> = &small.up; // chosen at compile time
//! let _: &Linear<512, 10, f32, Cpu> = &small.head;
//! let y: Tensor<Rank2<3, 10>, f32, Cpu> = small.forward(dev.zeros::<Rank2<3, 512>>());
//! # Ok::<(), factorize_runtime::FactorizeError>(())
//! ```
//!
//! Dims that are the struct's own const generics cannot be used by the rule in a type on
//! stable Rust: such a field needs an explicit `#[factorize(latent = N)]`, and the rule is then
//! checked when the model is instantiated. This fails to build, because rank 200 saves nothing
//! on a 256 → 256 layer (break-even 127):
//!
//! ```compile_fail,E0080
//! use dfdx::nn::modules::Linear;
//! use dfdx::prelude::*;
//! use factorize_runtime::{Factorizable, FactorizeConfig};
//!
//! #[derive(Factorizable)]
//! pub struct Square<const N: usize, E: Dtype, D: Device<E>> {
//!     #[factorize(latent = 200)]
//!     pub fc: Linear<N, N, E, D>,
//! }
//!
//! let dev: Cpu = Default::default();
//! let m = Square::<256, f32, Cpu> { fc: BuildModule::build(&dev) };
//! let _ = m.factorize(&FactorizeConfig::default());
//! ```
//!
//! The rank itself may be one of the struct's const generics, so that one model source gives a
//! variant per rank (`Model<64, E, D>` → `ModelFactorized<64, E, D>`): such a layer is always
//! factorized, and the rule is checked for each rank used, at `cargo build` time. Rank 200
//! saves nothing on a 256 → 256 layer, so this fails to build too:
//!
//! ```compile_fail,E0080
//! use dfdx::nn::modules::Linear;
//! use dfdx::prelude::*;
//! use factorize_runtime::{Factorizable, FactorizeConfig};
//!
//! #[derive(Factorizable)]
//! #[factorize(latent_features = R)]
//! pub struct Ranked<const R: usize, E: Dtype, D: Device<E>> {
//!     pub fc: Linear<256, 256, E, D>,
//! }
//!
//! let dev: Cpu = Default::default();
//! let m = Ranked::<200, f32, Cpu> { fc: BuildModule::build(&dev) };
//! let _ = m.factorize(&FactorizeConfig::default());
//! ```
//!
//! An integer rank written on a field is forced: the rule must replace that layer at that
//! rank, or the build fails at the attribute, naming the dims and the break-even. 600 saves
//! nothing on a 1024 → 1024 layer (break-even 512), so this fails to build:
//!
//! ```compile_fail,E0080
//! use dfdx::nn::modules::Linear;
//! use dfdx::prelude::*;
//! use factorize_runtime::Factorizable;
//!
//! #[derive(Factorizable)]
//! pub struct Wide<E: Dtype, D: Device<E>> {
//!     #[factorize(latent = 600)] // "use at most 511"
//!     pub fc: Linear<1024, 1024, E, D>,
//! }
//! ```
//!
//! A struct-level rank is a default, not a force: a layer it does not pay on is kept, with the
//! reason in the report.
//!
//! # Attributes
//! - On the struct: `factorize_convs`, `factorize_linears` (bool), `min_channels`,
//!   `min_features` (integer), `latent_channels` (rank, fraction in `[0, 1)`, or a const
//!   generic of the struct), `latent_features` (rank, fraction in `[0, 0.5)`, or a const
//!   generic), `ranks = "file"` and `ranks_prefix = "path"` (per-field ranks read from a file
//!   at compile time; see [`sensitivity::RankPlan::ranks_file`]).
//! - On a field: `skip` (copy as is), `latent = N | f | R`, `min_features`, `min_channels`.
//!
//! Fields may be dfdx `Linear`s, tuples of modules written out (dfdx's sequential models),
//! structs that derive `Factorizable` (their rows appear as `field.sub`), dfdx's `Repeated`,
//! `Residual`, `GeneralizedResidual`, `SplitInto` and `AddInto` around such structs (rows
//! `field.0.sub`, `field.f.sub`), and the dfdx modules listed in [`Factorizable`]'s
//! implementors, carried over unchanged. Anything else is a compile error at the field, unless
//! marked `skip`.
//!
//! # Fidelity and recovery
//! Data-aware fits (`factorize_calibrated` with a [`Fit`]) reproduce each layer's outputs on
//! calibration inputs; [`sensitivity`] measures what each layer's truncation does to the model's
//! output and plans per-layer ranks to a budget ([`budget`]); [`distill`] trains the variant
//! towards the dense model afterwards.
//!
//! # Layers and engines
//! [`FactorizedLinear`] is the factorized layer; [`fast`] gives dfdx's `Linear`, `LayerNorm1D`,
//! erf GELU and [`FactorizedLinear`] a faster inference forward on the CPU; [`engine`] computes truncated factorizations
//! with the Eckart–Young optimal error; [`weights`] handles checkpoints whose dims are only known
//! at run time; [`report`] describes what happened.
#![warn(missing_docs)]

pub mod budget;
pub mod calibrate;
pub mod config;
pub mod conv;
mod convert;
pub mod cost;
pub mod distill;
pub mod engine;
mod error;
mod factorizable;
mod factorized_conv;
pub mod fast;
mod forced;
mod linear;
pub mod pair;
mod pool;
mod progress;
pub mod report;
pub mod sensitivity;
mod stand_in;
pub mod synthetic;
pub mod weights;

pub use config::{Backend, FactorizeConfig, Fit, Method, Precision};
pub use cost::{Decision, FactorizeParams, Latent, LayerKind};
pub use error::FactorizeError;
pub use factorizable::{Factorizable, FactorizeAs, VariantOf};
pub use factorize_derive::{mirror, sequential, Factorizable, TensorCollection};
pub use factorized_conv::FactorizedConv2D;
pub use linear::FactorizedLinear;
pub use report::{FactorizeReport, LayerReport, Status};

pub mod builders;
pub mod prelude;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// The README's code blocks, compiled and run as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
