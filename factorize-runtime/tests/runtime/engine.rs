//! The engine's contract: the relative error of the factors equals the Eckart–Young optimum.

use factorize_runtime::engine::{low_rank, relative_error, WeightMatrix};
use factorize_runtime::synthetic::{matrix_with_spectrum, optimal_relative_error, power_law};
use factorize_runtime::{FactorizeError, Precision};

/// Checks one case: error measured independently from the returned factors, against the optimum.
/// Returns the subspace iterations used (0 for the dense path).
fn check(out_dim: usize, in_dim: usize, sigma: &[f64], rank: usize, precision: Precision) -> usize {
    let w = matrix_with_spectrum(out_dim, in_dim, sigma, 11);
    let m = WeightMatrix::new("case", &w, out_dim, in_dim).unwrap();
    let f = low_rank(&m, rank, precision).unwrap();
    assert_eq!(f.first.len(), rank * in_dim);
    assert_eq!(f.second.len(), out_dim * rank);
    let measured = relative_error(&m, &f.second, &f.first, rank);
    let optimum = optimal_relative_error(sigma, rank);
    let tol = match precision {
        Precision::F64 => 1e-4 * optimum + 1e-12,
        // f32 factors carry ~1e-7 relative rounding of their own.
        Precision::F32 => 1e-4 * optimum + 1e-6,
    };
    assert!(
        (measured - optimum).abs() <= tol,
        "{out_dim}x{in_dim} rank {rank} {precision:?}: error {measured} vs optimum {optimum}"
    );
    assert!(
        (f.relative_error - measured).abs() <= tol,
        "reported error is the real one"
    );
    // Singular values: nonincreasing, and the leading ones match the spectrum.
    for pair in f.singular_values.windows(2) {
        assert!(
            pair[0] >= pair[1] * (1.0 - 1e-6),
            "{:?}",
            &f.singular_values[..4]
        );
    }
    let scale = 1e-5 * sigma[0];
    assert!((f.singular_values[0] - sigma[0]).abs() < scale.max(1e-5));
    // The split is balanced: both factors of a direction have the same norm √σ.
    let col_norm = (0..out_dim)
        .map(|i| f.second[i * rank].powi(2))
        .sum::<f64>()
        .sqrt();
    let row_norm = (0..in_dim).map(|j| f.first[j].powi(2)).sum::<f64>().sqrt();
    assert!((col_norm - row_norm).abs() < 1e-4 * col_norm.max(1e-12));
    f.iterations
}

#[test]
fn optimal_on_known_spectra_dense_path() {
    for precision in [Precision::F64, Precision::F32] {
        // square, wide, tall; power law (trained-like), flat (Gaussian-like), exact low rank
        check(96, 96, &power_law(96, 0.7), 24, precision);
        check(64, 160, &power_law(64, 1.0), 16, precision);
        check(160, 64, &power_law(64, 0.4), 40, precision);
        check(80, 80, &vec![1.0; 80], 20, precision);
        check(50, 70, &[3.0, 2.0, 1.0], 3, precision);
        check(50, 70, &[3.0, 2.0, 1.0], 5, precision);
    }
}

#[test]
fn optimal_on_known_spectra_iterative_path() {
    // Rank 16 or 20 of a 600-wide Gram matrix takes the subspace iteration (up to 512 wide, the
    // dense path is always taken).
    for precision in [Precision::F64, Precision::F32] {
        let decaying: Vec<f64> = (0..600).map(|i| (1.0 - i as f64 / 600.0).sqrt()).collect();
        for iterations in [
            check(600, 1200, &power_law(600, 0.5), 16, precision),
            check(1280, 600, &power_law(600, 1.0), 16, precision),
            check(600, 600, &decaying, 20, precision),
        ] {
            assert!(iterations > 0, "took the dense path");
        }
    }
}

#[test]
fn iterative_path_is_used_and_stops_early() {
    let sigma = power_law(640, 1.0);
    let w = matrix_with_spectrum(640, 640, &sigma, 5);
    let m = WeightMatrix::new("it", &w, 640, 640).unwrap();
    let f = low_rank(&m, 16, Precision::F64).unwrap();
    assert!(
        f.iterations > 0 && f.iterations < 40,
        "iterations {}",
        f.iterations
    );
}

#[test]
fn special_matrices() {
    // zeros: zero factors, zero error, no NaN.
    let z = vec![0.0; 20 * 30];
    let m = WeightMatrix::new("zeros", &z, 20, 30).unwrap();
    let f = low_rank(&m, 4, Precision::F64).unwrap();
    assert_eq!(f.relative_error, 0.0);
    assert!(f.first.iter().chain(&f.second).all(|x| *x == 0.0));
    // ones: rank one, recovered exactly.
    let ones = vec![1.0; 20 * 30];
    let m = WeightMatrix::new("ones", &ones, 20, 30).unwrap();
    let f = low_rank(&m, 1, Precision::F64).unwrap();
    assert!(f.relative_error < 1e-12);
    assert!((f.singular_values[0] - (600.0f64).sqrt()).abs() < 1e-10);
    // identity: every rank-k truncation has error sqrt((n-k)/n). All eigenvalues coincide: up to
    // 32 wanted ones are orthogonalised as one cluster, more go to divide and conquer.
    let n = 48;
    let eye: Vec<f64> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    let m = WeightMatrix::new("eye", &eye, n, n).unwrap();
    for k in [4, 32, 40] {
        let f = low_rank(&m, k, Precision::F64).unwrap();
        let expected = ((n - k) as f64 / n as f64).sqrt();
        assert!((f.relative_error - expected).abs() < 1e-12, "rank {k}");
    }
    // full rank reproduces the matrix.
    let f = low_rank(&m, n, Precision::F64).unwrap();
    assert!(f.relative_error < 1e-12);
}

#[test]
fn deterministic_bit_for_bit() {
    let w = matrix_with_spectrum(300, 500, &power_law(300, 0.8), 2);
    let m = WeightMatrix::new("det", &w, 300, 500).unwrap();
    let a = low_rank(&m, 16, Precision::F32).unwrap();
    let b = low_rank(&m, 16, Precision::F32).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_input_is_an_error_naming_the_layer() {
    let mut w = vec![1.0; 12];
    w[7] = f64::NAN;
    let e = WeightMatrix::new("enc.fc1", &w, 3, 4).unwrap_err();
    assert!(matches!(e, FactorizeError::NonFinite { index: 7, .. }));
    assert!(e.to_string().contains("enc.fc1"), "{e}");
    w[7] = f64::INFINITY;
    assert!(WeightMatrix::new("x", &w, 3, 4).is_err());

    let w = vec![1.0; 12];
    let e = WeightMatrix::new("fc", &w, 5, 4).unwrap_err();
    assert!(
        matches!(
            e,
            FactorizeError::Shape {
                expected: 20,
                actual: 12,
                ..
            }
        ),
        "{e}"
    );

    let m = WeightMatrix::new("fc", &w, 3, 4).unwrap();
    for rank in [0, 4] {
        let e = low_rank(&m, rank, Precision::F64).unwrap_err();
        assert!(matches!(e, FactorizeError::Rank { max: 3, .. }), "{e}");
        assert!(e.to_string().contains("`fc`"));
    }
}

#[test]
fn the_first_non_finite_value_is_named_in_long_weights() {
    // The scan works chunk by chunk (4096 values), and on all threads from 2^20 values: values
    // on both sides of a chunk border, a later bad value that another thread may see first,
    // and extreme but finite values (which must not be mistaken for overflow) exercise it.
    for (rows, cols) in [(50, 100), (64, 40_000)] {
        let mut w = vec![f64::MAX; rows * cols];
        w[0] = -0.0;
        w[1] = f64::MIN_POSITIVE / 2.0;
        w[2] = f64::MIN;
        assert!(WeightMatrix::new("big", &w, rows, cols).is_ok());
        let last = w.len() - 1;
        for (bad, value) in [
            (1023, f64::NAN),
            (4095, f64::NAN),
            (4096, f64::NEG_INFINITY),
            (last / 2, f64::INFINITY),
            (last, f64::INFINITY),
        ] {
            let mut v = w.clone();
            v[bad] = value;
            for later in [bad + 1, bad + 3000, bad + last / 3] {
                if later <= last {
                    v[later] = f64::NAN;
                }
            }
            let e = WeightMatrix::new("big", &v, rows, cols).unwrap_err();
            assert!(
                matches!(e, FactorizeError::NonFinite { index, .. } if index == bad),
                "{rows}x{cols}, {bad}: {e}"
            );
        }
    }
}
