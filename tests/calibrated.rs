//! Data-aware factorization on the real MiniLM layers and recorded inputs.

mod common;

use factorize_runtime::engine::calibrated::{fit_linear, nmse, Calibration, Fit};
use factorize_runtime::engine::{low_rank, WeightMatrix};
use factorize_runtime::weights::{read_matrices, read_tensors, NamedMatrix};
use factorize_runtime::{FactorizeError, Precision};

/// The exact optimum with a free bias, by an independent route: `C = X_cᵀX_c`, its symmetric
/// square root `S`, the singular values of `W·S`; the optimal squared error is their tail.
fn optimal_nmse(w: &NamedMatrix, bias: &[f64], x: &NamedMatrix, rank: usize) -> f64 {
    let (n, d, o) = (x.out_dim, x.in_dim, w.out_dim);
    let xm = faer::MatRef::from_row_major_slice(&x.data, n, d);
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| xm[(i, j)]).sum::<f64>() / n as f64)
        .collect();
    let xc = faer::Mat::<f64>::from_fn(n, d, |i, j| xm[(i, j)] - mean[j]);
    let c = xc.transpose() * &xc;
    let evd = c.self_adjoint_eigen(faer::Side::Lower).unwrap();
    let (u, s) = (evd.U(), evd.S().column_vector());
    let root = faer::Mat::<f64>::from_fn(d, d, |i, j| u[(i, j)] * s[j].max(0.0).sqrt());
    let sqrt_c = &root * u.transpose();
    let wm = faer::MatRef::from_row_major_slice(&w.data, o, d);
    let ws = wm * &sqrt_c;
    let mut sigma: Vec<f64> = ws.singular_values().unwrap();
    sigma.sort_by(|a, b| b.total_cmp(a));
    let tail: f64 = sigma[rank..].iter().map(|s| s * s).sum();
    // Population variance of all elements of X·Wᵀ + b.
    let y = xm * wm.transpose();
    let cells = (n * o) as f64;
    let mean_y = (0..n)
        .flat_map(|i| (0..o).map(move |k| (i, k)))
        .map(|(i, k)| y[(i, k)] + bias[k])
        .sum::<f64>()
        / cells;
    let var = (0..n)
        .flat_map(|i| (0..o).map(move |k| (i, k)))
        .map(|(i, k)| (y[(i, k)] + bias[k] - mean_y).powi(2))
        .sum::<f64>()
        / cells;
    tail / cells / var
}

#[test]
fn exact_fit_meets_the_optimum_and_beats_weight_svd_on_held_out_rows() {
    let Some(dir) = common::minilm_dir("calibrated MiniLM") else {
        return;
    };
    let weights = read_matrices(dir.join("weights.safetensors")).unwrap();
    let biases = read_tensors(dir.join("weights.safetensors"), 1).unwrap();
    let acts = read_tensors(dir.join("activations.safetensors"), 2).unwrap();
    let find = |name: String| acts.iter().find(|t| t.name == name).unwrap();
    let (mut exact_sum, mut als_sum, mut cases) = (0.0, 0.0, 0);
    for m in &weights {
        let layer = m.name.strip_suffix(".weight").unwrap();
        let bias = &biases
            .iter()
            .find(|b| b.name == format!("{layer}.bias"))
            .unwrap()
            .data;
        let (cal, held) = (
            find(format!("{layer}.input")),
            find(format!("{layer}.heldout")),
        );
        let w = WeightMatrix::new(layer, &m.data, m.out_dim, m.in_dim).unwrap();
        let xc = Calibration::new(layer, &cal.data, cal.out_dim, cal.in_dim).unwrap();
        let xh = Calibration::new(layer, &held.data, held.out_dim, held.in_dim).unwrap();
        for rank in [32, 64, 128] {
            // Ridge off: the calibration nmse is the exact optimum.
            let exact0 = fit_linear(&w, bias, &xc, rank, Fit::Exact { ridge: 0.0 }).unwrap();
            let optimum = optimal_nmse(m, bias, cal, rank);
            assert!(
                (exact0.nmse / optimum - 1.0).abs() <= 1e-6,
                "{layer} rank {rank}: calibration nmse {} vs optimum {optimum}",
                exact0.nmse
            );
            // The reported figure (from the input moments) is the one measured on the rows.
            let measured = nmse(&w, bias, &exact0.factors, &exact0.bias, &xc).unwrap();
            assert!(
                (measured / exact0.nmse - 1.0).abs() <= 1e-8,
                "{measured} vs {}",
                exact0.nmse
            );
            // Default ridge: below weight-space SVD on held-out rows, in every case.
            let exact = fit_linear(&w, bias, &xc, rank, Fit::exact()).unwrap();
            let held_exact = nmse(&w, bias, &exact.factors, &exact.bias, &xh).unwrap();
            let svd = low_rank(&w, rank, Precision::F64).unwrap();
            let held_svd = nmse(&w, bias, &svd, bias, &xh).unwrap();
            assert!(
                held_exact < held_svd,
                "{layer} rank {rank}: held-out {held_exact} vs svd {held_svd}"
            );
            let als = fit_linear(&w, bias, &xc, rank, Fit::als()).unwrap();
            als_sum += nmse(&w, bias, &als.factors, &als.bias, &xh).unwrap();
            exact_sum += held_exact;
            cases += 1;
        }
    }
    assert_eq!(cases, 36);
    assert!(
        exact_sum <= als_sum,
        "mean held-out nmse: exact {} vs ALS {}",
        exact_sum / 36.0,
        als_sum / 36.0
    );
}

#[test]
fn deterministic_bit_for_bit_and_bad_calibration_is_an_error() {
    let Some(dir) = common::minilm_dir("calibrated determinism") else {
        return;
    };
    let weights = read_matrices(dir.join("weights.safetensors")).unwrap();
    let acts = read_tensors(dir.join("activations.safetensors"), 2).unwrap();
    let m = weights
        .iter()
        .find(|m| m.name == "layer5.attn_out.weight")
        .unwrap();
    let x = acts
        .iter()
        .find(|t| t.name == "layer5.attn_out.input")
        .unwrap();
    let w = WeightMatrix::new("layer5.attn_out", &m.data, m.out_dim, m.in_dim).unwrap();
    let xc = Calibration::new("layer5.attn_out", &x.data, x.out_dim, x.in_dim).unwrap();
    let bias = vec![0.0; m.out_dim];
    let a = fit_linear(&w, &bias, &xc, 64, Fit::exact()).unwrap();
    let b = fit_linear(&w, &bias, &xc, 64, Fit::exact()).unwrap();
    assert_eq!(a, b);

    let mut bad = x.data.clone();
    bad[1000] = f64::NAN;
    let e = Calibration::new("layer5.attn_out", &bad, x.out_dim, x.in_dim).unwrap_err();
    assert!(
        matches!(
            e,
            FactorizeError::NonFinite {
                tensor: "calibration input",
                index: 1000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("layer5.attn_out"));
    let e = Calibration::new("layer5.attn_out", &[], 0, x.in_dim).unwrap_err();
    assert!(matches!(e, FactorizeError::Calibration { .. }), "{e}");
    let narrow = Calibration::new("x", &x.data[..x.out_dim * 2], x.out_dim, 2).unwrap();
    let e = fit_linear(&w, &bias, &narrow, 8, Fit::exact()).unwrap_err();
    assert!(
        matches!(
            e,
            FactorizeError::Shape {
                tensor: "calibration input",
                ..
            }
        ),
        "{e}"
    );
}

mod model_level {
    use dfdx::nn::modules::{Linear, ReLU};
    use dfdx::prelude::*;
    use factorize_runtime::engine::calibrated::{fit_linear, Calibration, Fit};
    use factorize_runtime::engine::WeightMatrix;
    use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
    use factorize_runtime::{mirror, Factorizable, FactorizeConfig, FactorizeError, Status};

    type Dev = Cpu;
    type Batch = Tensor<(usize, Const<128>), f32, Dev>;

    #[derive(Factorizable)]
    #[factorize(latent_features = 24, min_features = 64)]
    pub struct Two<E: Dtype, D: Device<E>> {
        pub a: Linear<128, 128, E, D>,
        pub act: ReLU,
        pub b: (Linear<128, 96, E, D>,),
        #[factorize(skip)]
        pub head: Linear<96, 8, E, D>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<128>), E, D>> for Two<E, D> {
        type Output = Tensor<(usize, Const<8>), E, D>;
        type Error = D::Err;
        fn try_forward(
            &self,
            x: Tensor<(usize, Const<128>), E, D>,
        ) -> Result<Self::Output, D::Err> {
            let h = self.act.try_forward(self.a.try_forward(x)?)?;
            self.head.try_forward(self.b.try_forward(h)?)
        }
    }

    fn setup() -> (Dev, Two<f32, Dev>, Batch) {
        let dev = Dev::seed_from_u64(1);
        let mut m = Two::<f32, Dev> {
            a: BuildModule::build(&dev),
            act: ReLU,
            b: BuildModule::build(&dev),
            head: BuildModule::build(&dev),
        };
        let wa: Vec<f32> = matrix_with_spectrum(128, 128, &power_law(128, 0.4), 3)
            .iter()
            .map(|x| *x as f32)
            .collect();
        let wb: Vec<f32> = matrix_with_spectrum(96, 128, &power_law(96, 0.4), 4)
            .iter()
            .map(|x| *x as f32)
            .collect();
        m.a.weight.copy_from(&wa);
        m.b.0.weight.copy_from(&wb);
        // Correlated inputs: a few strong directions, as real activations have.
        let mix: Vec<f32> = matrix_with_spectrum(128, 128, &power_law(128, 1.5), 5)
            .iter()
            .map(|x| *x as f32 * 20.0)
            .collect();
        let mix: Tensor<Rank2<128, 128>, f32, Dev> = dev.tensor(mix);
        let z: Tensor<(usize, Const<128>), f32, Dev> = dev.sample_normal_like(&(400, Const));
        (dev, m, z.matmul(mix))
    }

    #[test]
    fn each_layer_is_fitted_in_forward_order_to_the_inputs_it_sees() {
        let (_dev, model, x) = setup();
        let (f, report) = model
            .factorize_calibrated(
                &FactorizeConfig::default(),
                Fit::Exact { ridge: 0.0 },
                |m| {
                    m.forward(x.clone());
                },
            )
            .unwrap();
        let rows: Vec<(&str, Status, bool)> = report
            .layers
            .iter()
            .map(|r| (r.path.as_str(), r.status, r.nmse.is_some()))
            .collect();
        assert_eq!(
            rows,
            [
                ("a", Status::Replaced, true),
                ("b.0", Status::Replaced, true),
                ("head", Status::Skipped, false)
            ]
        );
        // Layer b was fitted to what the calibrated layer a (then ReLU) hands it.
        let h = f.act.forward(f.a.forward(x.clone()));
        let h: Vec<f64> = h.as_vec().iter().map(|v| *v as f64).collect();
        let w: Vec<f64> = model
            .b
            .0
            .weight
            .as_vec()
            .iter()
            .map(|v| *v as f64)
            .collect();
        let bias: Vec<f64> = model.b.0.bias.as_vec().iter().map(|v| *v as f64).collect();
        let wm = WeightMatrix::new("b.0", &w, 96, 128).unwrap();
        let xc = Calibration::new("b.0", &h, 400, 128).unwrap();
        let expected = fit_linear(&wm, &bias, &xc, 24, Fit::Exact { ridge: 0.0 }).unwrap();
        let first: Vec<f32> = expected.factors.first.iter().map(|v| *v as f32).collect();
        assert_eq!(f.b.0.first.weight.as_vec(), first);
        // And the model's output on the calibration batch is closer than weight-space SVD's.
        let plain = model.factorize(&FactorizeConfig::default()).unwrap();
        let y = model.forward(x.clone()).as_vec();
        let err = |z: Vec<f32>| {
            y.iter()
                .zip(&z)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum::<f64>()
        };
        let (e_cal, e_svd) = (
            err(f.forward(x.clone()).as_vec()),
            err(plain.forward(x.clone()).as_vec()),
        );
        assert!(
            e_cal < 0.5 * e_svd,
            "calibrated {e_cal} vs weight-space {e_svd}"
        );
    }

    #[test]
    fn held_out_nmse_is_reported_per_layer() {
        let (dev, model, x) = setup();
        let (mut f, mut report) = model
            .factorize_calibrated(&FactorizeConfig::default(), Fit::exact(), |m| {
                m.forward(x.clone());
            })
            .unwrap();
        let held: Batch = dev.sample_normal_like(&(100, Const));
        model
            .evaluate_heldout(&mut f, &mut report, |m| {
                m.forward(held.clone());
            })
            .unwrap();
        let with: Vec<&str> = report
            .layers
            .iter()
            .filter(|r| r.nmse_heldout.is_some())
            .map(|r| r.path.as_str())
            .collect();
        assert_eq!(with, ["a", "b.0"]);
        assert!(report.to_string().contains("held"));
        // Layer a's figure is the nmse of its outputs against the dense layer's on those rows.
        let y0: Vec<f64> = model
            .a
            .forward(held.clone())
            .as_vec()
            .iter()
            .map(|v| *v as f64)
            .collect();
        let y1: Vec<f64> =
            f.a.forward(held.clone())
                .as_vec()
                .iter()
                .map(|v| *v as f64)
                .collect();
        let n = y0.len() as f64;
        let mean = y0.iter().sum::<f64>() / n;
        let var = y0.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let err = y0
            .iter()
            .zip(&y1)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / n;
        let reported = report.layers[0].nmse_heldout.unwrap();
        assert!(
            (err / var / reported - 1.0).abs() < 1e-3,
            "{} vs {reported}",
            err / var
        );
    }

    #[test]
    fn bad_calibration_data_is_an_error_and_the_model_is_untouched() {
        let (dev, model, x) = setup();
        let mut v = x.as_vec();
        v[5] = f32::NAN;
        let bad: Tensor<(usize, Const<128>), f32, Dev> = dev.tensor_from_vec(v, (400, Const));
        let before = model.a.weight.as_vec();
        let e = model
            .factorize_calibrated(&FactorizeConfig::default(), Fit::exact(), |m| {
                m.forward(bad.clone());
            })
            .unwrap_err();
        assert!(
            matches!(e, FactorizeError::NonFinite { ref layer, .. } if layer == "a"),
            "{e}"
        );
        assert_eq!(model.a.weight.as_vec(), before);
    }

    #[test]
    fn an_empty_calibration_batch_is_an_error_not_a_panic() {
        let (dev, model, _) = setup();
        let empty: Batch = dev.zeros_like(&(0, Const));
        let e = model
            .factorize_calibrated(&FactorizeConfig::default(), Fit::exact(), |m| {
                m.forward(empty.clone());
            })
            .unwrap_err();
        assert!(
            matches!(e, FactorizeError::Calibration { ref layer, .. } if layer == "a"),
            "{e}"
        );
        let e =
            factorize_runtime::FactorizedLinear::<128, 24, 128, f32, Dev>::from_linear_calibrated(
                "a",
                &model.a,
                &empty,
                Fit::exact(),
            )
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("`a`"), "{e}");
    }
}

mod model_level_convolutions {
    use dfdx::nn::modules::ReLU;
    use dfdx::prelude::*;
    use factorize_runtime::conv::Conv2D;
    use factorize_runtime::engine::calibrated::Fit;
    use factorize_runtime::{mirror, Factorizable, FactorizeConfig, FactorizedConv2D};

    type Dev = Cpu;

    #[derive(Factorizable)]
    #[factorize(min_channels = 16, latent_channels = 4)]
    pub struct Convs<E: Dtype, D: Device<E>> {
        pub a: Conv2D<16, 16, 3, 1, 1, 1, E, D>,
        pub act: ReLU,
        pub b: Conv2D<16, 16, 3, 2, 1, 1, E, D>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<Rank4<4, 16, 8, 8>, E, D>> for Convs<E, D> {
        type Output = Tensor<(Const<4>, Const<16>, usize, usize), E, D>;
        type Error = D::Err;
        fn try_forward(&self, x: Tensor<Rank4<4, 16, 8, 8>, E, D>) -> Result<Self::Output, D::Err> {
            self.b
                .try_forward(self.act.try_forward(self.a.try_forward(x)?)?)
        }
    }

    #[test]
    fn convolutions_are_fitted_in_forward_order_too() {
        let dev = Dev::seed_from_u64(8);
        let model = Convs::<f64, Dev> {
            a: BuildModule::build(&dev),
            act: ReLU,
            b: BuildModule::build(&dev),
        };
        let x: Tensor<Rank4<4, 16, 8, 8>, f64, Dev> = dev.sample_normal();
        let (f, report) = model
            .factorize_calibrated(
                &FactorizeConfig::default(),
                Fit::Exact { ridge: 0.0 },
                |m| {
                    m.forward(x.clone());
                },
            )
            .unwrap();
        assert!(report.layers.iter().all(|r| r.nmse.is_some()), "{report}");
        // Layer b was fitted on what the refitted layer a (then ReLU) hands it.
        let h = f.act.forward(f.a.forward(x.clone()));
        let h: Tensor<Rank4<4, 16, 8, 8>, f64, Dev> =
            dev.tensor_from_vec(h.as_vec(), (Const, Const, Const, Const));
        let (expected, _) =
            FactorizedConv2D::<16, 4, 16, 3, 2, 1, 1, f64, Dev>::from_conv_calibrated(
                "b",
                &model.b,
                &h,
                Fit::Exact { ridge: 0.0 },
            )
            .unwrap();
        assert_eq!(f.b.first.weight.as_vec(), expected.first.weight.as_vec());
    }
}
