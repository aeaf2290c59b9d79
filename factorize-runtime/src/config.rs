//! Run-time options of a factorization ([`FactorizeConfig`]): how the new weights are filled
//! from the dense weights ([`Method`]) or from calibration data ([`Fit`]), where ([`Backend`]),
//! and in what precision ([`Precision`]).
//!
//! Which layers are replaced, and at which rank, is not decided here: that is the cost rule's
//! [`FactorizeParams`](crate::FactorizeParams), fixed at compile time for derived models.
//!
//! ```
//! use factorize_runtime::{Backend, FactorizeConfig, Method, Precision};
//! let cfg = FactorizeConfig::default();
//! assert_eq!((cfg.method, cfg.backend, cfg.precision), (Method::Svd, Backend::Auto, Precision::F64));
//! let fresh = FactorizeConfig { method: Method::Fresh, ..cfg };
//! assert_eq!(fresh.method, Method::Fresh);
//! ```

/// How the factorized weights are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Weight-preserving truncated SVD: `W ≈ (U_L·√S_L)(√S_L·V_Lᵀ)`, the best rank-`L`
    /// approximation of `W` in the Frobenius norm (Eckart–Young). The bias moves to the second map.
    #[default]
    Svd,
    /// Re-initialise both new layers with dfdx's (PyTorch's) default init, as Composer does.
    Fresh,
}

/// Where the linear algebra runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU (faer).
    Cpu,
    /// An NVIDIA GPU through cudarc. Needs the `cuda` feature and a GPU; an error otherwise.
    Cuda,
}

/// The floating-point precision of the factorization itself (the weights keep their dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Single precision: faster, enough for well-separated spectra.
    F32,
    /// Double precision: the Gram matrix squares the condition number, so this is the default.
    #[default]
    F64,
}

/// Run-time options of [`crate::Factorizable::factorize`] and the layer-level constructors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactorizeConfig {
    /// How new weights are filled.
    pub method: Method,
    /// Where the linear algebra runs.
    pub backend: Backend,
    /// The precision of the linear algebra.
    pub precision: Precision,
    /// Show a progress line per layer on a terminal (nothing is drawn when stderr is not one).
    pub progress: bool,
}

impl Default for FactorizeConfig {
    fn default() -> Self {
        Self {
            method: Method::default(),
            backend: Backend::default(),
            precision: Precision::default(),
            progress: true,
        }
    }
}

/// How the pair is fitted to the calibration data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fit {
    /// The exact optimum of the output error, with a ridge `ρ = ridge · tr(C) / in` on the input
    /// second moment (`0.0`: none unless the rows do not span the inputs).
    Exact {
        /// Relative ridge.
        ridge: f64,
    },
    /// Composer's alternating least squares, `iterations` rounds from the weight-space SVD.
    Als {
        /// Rounds (Composer uses 3).
        iterations: usize,
    },
    /// The exact optimum of the error against the *dense model's* output of the layer, from the
    /// inputs the layer sees in the already-factorized model: each fit corrects the error that
    /// the layers before it let through (reduced-rank regression). The ridge pulls towards the
    /// dense weight, `ρ‖BA − W‖²` with `ρ` as for [`Fit::Exact`]; without a reference the fit
    /// equals [`Fit::Exact`]. Runs on the CPU.
    Correcting {
        /// Relative ridge.
        ridge: f64,
    },
}

impl Fit {
    /// The default ridge of the exact fit: the best mean held-out nmse on the real MiniLM
    /// layers among 0.01, 0.1 and 1 (docs/performance.md, data-aware fits).
    pub const DEFAULT_RIDGE: f64 = 0.1;

    /// The exact fit with the default ridge.
    pub const fn exact() -> Fit {
        Fit::Exact {
            ridge: Self::DEFAULT_RIDGE,
        }
    }

    /// Composer's ALS with its 3 rounds.
    pub const fn als() -> Fit {
        Fit::Als { iterations: 3 }
    }

    /// The correcting fit with the default ridge.
    pub const fn correcting() -> Fit {
        Fit::Correcting {
            ridge: Self::DEFAULT_RIDGE,
        }
    }
}

impl Default for Fit {
    fn default() -> Self {
        Fit::exact()
    }
}
