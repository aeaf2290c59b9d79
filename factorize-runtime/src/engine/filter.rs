//! The Chebyshev filter both engines' subspace iterations apply between orthonormalisations.
//!
//! Plain subspace iteration multiplies the block by `G` and converges like
//! `(λ_{b+1}/λ_L)^k`. Multiplying by a polynomial `p(G)` that stays small on the unwanted part of
//! the spectrum `[0, c]` and grows fast above it converges like `p(λ_{b+1})/p(λ_L)` instead; the
//! Chebyshev polynomial `T_d` of `[0, c]` is the fastest growing such polynomial. With `c` the
//! smallest Ritz value of the block, the degree-1 filter is the shifted power step
//! `G − c/2·I`, and degree `d` gains as much as `acosh(2λ_L/c − 1)·d` power steps'
//! `ln(λ_L/c)·d` — for a flat spectrum several times more.
//!
//! The growth is steepest where the spectrum is already converged: the leading direction is
//! scaled by `T_d(x_max)`, the cutoff by 1. Beyond the working precision's reach the block loses
//! its weakest directions to rounding, so the degree is capped where `T_d(x_max)` reaches the
//! caller's limit (degree 1 is always allowed: it is within a factor 2 of a power step).
//!
//! The recurrence (values grow like `T_d`, so nothing overflows below the limit):
//! `Y₀ = Q`, `Y₁ = (G − m·I)·Q / e`, `Y_{k+1} = 2·(G − m·I)·Y_k / e − Y_{k−1}`,
//! with centre `m = c/2` and half width `e = c/2` of the damped interval.

/// One application of the filter: the damped interval's centre and half width, and the degree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Chebyshev {
    /// Centre `m` of the damped interval `[0, c]`.
    pub(crate) center: f64,
    /// Half width `e` of the damped interval.
    pub(crate) half_width: f64,
    /// Number of multiplications by `G`.
    pub(crate) degree: usize,
}

/// The highest degree worth one orthonormalisation: beyond it the cap on growth, not the
/// degree, decides for a steep spectrum, and a flat one has converged long before.
const MAX_DEGREE: usize = 8;

impl Chebyshev {
    /// The filter for a block whose Ritz values lie in `[smallest, largest]`, growing at most
    /// `limit`-fold on the leading direction; `None` when the spectrum gives no interval to damp
    /// (a zero or non-finite cutoff): the caller multiplies by `G` alone.
    pub(crate) fn from_ritz(smallest: f64, largest: f64, limit: f64) -> Option<Self> {
        if !(smallest > 0.0 && largest.is_finite() && largest >= smallest) {
            return None;
        }
        let half_width = smallest / 2.0;
        let x = (largest - half_width) / half_width;
        let mut degree = 1;
        while degree < MAX_DEGREE && chebyshev(degree + 1, x) <= limit {
            degree += 1;
        }
        Some(Self {
            center: half_width,
            half_width,
            degree,
        })
    }
}

/// `T_d(x)` for `x >= 1`, by its recurrence (exact enough for choosing a degree).
fn chebyshev(d: usize, x: f64) -> f64 {
    let (mut previous, mut current) = (1.0, x);
    for _ in 1..d {
        (previous, current) = (current, 2.0 * x * current - previous);
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chebyshev_polynomials_match_their_closed_form() {
        for x in [1.0, 1.5, 3.0, 40.0] {
            for d in 1..8 {
                let closed = (d as f64 * f64::acosh(x)).cosh();
                let ours = chebyshev(d, x);
                assert!((ours - closed).abs() <= 1e-9 * closed, "T_{d}({x})");
            }
        }
    }

    #[test]
    fn degree_stops_where_the_leading_growth_reaches_the_limit() {
        // Flat spectrum: x = 3, T_d(3) = 3, 17, 99, 577, 3363, …
        let f = Chebyshev::from_ritz(1.0, 2.0, 1000.0).unwrap();
        assert_eq!((f.center, f.half_width, f.degree), (0.5, 0.5, 4));
        // Steep spectrum: the leading direction 1000x the cutoff allows only the shifted step.
        assert_eq!(Chebyshev::from_ritz(1.0, 1000.0, 1e3).unwrap().degree, 1);
        assert_eq!(
            Chebyshev::from_ritz(1.0, 1.0, 1e300).unwrap().degree,
            MAX_DEGREE
        );
    }

    #[test]
    fn no_filter_without_an_interval_to_damp() {
        assert_eq!(Chebyshev::from_ritz(0.0, 1.0, 1e6), None);
        assert_eq!(Chebyshev::from_ritz(-1.0, 1.0, 1e6), None);
        assert_eq!(Chebyshev::from_ritz(1.0, f64::NAN, 1e6), None);
        assert_eq!(Chebyshev::from_ritz(1.0, f64::INFINITY, 1e6), None);
    }
}
