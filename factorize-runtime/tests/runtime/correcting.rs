//! The correcting fit (`Fit::Correcting`): the exact optimum of the error against the dense
//! model's outputs, from the inputs the layer sees, checked against an independent solution.

use factorize_runtime::engine::calibrated::{fit_linear, CalibratedFit, Calibration};
use factorize_runtime::engine::WeightMatrix;
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::{FactorizeError, Fit};
use faer::linalg::solvers::SolveLstsq;
use faer::{Mat, MatRef};

const OUT: usize = 24;
const IN: usize = 32;
const ROWS: usize = 200;

/// A weight, a bias, reference inputs `D` with a few strong directions and a non-zero mean,
/// and the inputs `F` the layer sees: `D` disturbed by a fixed upstream error.
fn problem() -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let w = matrix_with_spectrum(OUT, IN, &power_law(OUT, 0.5), 1);
    let bias: Vec<f64> = (0..OUT).map(|o| 0.1 * o as f64 - 1.0).collect();
    let mix = matrix_with_spectrum(IN, IN, &power_law(IN, 1.0), 2);
    let mix = MatRef::from_row_major_slice(&mix, IN, IN);
    let z = matrix_with_spectrum(ROWS, IN, &vec![(ROWS as f64).sqrt(); IN], 3);
    let d = MatRef::from_row_major_slice(&z, ROWS, IN) * mix * 10.0;
    let error = matrix_with_spectrum(IN, IN, &power_law(IN, 0.2), 4);
    let error = MatRef::from_row_major_slice(&error, IN, IN);
    let f = &d + &d * error * 0.3;
    let rows = |m: &Mat<f64>, shift: f64| -> Vec<f64> {
        (0..ROWS)
            .flat_map(|i| (0..IN).map(move |j| (i, j)))
            .map(|(i, j)| m[(i, j)] + shift * (j % 3) as f64)
            .collect()
    };
    (w, bias, rows(&f, 0.7), rows(&d, 0.5))
}

/// `rows × cols` row-major data, centred by column.
fn centred(data: &[f64], cols: usize) -> Mat<f64> {
    let rows = data.len() / cols;
    let m = MatRef::from_row_major_slice(data, rows, cols);
    let mean: Vec<f64> = (0..cols)
        .map(|j| (0..rows).map(|i| m[(i, j)]).sum::<f64>() / rows as f64)
        .collect();
    Mat::from_fn(rows, cols, |i, j| m[(i, j)] - mean[j])
}

/// `‖D·Wᵀ − F·Mᵀ‖² + ρ‖M − W‖²` on centred rows.
fn objective(w: MatRef<'_, f64>, m: MatRef<'_, f64>, f: &Mat<f64>, d: &Mat<f64>, rho: f64) -> f64 {
    let r = d * w.transpose() - f * m.transpose();
    r.squared_norm_l2() + rho * (m - w).squared_norm_l2()
}

/// The independent optimum: least squares on rows augmented by `√ρ·I` (targets `√ρ·Wᵀ`), then
/// the fitted values' leading right singular vectors (reduced-rank regression).
fn optimum(w: MatRef<'_, f64>, f: &Mat<f64>, d: &Mat<f64>, rho: f64, rank: usize) -> Mat<f64> {
    let s = rho.sqrt();
    let x = Mat::<f64>::from_fn(ROWS + IN, IN, |i, j| {
        if i < ROWS {
            f[(i, j)]
        } else {
            s * f64::from(u8::from(i - ROWS == j))
        }
    });
    let target = d * w.transpose();
    let y = Mat::<f64>::from_fn(ROWS + IN, OUT, |i, o| {
        if i < ROWS {
            target[(i, o)]
        } else {
            s * w[(o, i - ROWS)]
        }
    });
    let mt = x.qr().solve_lstsq(&y);
    let fitted = &x * &mt;
    let svd = fitted.thin_svd().unwrap();
    let v = svd.V().subcols(0, rank);
    (&mt * v * v.transpose()).transpose().to_owned()
}

fn product(fit: &CalibratedFit) -> Mat<f64> {
    let k = fit.factors.rank;
    let a = MatRef::from_row_major_slice(&fit.factors.first, k, IN);
    let b = MatRef::from_row_major_slice(&fit.factors.second, OUT, k);
    b * a
}

#[test]
fn the_correcting_fit_is_the_reduced_rank_regression_optimum() {
    let (w, bias, seen, reference) = problem();
    let wm = WeightMatrix::new("fc", &w, OUT, IN).unwrap();
    let x = Calibration::new("fc", &seen, ROWS, IN)
        .unwrap()
        .with_reference("fc", &reference)
        .unwrap();
    let (f, d) = (centred(&seen, IN), centred(&reference, IN));
    let w_ref = MatRef::from_row_major_slice(&w, OUT, IN);
    let scale = (0..IN).map(|j| f.col(j).squared_norm_l2()).sum::<f64>() / IN as f64;
    for (ridge, rank) in [(0.0, 4), (0.0, 12), (0.05, 8), (1.0, 8)] {
        let fit = fit_linear(&wm, &bias, &x, rank, Fit::Correcting { ridge }).unwrap();
        let rho = ridge * scale;
        assert!((fit.ridge - rho).abs() <= 1e-9 * rho.max(1.0));
        let ours = objective(w_ref, product(&fit).as_ref(), &f, &d, rho);
        let best = objective(
            w_ref,
            optimum(w_ref, &f, &d, rho, rank).as_ref(),
            &f,
            &d,
            rho,
        );
        assert!(
            (ours / best - 1.0).abs() <= 1e-8,
            "ridge {ridge} rank {rank}: objective {ours} vs optimum {best}"
        );
        // The plain exact fit, blind to the upstream error, does worse.
        let exact = fit_linear(&wm, &bias, &x, rank, Fit::Exact { ridge }).unwrap();
        let blind = objective(w_ref, product(&exact).as_ref(), &f, &d, rho);
        assert!(ours < 0.99 * blind, "{ours} vs exact fit {blind}");

        // The bias takes the mean residual, and the nmse is the one measured on the rows.
        let ba = product(&fit);
        let (raw_f, raw_d) = (
            MatRef::from_row_major_slice(&seen, ROWS, IN),
            MatRef::from_row_major_slice(&reference, ROWS, IN),
        );
        let target = raw_d * w_ref.transpose();
        let approx = raw_f * ba.transpose();
        let (mut sum, mut err, mut mean_residual) = (0.0, 0.0, vec![0.0; OUT]);
        for i in 0..ROWS {
            for o in 0..OUT {
                let (t, a) = (target[(i, o)] + bias[o], approx[(i, o)] + fit.bias[o]);
                sum += t;
                err += (t - a).powi(2);
                mean_residual[o] += (t - a) / ROWS as f64;
            }
        }
        let cells = (ROWS * OUT) as f64;
        let mean = sum / cells;
        let var = (0..ROWS)
            .flat_map(|i| (0..OUT).map(move |o| (i, o)))
            .map(|(i, o)| (target[(i, o)] + bias[o] - mean).powi(2))
            .sum::<f64>()
            / cells;
        assert!(
            mean_residual.iter().all(|r| r.abs() < 1e-9),
            "{mean_residual:?}"
        );
        let measured = err / cells / var;
        assert!(
            (fit.nmse / measured - 1.0).abs() <= 1e-8,
            "reported {} vs measured {measured}",
            fit.nmse
        );
    }
}

#[test]
fn without_upstream_error_it_is_the_exact_fit() {
    let (w, bias, seen, _) = problem();
    let wm = WeightMatrix::new("fc", &w, OUT, IN).unwrap();
    let plain = Calibration::new("fc", &seen, ROWS, IN).unwrap();
    let paired = plain.with_reference("fc", &seen).unwrap();
    for x in [plain, paired] {
        let ours = fit_linear(&wm, &bias, &x, 8, Fit::correcting()).unwrap();
        let exact = fit_linear(&wm, &bias, &x, 8, Fit::exact()).unwrap();
        let gap = (product(&ours) - product(&exact)).norm_l2() / product(&exact).norm_l2();
        assert!(gap < 1e-9, "{gap}");
        assert!((ours.nmse / exact.nmse - 1.0).abs() < 1e-8);
        assert!(ours
            .bias
            .iter()
            .zip(&exact.bias)
            .all(|(a, b)| (a - b).abs() < 1e-9));
    }
}

#[test]
fn a_bad_reference_is_an_error_naming_the_layer() {
    let (_, _, seen, reference) = problem();
    let x = Calibration::new("enc.fc", &seen, ROWS, IN).unwrap();
    let short = x.with_reference("enc.fc", &reference[..IN]).unwrap_err();
    assert!(matches!(
        short,
        FactorizeError::Shape {
            ref layer,
            tensor: "reference input",
            ..
        } if layer == "enc.fc"
    ));
    let mut bad = reference.clone();
    bad[5] = f64::NAN;
    let nan = x.with_reference("enc.fc", &bad).unwrap_err();
    assert!(nan.to_string().contains("enc.fc"), "{nan}");
    // A singular C_ff without a ridge is an error, not a panic.
    let few = Calibration::new("enc.fc", &seen[..10 * IN], 10, IN)
        .unwrap()
        .with_reference("enc.fc", &reference[..10 * IN])
        .unwrap();
    let w = matrix_with_spectrum(OUT, IN, &power_law(OUT, 0.5), 1);
    let wm = WeightMatrix::new("enc.fc", &w, OUT, IN).unwrap();
    let err = fit_linear(&wm, &[0.0; OUT], &few, 4, Fit::Correcting { ridge: 0.0 }).unwrap_err();
    assert!(
        err.to_string().contains("enc.fc") && err.to_string().contains("ridge"),
        "{err}"
    );
    assert!(fit_linear(&wm, &[0.0; OUT], &few, 4, Fit::correcting()).is_ok());
}
