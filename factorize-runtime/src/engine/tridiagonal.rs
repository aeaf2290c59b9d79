//! The leading eigenpairs of a symmetric tridiagonal matrix: Sturm counts with Laguerre steps for
//! the eigenvalues, twisted factorizations (inverse iteration) for the vectors.
//!
//! After tridiagonalisation the dense path wants `k` of the `n` eigenvectors, usually `k <= n/3`.
//! Divide and conquer computes all `n`, and was the dense path's largest cost after the
//! reduction itself. Here only the `k` wanted pairs are computed, in `O(n·k)` time (2.3–11x
//! faster than faer's divide and conquer, and far faster than faer's Krylov–Schur partial
//! solver: `benches/eigen.rs`, figures in docs/performance.md), on the plan of LAPACK's
//! `dstebz` and `dstein`:
//! - each eigenvalue's interval is halved by Sturm counts until it holds that eigenvalue alone,
//!   then Laguerre steps on `det(T − x·I)` finish it in about four probes instead of some forty
//!   halvings; the probes of many intervals run together in SIMD lanes;
//! - an isolated eigenvalue's vector comes from one twisted factorization (one inverse-iteration
//!   step from the best unit vector). Vectors of eigenvalues closer than [`CLUSTER`]`·‖T‖` would
//!   come out nearly parallel, so they are computed together by inverse iteration with
//!   Gram–Schmidt at every step; the small lean of the others towards each other (`√n·ε‖T‖/gap`)
//!   is removed by one Cholesky-QR step, which does not move their span.
//!
//! A cluster larger than [`MAX_CLUSTER`] (quadratic work), an iteration that does not converge or
//! a basis further than [`ORTHOGONALITY`] from orthonormal means the result cannot be vouched
//! for: the function then returns `None` and the caller uses divide and conquer. Everything is
//! computed in f64 (the input is `O(n)` numbers), whatever the precision of the matrix it came
//! from.

use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Accum, Mat, MatRef, Par, Side};
use rayon::prelude::*;

use super::params::SUBSPACE;
use super::Gaussian;

/// Eigenvalues closer than this fraction of `‖T‖` form one cluster.
const CLUSTER: f64 = 1e-9;
/// The largest cluster orthogonalised here; a larger one goes to divide and conquer.
const MAX_CLUSTER: usize = 32;
/// Inverse-iteration steps allowed per vector (LAPACK's `dstein` allows 5).
const MAX_STEPS: usize = 5;
/// Steps taken after the growth first shows convergence (as `dstein`): each divides the
/// contamination by the nearest other eigenvalue by at least `gap / (4ε‖T‖)`.
const EXTRA_STEPS: usize = 2;
/// The largest `|vᵢ·vⱼ − δᵢⱼ|` accepted before re-orthonormalisation. Vectors of eigenvalues a
/// gap `g` apart lean towards each other by about `√n·ε‖T‖/g`, which re-orthonormalisation
/// removes without moving their span; a larger lean means a vector was not found.
const ORTHOGONALITY: f64 = 1e-6;
/// A basis this close to orthonormal is left as it is.
const ROUNDING: f64 = 1e-13;
/// Shifts evaluated together in one Sturm sweep: independent divisions keep the divider busy.
const LANES: usize = 16;
/// Below this many `n·k`, the work is not worth sharing between threads.
const PARALLEL_WORK: usize = 1 << 14;

/// The `k` largest eigenvalues of the symmetric tridiagonal matrix with diagonal `d` and
/// off-diagonal `e` (`d.len() − 1` values), largest first, and their eigenvectors as orthonormal
/// columns; `None` when they cannot be vouched for (see the module notes) or the matrix is zero
/// or not finite.
///
/// # Panics
/// When `e` is not one shorter than `d`, or `k` is not in `1..=n`: the caller's bug.
pub fn leading_eigenvectors(d: &[f64], e: &[f64], k: usize) -> Option<(Mat<f64>, Vec<f64>)> {
    let n = d.len();
    assert!(
        e.len() + 1 == n,
        "a tridiagonal matrix of {n} rows has {} off-diagonal values, not {}",
        n.saturating_sub(1),
        e.len()
    );
    assert!(
        (1..=n).contains(&k),
        "{k} eigenpairs asked of a {n} × {n} matrix"
    );
    let t = Tridiagonal::new(d, e)?;
    let values = t.leading_eigenvalues(k);
    let groups = clusters(&values, CLUSTER);
    if groups.iter().any(|g| g.len() > MAX_CLUSTER) {
        return None;
    }
    let solve = |g: &Range<usize>| t.cluster_vectors(&values, g.clone());
    let columns: Vec<Vec<f64>> = if n * k >= PARALLEL_WORK {
        groups.par_iter().map(solve).collect::<Option<_>>()?
    } else {
        groups.iter().map(solve).collect::<Option<_>>()?
    };
    let data = columns.concat();
    let v = MatRef::from_column_major_slice(&data, n, k).to_owned();
    let values = values.iter().map(|v| v * t.norm).collect();
    Some((orthonormalized(v)?, values))
}

/// `v` made orthonormal to rounding: `None` when `VᵀV` is further than [`ORTHOGONALITY`] from
/// the identity (a vector was not found), else one Cholesky-QR step `V·L⁻ᵀ` (`VᵀV = L·Lᵀ`) when
/// it is not already orthonormal to [`ROUNDING`].
fn orthonormalized(mut v: Mat<f64>) -> Option<Mat<f64>> {
    let k = v.ncols();
    let mut g = Mat::<f64>::zeros(k, k);
    // Sequential: at these sizes (k ≤ n ≈ 10³) threads cost more than they share.
    matmul(
        g.as_mut(),
        Accum::Replace,
        v.transpose(),
        v.as_ref(),
        1.0,
        Par::Seq,
    );
    let mut deviation = 0.0f64;
    for j in 0..g.ncols() {
        for i in 0..g.nrows() {
            let expected = if i == j { 1.0 } else { 0.0 };
            // `max` would drop a NaN; `NaN > x` is false, so test for it first.
            let d = (g[(i, j)] - expected).abs();
            if d.is_nan() || d > ORTHOGONALITY {
                return None;
            }
            deviation = deviation.max(d);
        }
    }
    if deviation > ROUNDING {
        let llt = g.llt(Side::Lower).ok()?;
        solve_lower_triangular_in_place(llt.L(), v.as_mut().transpose_mut(), Par::Seq);
    }
    Some(v)
}

/// Runs of consecutive `values` (sorted, largest first) closer than `gap`.
fn clusters(values: &[f64], gap: f64) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    for j in 1..=values.len() {
        if j == values.len() || values[j - 1] - values[j] > gap {
            groups.push(start..j);
            start = j;
        }
    }
    groups
}

/// The matrix scaled to `‖T‖ ≈ 1` (scaling changes no eigenvector), with its Gershgorin bounds.
struct Tridiagonal {
    /// The scale: the largest absolute row sum of the matrix given.
    norm: f64,
    d: Vec<f64>,
    e: Vec<f64>,
    e2: Vec<f64>,
    lower: f64,
    upper: f64,
    /// The smallest pivot magnitude allowed in a Sturm count (LAPACK's `pivmin`).
    pivmin: f64,
}

impl Tridiagonal {
    /// `None` for a non-finite or zero matrix (any basis will do there; divide and conquer
    /// gives one).
    fn new(d: &[f64], e: &[f64]) -> Option<Self> {
        let n = d.len();
        let radius = |i: usize| {
            let below = if i > 0 { e[i - 1].abs() } else { 0.0 };
            let above = if i + 1 < n { e[i].abs() } else { 0.0 };
            below + above
        };
        let norm = (0..n).map(|i| d[i].abs() + radius(i)).fold(0.0, f64::max);
        if !(norm.is_finite() && norm > 0.0) {
            return None;
        }
        let d: Vec<f64> = d.iter().map(|x| x / norm).collect();
        let e: Vec<f64> = e.iter().map(|x| x / norm).collect();
        let e2: Vec<f64> = e.iter().map(|x| x * x).collect();
        let scaled = |i: usize| radius(i) / norm;
        let (mut lower, mut upper) = (f64::INFINITY, f64::NEG_INFINITY);
        for (i, &di) in d.iter().enumerate() {
            lower = lower.min(di - scaled(i));
            upper = upper.max(di + scaled(i));
        }
        let pivmin = f64::MIN_POSITIVE * e2.iter().copied().fold(1.0, f64::max);
        // Widened as `dstebz` does, so that rounding in the counts cannot push an eigenvalue out.
        let fudge = 2.0 * f64::EPSILON * n as f64 + 4.0 * pivmin;
        Some(Self {
            norm,
            d,
            e,
            e2,
            lower: lower - fudge,
            upper: upper + fudge,
            pivmin,
        })
    }

    fn n(&self) -> usize {
        self.d.len()
    }

    /// A pivot of `T − x·I`, kept off zero: one within `pivmin` of it is taken as `−pivmin`, as
    /// LAPACK's `dlaebz` does, so that the next division stays finite and the count consistent.
    #[inline(always)]
    fn pivot(&self, p: f64) -> f64 {
        if p.abs() <= self.pivmin {
            -self.pivmin
        } else {
            p
        }
    }

    /// For each point `x`, the number of eigenvalues below it: the negative pivots `q_i` of
    /// `T − x·I = L·diag(q)·Lᵀ` (Sylvester's law of inertia).
    #[inline(always)]
    fn counts(&self, x: &[f64; LANES]) -> [u32; LANES] {
        let mut q = [1.0; LANES];
        let mut count = [0u32; LANES];
        for (&di, &e2) in self.d.iter().zip(std::iter::once(&0.0).chain(&self.e2)) {
            for l in 0..LANES {
                let p = self.pivot((di - x[l]) - e2 / q[l]);
                q[l] = p;
                count[l] += u32::from(p < 0.0);
            }
        }
        count
    }

    /// For each point `x`: the count of [`Self::counts`], and `Σ 1/(x − λ)` and `Σ 1/(x − λ)²`
    /// over the eigenvalues `λ` (the first two derivatives of `log|det(T − x·I)| = Σ log|q_i|`,
    /// carried through the pivot recurrence) for a Laguerre step. About four times the work of
    /// a count.
    #[inline(always)]
    fn probe(&self, x: &[f64; LANES]) -> [Probe; LANES] {
        let mut inverse = [0.0; LANES];
        let mut first = [0.0; LANES];
        let mut second = [0.0; LANES];
        let mut s1 = [0.0; LANES];
        let mut s2 = [0.0; LANES];
        let mut count = [0u32; LANES];
        for (&di, &e2) in self.d.iter().zip(std::iter::once(&0.0).chain(&self.e2)) {
            for l in 0..LANES {
                let q = self.pivot((di - x[l]) - e2 * inverse[l]);
                let r = 1.0 / q;
                // q_i′ = −1 + e²·q′/q², q_i″ = e²·(q″/q² − 2q′²/q³) (previous row's q, q′, q″)
                let (p, p1, p2) = (inverse[l], first[l], second[l]);
                let q1 = e2 * p1 * p * p - 1.0;
                let q2 = e2 * p * p * (p2 - 2.0 * p1 * p1 * p);
                let g = q1 * r;
                s1[l] += g;
                s2[l] += g * g - q2 * r;
                (inverse[l], first[l], second[l]) = (r, q1, q2);
                count[l] += u32::from(q < 0.0);
            }
        }
        std::array::from_fn(|l| Probe {
            below: count[l],
            s1: s1[l],
            s2: s2[l],
        })
    }

    /// The `k` largest eigenvalues, largest first, each to about `4ε‖T‖`: contiguous runs of
    /// them searched on all cores when there is enough work (one parallel region; the sweeps
    /// themselves are too short to share).
    fn leading_eigenvalues(&self, k: usize) -> Vec<f64> {
        let n = self.n();
        let indices = n - k..n;
        let mut values = if n * k >= PARALLEL_WORK && k > LANES {
            let runs = rayon::current_num_threads().clamp(1, k.div_ceil(LANES));
            let size = k.div_ceil(runs);
            let starts: Vec<usize> = indices.clone().step_by(size).collect();
            starts
                .par_iter()
                .flat_map_iter(|&start| self.eigenvalues(start..(start + size).min(n)))
                .collect::<Vec<f64>>()
        } else {
            self.eigenvalues(indices)
        };
        values.reverse();
        values
    }

    /// The eigenvalues of ascending `indices`, ascending. Every one keeps an interval that
    /// holds it, shrunk in sweeps that probe all intervals together: halved while it holds
    /// other eigenvalues too (eigenvalues sharing an interval share the probe), and by
    /// safeguarded Laguerre steps once it isolates its own, which converge cubically where
    /// halving gains one bit a sweep.
    fn eigenvalues(&self, indices: Range<usize>) -> Vec<f64> {
        let n = self.n();
        let tolerance = 4.0 * f64::EPSILON;
        let (first, k) = (indices.start, indices.len());
        // Target `t` is eigenvalue `first + t` in ascending order.
        let mut targets: Vec<Target> = (0..k)
            .map(|_| Target {
                lo: self.lower,
                hi: self.upper,
                below: 0,
                above: n as u32,
                next: None,
                value: None,
            })
            .collect();
        for _ in 0..MAX_SWEEPS {
            // Halving points, shared by the targets of one interval, and Laguerre points.
            let (mut halving, mut shared) = (Vec::new(), Vec::new());
            let (mut stepping, mut stepper) = (Vec::new(), Vec::new());
            let mut t = 0;
            while t < k {
                let target = &targets[t];
                let mut end = t + 1;
                if target.value.is_none() && target.isolated() {
                    stepping.push(target.next.unwrap_or(target.middle()));
                    stepper.push(t);
                } else if target.value.is_none() {
                    while end < k && targets[end].lo == target.lo && targets[end].hi == target.hi {
                        end += 1;
                    }
                    halving.push(target.middle());
                    shared.push(t..end);
                }
                t = end;
            }
            if halving.is_empty() && stepping.is_empty() {
                break;
            }
            let index = |t: usize| (first + t) as u32;
            let counts = self.in_lanes(&halving, |x| self.counts(x));
            for ((&x, below), owned) in halving.iter().zip(counts).zip(shared) {
                for t in owned {
                    targets[t].narrow(x, below, index(t));
                }
            }
            let probes = self.in_lanes(&stepping, |x| self.probe(x));
            for ((&x, probe), t) in stepping.iter().zip(probes).zip(stepper) {
                targets[t].narrow(x, probe.below, index(t));
                targets[t].step(x, probe.laguerre(n), tolerance);
            }
            for target in targets.iter_mut().filter(|t| t.value.is_none()) {
                if target.hi - target.lo <= tolerance {
                    target.value = Some(target.middle());
                }
            }
        }
        targets.iter().map(Target::estimate).collect()
    }

    /// `kernel` at every point, `LANES` at a time, compiled for the widest SIMD the CPU has.
    fn in_lanes<R: Copy>(
        &self,
        points: &[f64],
        kernel: impl Fn(&[f64; LANES]) -> [R; LANES],
    ) -> Vec<R> {
        let mut out = Vec::with_capacity(points.len());
        for xs in points.chunks(LANES) {
            let mut x = [xs[xs.len() - 1]; LANES];
            x[..xs.len()].copy_from_slice(xs);
            let probed = pulp::Arch::new().dispatch(|| kernel(&x));
            out.extend_from_slice(&probed[..xs.len()]);
        }
        out
    }

    /// The eigenvector of the isolated eigenvalue nearest `shift` in one pass, by a twisted
    /// factorization of `T − shift·I` (Fernando; Dhillon and Parlett's `getvec`): with `L·D·Lᵀ`
    /// from the top and `U·D·Uᵀ` from the bottom, the twist index `r` that minimises `|γ_r|`
    /// gives `z` with `(T − shift·I)·z = γ_r·e_r`, one step of inverse iteration from the best
    /// unit vector. `None` unless its residual `|γ_r|/‖z‖` is within the growth criterion.
    fn twisted_vector(&self, shift: f64) -> Option<Vec<f64>> {
        let n = self.n();
        let mut top = vec![0.0; n];
        let mut bottom = vec![0.0; n];
        top[0] = self.pivot(self.d[0] - shift);
        bottom[n - 1] = self.pivot(self.d[n - 1] - shift);
        for i in 1..n {
            top[i] = self.pivot((self.d[i] - shift) - self.e2[i - 1] / top[i - 1]);
            let j = n - 1 - i;
            bottom[j] = self.pivot((self.d[j] - shift) - self.e2[j] / bottom[j + 1]);
        }
        let (mut r, mut gamma) = (0, f64::INFINITY);
        for i in 0..n {
            let g = top[i] + bottom[i] - (self.d[i] - shift);
            if g.abs() < gamma.abs() {
                (r, gamma) = (i, g);
            }
        }
        let mut z = vec![0.0; n];
        z[r] = 1.0;
        for i in (0..r).rev() {
            z[i] = -(self.e[i] / top[i]) * z[i + 1];
        }
        for i in r + 1..n {
            z[i] = -(self.e[i - 1] / bottom[i]) * z[i - 1];
        }
        let size = norm(&z);
        let residual = gamma.abs() / size;
        if !(size.is_finite() && residual <= GROWTH_RESIDUAL * n as f64 * f64::EPSILON) {
            return None;
        }
        scale(&mut z, 1.0 / size);
        Some(z)
    }

    /// The vectors of the eigenvalues `values[group]` (one cluster), column after column, by
    /// inverse iteration from a fixed pseudo-random start; each new vector is orthogonalised
    /// against the cluster's earlier ones at every step (modified Gram–Schmidt).
    fn cluster_vectors(&self, values: &[f64], group: Range<usize>) -> Option<Vec<f64>> {
        let n = self.n();
        // Shifts of one cluster are kept apart so that each factorization is of a different
        // matrix (`dstein`'s perturbation).
        let apart = 10.0 * f64::EPSILON;
        if group.len() == 1 {
            if let Some(z) = self.twisted_vector(values[group.start]) {
                return Some(z);
            }
        }
        let mut out: Vec<f64> = Vec::with_capacity(n * group.len());
        let mut previous = f64::INFINITY;
        for j in group {
            let shift = values[j].min(previous - apart);
            previous = shift;
            let lu = ShiftedLu::new(self, shift);
            let mut random = Gaussian::new(SUBSPACE.seed ^ j as u64);
            let mut x: Vec<f64> = (0..n).map(|_| random.uniform() - 0.5).collect();
            let start = norm(&x);
            scale(&mut x, 1.0 / start);
            let mut settled = 0;
            for _ in 0..MAX_STEPS {
                lu.solve(&mut x);
                for v in out.chunks_exact(n) {
                    let dot = x.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
                    x.iter_mut().zip(v).for_each(|(a, b)| *a -= dot * b);
                }
                let growth = norm(&x);
                if !(growth.is_finite() && growth > 0.0) {
                    return None;
                }
                scale(&mut x, 1.0 / growth);
                // `1/growth` bounds the residual `‖(T − shift)·x‖` of the unit vector.
                if growth * GROWTH_RESIDUAL * n as f64 * f64::EPSILON >= 1.0 {
                    settled += 1;
                    if settled > EXTRA_STEPS {
                        break;
                    }
                }
            }
            if settled == 0 {
                return None;
            }
            out.extend_from_slice(&x);
        }
        Some(out)
    }
}

/// What a probe of `T − x·I` tells.
#[derive(Clone, Copy)]
struct Probe {
    /// The number of eigenvalues below `x`.
    below: u32,
    /// `Σ 1/(x − λ)` and `Σ 1/(x − λ)²`.
    s1: f64,
    s2: f64,
}

impl Probe {
    /// Laguerre's step from `x` for the degree-`n` polynomial `det(T − x·I)`: with all its roots
    /// real it moves towards a root next to `x`, cubically once close, and is exact when the
    /// other roots coincide — so many far eigenvalues on one side (Newton's undoing at the edge
    /// of a spectrum, where `det′/det` is their sum) do not slow it.
    fn laguerre(&self, n: usize) -> f64 {
        let n = n as f64;
        let root = ((n - 1.0) * (n * self.s2 - self.s1 * self.s1))
            .max(0.0)
            .sqrt();
        let denominator = self.s1 + root.copysign(self.s1);
        n / denominator
    }
}

/// One wanted eigenvalue's search: an interval `[lo, hi)` holding it, the eigenvalue counts
/// below its ends, the next point to probe when not the midpoint, and the value once found.
struct Target {
    lo: f64,
    hi: f64,
    below: u32,
    above: u32,
    next: Option<f64>,
    value: Option<f64>,
}

impl Target {
    fn middle(&self) -> f64 {
        0.5 * (self.lo + self.hi)
    }

    /// Whether the interval holds no other eigenvalue.
    fn isolated(&self) -> bool {
        self.above - self.below == 1
    }

    /// Narrows the interval of eigenvalue `index` (ascending) with the count `below` at `x`.
    fn narrow(&mut self, x: f64, below: u32, index: u32) {
        if below <= index {
            (self.lo, self.below) = (x, below);
        } else {
            (self.hi, self.above) = (x, below);
        }
    }

    /// Takes Laguerre's `step` from `x`: as the value once it is below `tolerance` (the root
    /// may then sit on an end of the interval, which the step cannot cross), else as the next
    /// point when it stays inside the interval; otherwise the next point is the middle.
    fn step(&mut self, x: f64, step: f64, tolerance: f64) {
        let next = x - step;
        self.next = None;
        if !self.isolated() {
            return;
        }
        if step.abs() <= tolerance && next > self.lo - tolerance && next < self.hi + tolerance {
            self.value = Some(next.clamp(self.lo, self.hi));
        } else if next > self.lo && next < self.hi {
            self.next = Some(next);
        }
    }

    fn estimate(&self) -> f64 {
        self.value.unwrap_or(self.middle())
    }
}

/// Sweeps of probes allowed: halving alone reaches the tolerance in about 51.
const MAX_SWEEPS: usize = 128;

/// The residual accepted, in units of `n·ε‖T‖` (`dstein` accepts about `n^1.5·ε‖T‖`).
const GROWTH_RESIDUAL: f64 = 10.0;

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|a| a * a).sum::<f64>().sqrt()
}

fn scale(x: &mut [f64], by: f64) {
    x.iter_mut().for_each(|a| *a *= by);
}

/// `T − shift·I = P·L·U` by Gaussian elimination with partial pivoting (LAPACK's `dgttrf`),
/// a pivot below `ε‖T‖` raised to it so that an exact eigenvalue can still be a shift.
struct ShiftedLu {
    /// Reciprocals of `U`'s diagonal.
    inverse: Vec<f64>,
    /// `U`'s first and second superdiagonals.
    first: Vec<f64>,
    second: Vec<f64>,
    /// The multipliers of `L`, and whether rows `i` and `i + 1` were swapped.
    multiplier: Vec<f64>,
    swapped: Vec<bool>,
}

impl ShiftedLu {
    fn new(t: &Tridiagonal, shift: f64) -> Self {
        let n = t.n();
        let tiny = f64::EPSILON;
        let raise = |p: f64| {
            if p.abs() < tiny {
                tiny.copysign(p)
            } else {
                p
            }
        };
        let mut diagonal: Vec<f64> = t.d.iter().map(|d| d - shift).collect();
        let mut first = t.e.clone();
        let mut second = vec![0.0; n.saturating_sub(2)];
        let mut multiplier = vec![0.0; n - 1];
        let mut swapped = vec![false; n - 1];
        for i in 0..n - 1 {
            let below = t.e[i];
            if diagonal[i].abs() >= below.abs() {
                diagonal[i] = raise(diagonal[i]);
                let f = below / diagonal[i];
                multiplier[i] = f;
                diagonal[i + 1] -= f * first[i];
            } else {
                let f = diagonal[i] / below;
                multiplier[i] = f;
                swapped[i] = true;
                diagonal[i] = below;
                let above = first[i];
                first[i] = diagonal[i + 1];
                diagonal[i + 1] = above - f * diagonal[i + 1];
                if i + 2 < n {
                    second[i] = first[i + 1];
                    first[i + 1] *= -f;
                }
            }
        }
        diagonal[n - 1] = raise(diagonal[n - 1]);
        Self {
            inverse: diagonal.iter().map(|p| 1.0 / p).collect(),
            first,
            second,
            multiplier,
            swapped,
        }
    }

    /// `x ← (T − shift·I)⁻¹·x`.
    fn solve(&self, x: &mut [f64]) {
        let n = x.len();
        for i in 0..n - 1 {
            if self.swapped[i] {
                x.swap(i, i + 1);
            }
            x[i + 1] -= self.multiplier[i] * x[i];
        }
        x[n - 1] *= self.inverse[n - 1];
        if n > 1 {
            x[n - 2] = (x[n - 2] - self.first[n - 2] * x[n - 1]) * self.inverse[n - 2];
        }
        for i in (0..n.saturating_sub(2)).rev() {
            x[i] = (x[i] - self.first[i] * x[i + 1] - self.second[i] * x[i + 2]) * self.inverse[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The optimum from faer's dense solver: `‖T·V − V·Λ‖` small and `V` spanning the same
    /// space as its top-`k` eigenvectors wherever the `k`-th gap is real.
    fn check(d: &[f64], e: &[f64], k: usize) -> Option<()> {
        let n = d.len();
        let t = Mat::<f64>::from_fn(n, n, |i, j| {
            if i == j {
                d[i]
            } else if i == j + 1 {
                e[j]
            } else if j == i + 1 {
                e[i]
            } else {
                0.0
            }
        });
        let (v, values) = leading_eigenvectors(d, e, k)?;
        let evd = t.self_adjoint_eigen(faer::Side::Lower).unwrap();
        let lambda = evd.S().column_vector();
        let scale = (0..n)
            .map(|i| lambda[i].abs())
            .fold(0.0, f64::max)
            .max(1e-300);
        // Orthonormal, and the captured trace equals the top-k eigenvalue sum.
        let vtv = v.transpose() * &v;
        for j in 0..k {
            for i in 0..k {
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((vtv[(i, j)] - expected).abs() < 1e-9, "VᵀV at ({i},{j})");
            }
        }
        let captured: f64 = {
            let tv = &t * &v;
            (0..k)
                .map(|j| (0..n).map(|i| v[(i, j)] * tv[(i, j)]).sum::<f64>())
                .sum()
        };
        let optimum: f64 = (n - k..n).map(|i| lambda[i]).sum();
        for (j, value) in values.iter().enumerate() {
            let expected = lambda[n - 1 - j];
            assert!(
                (value - expected).abs() <= 1e-13 * scale,
                "eigenvalue {j}: {value} vs {expected}"
            );
        }
        assert!(
            (captured - optimum).abs() <= 1e-11 * scale * k as f64,
            "captured {captured} vs optimum {optimum} (n {n}, k {k})"
        );
        // Each column is an eigenvector of its eigenvalue, largest first.
        let tv = &t * &v;
        for j in 0..k {
            let residual = (0..n)
                .map(|i| (tv[(i, j)] - lambda[n - 1 - j] * v[(i, j)]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(residual <= 1e-9 * scale, "column {j}: residual {residual}");
        }
        Some(())
    }

    fn power_law(n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut g = Gaussian::new(seed);
        let d = (0..n)
            .map(|i| (i as f64 + 1.0).powf(-1.2) + 0.01 * g.uniform())
            .collect();
        let e = (0..n - 1).map(|_| 0.1 * g.uniform()).collect();
        (d, e)
    }

    #[test]
    fn random_matrices_match_the_dense_solver() {
        for (n, k) in [
            (1, 1),
            (2, 1),
            (2, 2),
            (3, 2),
            (17, 5),
            (100, 33),
            (300, 128),
            (300, 300),
        ] {
            let (d, e) = power_law(n, n as u64);
            check(&d, &e, k).unwrap_or_else(|| panic!("n {n}, k {k} fell back"));
        }
    }

    #[test]
    fn wilkinson_pairs_are_told_apart() {
        // W21+: its largest eigenvalues come in pairs that agree to about 1e-14 relative.
        let n = 21;
        let d: Vec<f64> = (0..n).map(|i| (10.0 - i as f64).abs()).collect();
        let e = vec![1.0; n - 1];
        check(&d, &e, 6).expect("a 2-vector cluster is orthogonalised");
    }

    #[test]
    fn split_matrices_and_repeated_eigenvalues() {
        // Zero off-diagonals: diagonal blocks, with 3.0 repeated in three of them.
        let d = [3.0, 1.0, 3.0, 2.0, 3.0, 0.5];
        let e = [0.0, 0.0, 0.0, 0.0, 0.0];
        check(&d, &e, 4).expect("a 3-vector cluster of exact repeats");
        // Glued blocks: nearly split, eigenvalues repeated to about 1e-12.
        let mut d = Vec::new();
        let mut e = Vec::new();
        for block in 0..4 {
            d.extend([2.0, 1.0, 0.5, 0.25]);
            e.extend([0.3, 0.2, 0.1]);
            if block < 3 {
                e.push(1e-12);
            }
        }
        check(&d, &e, 8).expect("glued copies");
    }

    #[test]
    fn large_clusters_and_zero_matrices_fall_back() {
        let n = 64;
        assert!(leading_eigenvectors(&vec![1.0; n], &vec![0.0; n - 1], 40).is_none());
        assert!(leading_eigenvectors(&vec![0.0; n], &vec![0.0; n - 1], 4).is_none());
        assert!(leading_eigenvectors(&[1.0, f64::NAN], &[0.0], 1).is_none());
    }

    #[test]
    #[should_panic(expected = "3 eigenpairs asked of a 2 × 2 matrix")]
    fn more_pairs_than_rows_is_a_bug_of_the_caller() {
        let _ = leading_eigenvectors(&[1.0, 2.0], &[0.0], 3);
    }

    #[test]
    #[should_panic(expected = "has 1 off-diagonal values, not 2")]
    fn a_mismatched_off_diagonal_is_a_bug_of_the_caller() {
        let _ = leading_eigenvectors(&[1.0, 2.0], &[0.0, 1.0], 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A random tridiagonal matrix: `n` in `1..=96`, entries uniform in `±scale`, and `k`.
        fn generic() -> impl Strategy<Value = (Vec<f64>, Vec<f64>, usize)> {
            (1usize..=96, -3i32..=3).prop_flat_map(|(n, exponent)| {
                let scale = 10f64.powi(exponent);
                (
                    proptest::collection::vec(-scale..scale, n),
                    proptest::collection::vec(-scale..scale, n - 1),
                    1..=n,
                )
            })
        }

        /// Degenerate ones: small integer entries (repeated eigenvalues) and zeros that split
        /// the matrix into blocks.
        fn degenerate() -> impl Strategy<Value = (Vec<f64>, Vec<f64>, usize)> {
            (1usize..=64).prop_flat_map(|n| {
                (
                    proptest::collection::vec((-2i8..=2).prop_map(f64::from), n),
                    proptest::collection::vec((-1i8..=1).prop_map(f64::from), n - 1),
                    1..=n,
                )
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// On generic matrices (clusters at 1e-9 of the norm are vanishingly rare) the
            /// solver never falls back, and agrees with faer's dense solver.
            #[test]
            fn generic_matrices_match_faer((d, e, k) in generic()) {
                prop_assert!(check(&d, &e, k).is_some(), "fell back on a generic matrix");
            }

            /// On degenerate ones it either agrees with faer or declines (and the caller then
            /// uses faer's divide and conquer); it never returns a wrong answer.
            #[test]
            fn degenerate_matrices_match_faer_or_fall_back((d, e, k) in degenerate()) {
                let _ = check(&d, &e, k);
            }
        }
    }

    #[test]
    fn results_are_bitwise_reproducible() {
        let (d, e) = power_law(400, 7);
        let (a, x) = leading_eigenvectors(&d, &e, 100).unwrap();
        let (b, y) = leading_eigenvectors(&d, &e, 100).unwrap();
        assert!((0..400).all(|i| (0..100).all(|j| a[(i, j)].to_bits() == b[(i, j)].to_bits())));
        assert!(x.iter().zip(&y).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
