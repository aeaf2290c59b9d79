//! The [`Factorizable`] trait: a model that can build its factorized variant.
//!
//! `#[derive(Factorizable)]` implements it for a dfdx model struct (see the crate docs for an
//! example). It is also implemented here for the dfdx modules that are carried over unchanged
//! (activations, normalisations, embeddings, dropout, biases, `PReLU`, `UnbiasedLinear`, and
//! tensors held as fields), for this crate's
//! factorized layers, and for dfdx tuples, `Repeated` stacks and the residual/split/add
//! wrappers of such modules, so that they can be fields of a derived model or parts of a
//! nested one.

use dfdx::nn::modules::*;
use dfdx::prelude::{ConstDim, ConstShape, Device, Dtype, Tensor};

use crate::calibrate::{
    calibrate, evaluate_heldout, DenseVisitor, FactorizedVisitor, VisitDense, VisitFactorized,
};
use crate::config::{FactorizeConfig, Fit};
use crate::conv::Conv2D;
use crate::error::FactorizeError;
use crate::factorized_conv::FactorizedConv2D;
use crate::linear::FactorizedLinear;
use crate::pair::DenseLayer;
use crate::report::FactorizeReport;
use crate::sensitivity::{RankPlan, Sensitivity, SensitivityParams, Simulated};

/// A model that can build its factorized variant from its own weights.
///
/// The variant takes and returns the same tensor types. `self` is only borrowed: on any error
/// nothing has changed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module that `#[derive(Factorizable)]` can carry over or factorize",
    label = "not Factorizable",
    note = "derive `Factorizable` for it, write `Linear<..>` or the tuple type out in the field \
            (aliases hide it from the derive), or mark the field `#[factorize(skip)]` to copy it as is"
)]
pub trait Factorizable {
    /// The factorized variant: same fields, big layers replaced where the cost rule says so.
    type Factorized;

    /// Builds the variant, appending one report row per candidate layer, with paths under `path`.
    fn factorize_into(
        &self,
        path: &str,
        cfg: &FactorizeConfig,
        report: &mut FactorizeReport,
    ) -> Result<Self::Factorized, FactorizeError>;

    /// Builds the variant.
    fn factorize(&self, cfg: &FactorizeConfig) -> Result<Self::Factorized, FactorizeError> {
        self.factorize_into("", cfg, &mut FactorizeReport::default())
    }

    /// Builds the variant and reports, layer by layer, what was replaced and what it cost.
    fn factorize_with_report(
        &self,
        cfg: &FactorizeConfig,
    ) -> Result<(Self::Factorized, FactorizeReport), FactorizeError> {
        let mut report = FactorizeReport::default();
        let model = self.factorize_into("", cfg, &mut report)?;
        Ok((model, report))
    }

    /// Builds the variant with every replaced layer fitted to its outputs on calibration data
    /// (see [`crate::engine::calibrated`]), in forward order, each on the inputs it sees in the
    /// already-factorized model. `run` runs the calibration forward on the variant, e.g.
    /// `|m| { m.forward(batch.clone()); }`; it is called once per replaced layer, plus once.
    /// The fits run on `cfg.backend` (see [`crate::engine::calibrated::solve`]: `Cuda`
    /// without a usable GPU is an error naming the first layer). Report rows carry each
    /// layer's calibration nmse and the backend that fitted it.
    fn factorize_calibrated<F>(
        &self,
        cfg: &FactorizeConfig,
        fit: Fit,
        run: F,
    ) -> Result<(Self::Factorized, FactorizeReport), FactorizeError>
    where
        Self: VisitDense + Sized,
        Self::Factorized: VisitFactorized,
        F: FnMut(&Self::Factorized),
    {
        let (model, report) = self.factorize_with_report(cfg)?;
        calibrate(self, model, report, fit, cfg.backend, run)
    }

    /// Fills `nmse_heldout` in `report`'s rows: each factorized layer of `factorized` against its
    /// dense original in `self`, on the inputs it receives while `run` runs the forward on
    /// held-out data (a recording pass, as in [`Self::factorize_calibrated`]).
    fn evaluate_heldout<F>(
        &self,
        factorized: &mut Self::Factorized,
        report: &mut FactorizeReport,
        run: F,
    ) -> Result<(), FactorizeError>
    where
        Self: VisitDense + Sized,
        Self::Factorized: VisitFactorized,
        F: FnMut(&Self::Factorized),
    {
        evaluate_heldout(self, factorized, report, run)
    }

    /// Measures, for every layer the variant replaces (or every group of them, as
    /// `params.grouping` says), the damage to the model's output when that layer or group alone
    /// is truncated to each rank of `params.grid` (see [`crate::sensitivity`]).
    ///
    /// `run` runs the forward on calibration data and returns what `damage` compares: `damage(
    /// reference, output)` gets the dense model's output first. Both run on the calling thread:
    /// `run` `1 + Σ (layers + ranks)` times over the groups. `self` is only read; a progress line
    /// per group shows on a terminal when `cfg.progress`. The result is deterministic for a deterministic forward.
    fn sensitivity<O, F, G>(
        &self,
        params: &SensitivityParams,
        cfg: &FactorizeConfig,
        run: F,
        damage: G,
    ) -> Result<Sensitivity, FactorizeError>
    where
        Self: VisitDense + Sized,
        Self::Factorized: VisitFactorized,
        F: FnMut(&Self::Factorized) -> O,
        G: FnMut(&O, &O) -> f64,
    {
        let variant = self.factorize(&crate::sensitivity::fresh(cfg))?;
        crate::sensitivity::measure(self, variant, params, cfg, run, damage)
    }

    /// Runs `plan` without compiling it: the variant with every planned layer stood in for by
    /// the dense product of its pair at the planned rank (the same function the compiled pair
    /// computes), fitted in forward order as `fit` says on the calibration forward `run`, or by
    /// weight SVD (`None`). For measuring a plan's fidelity before its ranks go into types; it
    /// is not faster than the dense model.
    ///
    /// Errors: a plan path the variant does not factorize, and the fits' errors.
    fn simulate<F>(
        &self,
        plan: &RankPlan,
        fit: Option<Fit>,
        cfg: &FactorizeConfig,
        run: F,
    ) -> Result<Simulated<Self::Factorized>, FactorizeError>
    where
        Self: VisitDense + Sized,
        Self::Factorized: VisitFactorized,
        F: FnMut(&Self::Factorized),
    {
        let variant = self.factorize(&crate::sensitivity::fresh(cfg))?;
        crate::sensitivity::simulate(self, variant, plan, fit, cfg, run)
    }
}

/// A builder type that is the factorized variant of the dense module `Dense`: what
/// [`sequential!`](crate::sequential) generates for a dfdx sequential model, so that
/// [`FactorizeAs::factorize_as`] can build it from the dense model's weights.
///
/// Implemented by generated code; users name it only in bounds.
pub trait VariantOf<Dense> {
    /// The built variant: same tuple structure, big `Linear`s replaced by the cost rule.
    type Built;

    /// Builds the variant from `dense`, appending one report row per candidate layer, with
    /// paths under `path`.
    fn factorize_from(
        dense: &Dense,
        path: &str,
        cfg: &FactorizeConfig,
        report: &mut FactorizeReport,
    ) -> Result<Self::Built, FactorizeError>;
}

/// `model.factorize_as::<V>(&cfg)`: builds the variant that the builder type `V` names (from
/// [`sequential!`](crate::sequential)) from any model, typically a dfdx tuple that
/// `#[derive(Factorizable)]` cannot reach. `self` is only borrowed.
///
/// ```
/// use dfdx::prelude::*;
/// use factorize_runtime::{sequential, FactorizeAs, FactorizeConfig, FactorizedLinear};
///
/// sequential! {
///     /// A two-layer perceptron, as dfdx users write it.
///     #[factorize(latent_features = 64)]
///     pub type Mlp = (Linear<512, 1024>, ReLU, Linear<1024, 512>, ReLU, Linear<512, 10>);
/// }
///
/// let dev: Cpu = Default::default();
/// let model = dev.build_module::<Mlp, f32>();
/// let (small, report) = model.factorize_as_with_report::<MlpFactorized>(&FactorizeConfig::default())?;
/// println!("{report}");
/// let _: &FactorizedLinear<512, 64, 1024, f32, Cpu> = &small.0; // the rule, at compile time
/// let _: &dfdx::nn::modules::Linear<512, 10, f32, Cpu> = &small.4; // too narrow: kept
/// let y = small.forward(dev.zeros::<Rank2<3, 512>>()); // dfdx tuples run in sequence
/// assert_eq!(y.shape(), &(Const::<3>, Const::<10>));
/// // Deploy: the variant is a builder too.
/// let _fresh = dev.build_module::<MlpFactorized, f32>();
/// # Ok::<(), factorize_runtime::FactorizeError>(())
/// ```
pub trait FactorizeAs: Sized {
    /// Builds the variant `V` of `self`.
    fn factorize_as<V: VariantOf<Self>>(
        &self,
        cfg: &FactorizeConfig,
    ) -> Result<V::Built, FactorizeError> {
        V::factorize_from(self, "", cfg, &mut FactorizeReport::default())
    }

    /// Builds the variant `V` of `self` and reports, layer by layer, what was replaced.
    fn factorize_as_with_report<V: VariantOf<Self>>(
        &self,
        cfg: &FactorizeConfig,
    ) -> Result<(V::Built, FactorizeReport), FactorizeError> {
        let mut report = FactorizeReport::default();
        let built = V::factorize_from(self, "", cfg, &mut report)?;
        Ok((built, report))
    }
}

impl<T> FactorizeAs for T {}

/// The impls the walks need, one per role, so that each kind of module below states its roles.
/// `copied`: its variant is itself (a copy).
macro_rules! copied {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> Factorizable for $ty {
            type Factorized = Self;
            fn factorize_into(
                &self,
                _path: &str,
                _cfg: &FactorizeConfig,
                _report: &mut FactorizeReport,
            ) -> Result<Self, FactorizeError> {
                Ok(self.clone())
            }
        }
    };
}

/// `no_pairs`: the calibration walk finds no factorized layer in it.
macro_rules! no_pairs {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> VisitFactorized for $ty {
            fn visit_factorized(
                &mut self,
                _path: &str,
                _f: &mut FactorizedVisitor<'_>,
            ) -> Result<(), FactorizeError> {
                Ok(())
            }
        }
    };
}

/// `no_dense`: the dense walk finds no dense layer in it.
macro_rules! no_dense {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> VisitDense for $ty {
            fn visit_dense(&self, _path: &str, _f: &mut DenseVisitor<'_>) {}
        }
    };
}

/// Modules without anything to factorize: the variant is a copy, and the calibration walks
/// find nothing in them.
macro_rules! carried_over {
    ($([$($generics:tt)*] $ty:ty;)*) => {$(
        copied!([$($generics)*] $ty);
        no_pairs!([$($generics)*] $ty);
        no_dense!([$($generics)*] $ty);
    )*};
}

// dfdx 0.13 still has the deprecated `GeLU` (= `FastGeLU`); models written before 0.12 use it.
#[allow(deprecated)]
mod deprecated {
    use super::*;
    carried_over! {
        [] GeLU;
    }
}

carried_over! {
    [] ReLU;
    [] FastGeLU;
    [] AccurateGeLU;
    [] Sigmoid;
    [] Tanh;
    [] Sin;
    [] Cos;
    [] Exp;
    [] Ln;
    [] Square;
    [] Sqrt;
    [] Abs;
    [] Softmax;
    [] LogSoftmax;
    [] Dropout;
    [const N: usize] DropoutOneIn<N>;
    [const M: usize, E: Dtype, D: Device<E>] LayerNorm1D<M, E, D>;
    [const C: usize, E: Dtype, D: Device<E>] BatchNorm1D<C, E, D>;
    [const V: usize, const M: usize, E: Dtype, D: Device<E>] Embedding<V, M, E, D>;
    [const I: usize, const O: usize, E: Dtype, D: Device<E>] UnbiasedLinear<I, O, E, D>;
    [const C: usize, E: Dtype, D: Device<E>] BatchNorm2D<C, E, D>;
    [const C: usize, E: Dtype, D: Device<E>] Bias2D<C, E, D>;
    [E: Dtype, D: Device<E>] dfdx::nn::prelu::PReLU<E, D>;
    [C: ConstDim, E: Dtype, D: Device<E>] dfdx::nn::prelu::PReLU1D<C, E, D>;
    // A learned tensor held as a field (a scale, a class token): dfdx visits it as a module.
    [S: ConstShape, E: Dtype, D: Device<E>] Tensor<S, E, D>;
}

macro_rules! tuples {
    ($([$($name:ident $idx:tt),+])*) => {$(
        impl<$($name: Factorizable),+> Factorizable for ($($name,)+) {
            type Factorized = ($($name::Factorized,)+);
            fn factorize_into(
                &self,
                path: &str,
                cfg: &FactorizeConfig,
                report: &mut FactorizeReport,
            ) -> Result<Self::Factorized, FactorizeError> {
                Ok(($(self.$idx.factorize_into(&crate::report::join(path, stringify!($idx)), cfg, report)?,)+))
            }
        }
        impl<$($name: VisitFactorized),+> VisitFactorized for ($($name,)+) {
            fn visit_factorized(
                &mut self,
                path: &str,
                f: &mut FactorizedVisitor<'_>,
            ) -> Result<(), FactorizeError> {
                $(self.$idx.visit_factorized(&crate::report::join(path, stringify!($idx)), f)?;)+
                Ok(())
            }
        }
        impl<$($name: VisitDense),+> VisitDense for ($($name,)+) {
            fn visit_dense(&self, path: &str, f: &mut DenseVisitor<'_>) {
                $(self.$idx.visit_dense(&crate::report::join(path, stringify!($idx)), f);)+
            }
        }
    )*};
}

tuples! {
    [A 0]
    [A 0, B 1]
    [A 0, B 1, C 2]
    [A 0, B 1, C 2, F 3]
    [A 0, B 1, C 2, F 3, G 4]
    [A 0, B 1, C 2, F 3, G 4, H 5]
}

/// dfdx's `Repeated<T, N>` (a stack of `N` blocks, e.g. transformer layers): each block is
/// factorized on its own under the paths `…0`, `…1`, …, so the variant is a `Repeated` of the
/// block's variant, and calibration fits the blocks in the order the forward reaches them.
impl<T: Factorizable, const N: usize> Factorizable for Repeated<T, N> {
    type Factorized = Repeated<T::Factorized, N>;
    fn factorize_into(
        &self,
        path: &str,
        cfg: &FactorizeConfig,
        report: &mut FactorizeReport,
    ) -> Result<Self::Factorized, FactorizeError> {
        let modules = self
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| m.factorize_into(&crate::report::join(path, &i.to_string()), cfg, report))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Repeated { modules })
    }
}

impl<T: VisitFactorized, const N: usize> VisitFactorized for Repeated<T, N> {
    fn visit_factorized(
        &mut self,
        path: &str,
        f: &mut FactorizedVisitor<'_>,
    ) -> Result<(), FactorizeError> {
        for (i, m) in self.modules.iter_mut().enumerate() {
            m.visit_factorized(&crate::report::join(path, &i.to_string()), f)?;
        }
        Ok(())
    }
}

impl<T: VisitDense, const N: usize> VisitDense for Repeated<T, N> {
    fn visit_dense(&self, path: &str, f: &mut DenseVisitor<'_>) {
        for (i, m) in self.modules.iter().enumerate() {
            m.visit_dense(&crate::report::join(path, &i.to_string()), f);
        }
    }
}

/// dfdx's one-module wrappers: the wrapped module is factorized under `…0` (dfdx's name for it
/// in safetensors files too).
macro_rules! wrappers {
    ($($ty:ident),*) => {$(
        impl<T: Factorizable> Factorizable for $ty<T> {
            type Factorized = $ty<T::Factorized>;
            fn factorize_into(
                &self,
                path: &str,
                cfg: &FactorizeConfig,
                report: &mut FactorizeReport,
            ) -> Result<Self::Factorized, FactorizeError> {
                Ok($ty(self.0.factorize_into(&crate::report::join(path, "0"), cfg, report)?))
            }
        }
        impl<T: VisitFactorized> VisitFactorized for $ty<T> {
            fn visit_factorized(
                &mut self,
                path: &str,
                f: &mut FactorizedVisitor<'_>,
            ) -> Result<(), FactorizeError> {
                self.0.visit_factorized(&crate::report::join(path, "0"), f)
            }
        }
        impl<T: VisitDense> VisitDense for $ty<T> {
            fn visit_dense(&self, path: &str, f: &mut DenseVisitor<'_>) {
                self.0.visit_dense(&crate::report::join(path, "0"), f);
            }
        }
    )*};
}

wrappers!(Residual, SplitInto, AddInto);

/// dfdx's `GeneralizedResidual`: both branches, under `…f` and `…r`.
impl<F: Factorizable, R: Factorizable> Factorizable for GeneralizedResidual<F, R> {
    type Factorized = GeneralizedResidual<F::Factorized, R::Factorized>;
    fn factorize_into(
        &self,
        path: &str,
        cfg: &FactorizeConfig,
        report: &mut FactorizeReport,
    ) -> Result<Self::Factorized, FactorizeError> {
        Ok(GeneralizedResidual {
            f: self
                .f
                .factorize_into(&crate::report::join(path, "f"), cfg, report)?,
            r: self
                .r
                .factorize_into(&crate::report::join(path, "r"), cfg, report)?,
        })
    }
}

impl<F: VisitFactorized, R: VisitFactorized> VisitFactorized for GeneralizedResidual<F, R> {
    fn visit_factorized(
        &mut self,
        path: &str,
        f: &mut FactorizedVisitor<'_>,
    ) -> Result<(), FactorizeError> {
        self.f
            .visit_factorized(&crate::report::join(path, "f"), f)?;
        self.r.visit_factorized(&crate::report::join(path, "r"), f)
    }
}

impl<F: VisitDense, R: VisitDense> VisitDense for GeneralizedResidual<F, R> {
    fn visit_dense(&self, path: &str, f: &mut DenseVisitor<'_>) {
        self.f.visit_dense(&crate::report::join(path, "f"), f);
        self.r.visit_dense(&crate::report::join(path, "r"), f);
    }
}

/// Dense layer kinds are reached by the derive's syntax only, so they have no `Factorizable` of
/// their own; the calibration walks see their weight as a matrix `[out, fan_in]`.
macro_rules! dense_layers {
    ($([$($generics:tt)*] $ty:ty;)*) => {$(
        no_pairs!([$($generics)*] $ty);
        impl<$($generics)*> VisitDense for $ty {
            fn visit_dense(&self, path: &str, f: &mut DenseVisitor<'_>) {
                let (weight, bias) = DenseLayer::host_weights(self);
                f(path, weight, bias);
            }
        }
    )*};
}

dense_layers! {
    [const I: usize, const O: usize, E: Dtype, D: Device<E>] Linear<I, O, E, D>;
    [
        const I: usize, const O: usize, const K: usize, const S: usize, const P: usize,
        const DIL: usize, E: Dtype, D: Device<E>
    ] Conv2D<I, O, K, S, P, DIL, E, D>;
}

/// Factorized pairs are carried over as they are (a variant of a variant is itself), and are
/// what the calibration walks refit.
macro_rules! pairs {
    ($([$($generics:tt)*] $ty:ty;)*) => {$(
        copied!([$($generics)*] $ty);
        impl<$($generics)*> VisitFactorized for $ty {
            fn visit_factorized(
                &mut self,
                path: &str,
                f: &mut FactorizedVisitor<'_>,
            ) -> Result<(), FactorizeError> {
                f(path, self)
            }
        }
        no_dense!([$($generics)*] $ty);
    )*};
}

pairs! {
    [const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>]
        FactorizedLinear<I, L, O, E, D>;
    [
        const I: usize, const L: usize, const O: usize, const K: usize, const S: usize,
        const P: usize, const DIL: usize, E: Dtype, D: Device<E>
    ] FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>;
}
