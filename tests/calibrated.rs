//! Data-aware factorization of whole models: every replaced layer fitted in forward order.

mod model_level {
    use dfdx::nn::modules::{Linear, ReLU};
    use dfdx::prelude::*;
    use factorize_runtime::engine::calibrated::{fit_linear, Calibration};
    use factorize_runtime::engine::WeightMatrix;
    use factorize_runtime::sensitivity::{
        damage, Cost, Grouping, RankGrid, Sensitivity, SensitivityParams, Truncation,
    };
    use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
    use factorize_runtime::Fit;
    use factorize_runtime::{mirror, Factorizable, FactorizeConfig, FactorizeError, Status};

    type Dev = Cpu;
    type Batch = Tensor<(usize, Const<128>), f32, Dev>;

    #[derive(Factorizable, Clone)]
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
        let err = |z: Vec<f32>| damage::mse(&y, &z);
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
    fn a_correcting_fit_targets_the_dense_model_and_beats_the_exact_fit() {
        let (_dev, model, x) = setup();
        let cfg = FactorizeConfig::default();
        let fit = Fit::Correcting { ridge: 0.0 };
        let (f, _) = model
            .factorize_calibrated(&cfg, fit, |m| {
                m.forward(x.clone());
            })
            .unwrap();
        // Layer b was fitted from what the calibrated layer a hands it to what the dense
        // model's layer b computes from what the dense layer a hands it.
        let host = |t: Tensor<(usize, Const<128>), f32, Dev>| -> Vec<f64> {
            t.as_vec().iter().map(|v| *v as f64).collect()
        };
        let seen = host(f.act.forward(f.a.forward(x.clone())));
        let reference = host(model.act.forward(model.a.forward(x.clone())));
        let to_f64 = |v: Vec<f32>| -> Vec<f64> { v.iter().map(|v| *v as f64).collect() };
        let (w, bias) = (
            to_f64(model.b.0.weight.as_vec()),
            to_f64(model.b.0.bias.as_vec()),
        );
        let wm = WeightMatrix::new("b.0", &w, 96, 128).unwrap();
        let xc = Calibration::new("b.0", &seen, 400, 128)
            .unwrap()
            .with_reference("b.0", &reference)
            .unwrap();
        let expected = fit_linear(&wm, &bias, &xc, 24, fit).unwrap();
        let first: Vec<f32> = expected.factors.first.iter().map(|v| *v as f32).collect();
        assert_eq!(f.b.0.first.weight.as_vec(), first);
        // At the model's output it is closer to the dense model than the exact fit.
        let exact = model
            .factorize_calibrated(&cfg, Fit::Exact { ridge: 0.0 }, |m| {
                m.forward(x.clone());
            })
            .unwrap()
            .0;
        let y = model.forward(x.clone()).as_vec();
        let err = |z: Vec<f32>| damage::mse(&y, &z);
        let (e_cor, e_exact) = (
            err(f.forward(x.clone()).as_vec()),
            err(exact.forward(x.clone()).as_vec()),
        );
        assert!(e_cor < e_exact, "correcting {e_cor} vs exact {e_exact}");
    }

    /// `w` (row-major `[out, in]`) truncated to rank `r` by faer's full SVD.
    fn truncated(w: &[f32], out: usize, inp: usize, r: usize) -> Vec<f32> {
        let m = faer::Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
        let svd = m.thin_svd().unwrap();
        let (u, v) = (svd.U().subcols(0, r), svd.V().subcols(0, r));
        let s = faer::Mat::<f64>::from_fn(r, r, |i, j| if i == j { svd.S()[i] } else { 0.0 });
        let t = u * s * v.transpose();
        (0..out * inp)
            .map(|k| t[(k / inp, k % inp)] as f32)
            .collect()
    }

    /// `model`'s sensitivity on `x`, by MSE, at a quarter and half of each layer's saving
    /// ranks (multiples of 8); the damage closure checks that its reference is the dense output.
    fn measure(
        model: &Two<f32, Dev>,
        x: &Batch,
        truncation: Truncation,
        grouping: Grouping,
    ) -> Sensitivity {
        let params = SensitivityParams {
            grid: RankGrid::Fractions {
                fractions: vec![0.25, 0.5],
                multiple: 8,
            },
            truncation,
            grouping,
        };
        let y = model.forward(x.clone()).as_vec();
        model
            .sensitivity(
                &params,
                &quiet(),
                |m| m.forward(x.clone()).as_vec(),
                |reference: &Vec<f32>, out: &Vec<f32>| {
                    assert_eq!(reference, &y);
                    damage::mse(reference, out)
                },
            )
            .unwrap()
    }

    fn quiet() -> FactorizeConfig {
        FactorizeConfig {
            progress: false,
            ..Default::default()
        }
    }

    /// The damage of the dense model with the weights `which` (0: `a`, 1: `b.0`) truncated to
    /// `rank` by a full SVD.
    fn truncated_at(model: &Two<f32, Dev>, x: &Batch, which: &[usize], rank: usize) -> f64 {
        let mut cut = model.clone();
        if which.contains(&0) {
            cut.a
                .weight
                .copy_from(&truncated(&model.a.weight.as_vec(), 128, 128, rank));
        }
        if which.contains(&1) {
            cut.b
                .0
                .weight
                .copy_from(&truncated(&model.b.0.weight.as_vec(), 96, 128, rank));
        }
        let y = model.forward(x.clone()).as_vec();
        damage::mse(&y, &cut.forward(x.clone()).as_vec())
    }

    #[test]
    fn sensitivity_is_the_output_damage_of_each_layer_truncated_alone() {
        let (_dev, model, x) = setup();
        let weight = measure(&model, &x, Truncation::Weight, Grouping::Layers);
        let shapes: Vec<(&str, &[usize], usize)> = (weight.groups.iter())
            .map(|g| (g.name.as_str(), g.ranks.as_slice(), g.layers[0].positions))
            .collect();
        assert_eq!(
            shapes,
            [("a", &[16, 32][..], 400), ("b.0", &[16, 24][..], 400)]
        );
        // Each figure is the damage of the dense model with that one weight truncated.
        for (l, group) in weight.groups.iter().enumerate() {
            for (&rank, &measured) in group.ranks.iter().zip(&group.damage) {
                let expected = truncated_at(&model, &x, &[l], rank);
                assert!(
                    (measured / expected - 1.0).abs() < 1e-3,
                    "{} rank {rank}: {measured} vs {expected}",
                    group.name
                );
            }
            // A higher rank damages less.
            assert!(group.damage[1] < group.damage[0], "{group:?}");
        }
    }

    #[test]
    fn a_group_is_truncated_together_at_ranks_that_save_on_all_its_layers() {
        let (_dev, model, x) = setup();
        let both = measure(
            &model,
            &x,
            Truncation::Weight,
            Grouping::By(|_| "both".into()),
        );
        let [group] = &both.groups[..] else {
            panic!("{both:?}")
        };
        let paths: Vec<_> = both.layers().map(|l| l.path.as_str()).collect();
        assert_eq!(
            (group.name.as_str(), &paths[..]),
            ("both", &["a", "b.0"][..])
        );
        // A quarter and a half of the summed cost, (128² + 96·128) / (256 + 224) · f = 14.9 and
        // 29.9, to multiples of 8.
        assert_eq!(group.ranks, [16, 32]);
        for (&rank, &measured) in group.ranks.iter().zip(&group.damage) {
            let expected = truncated_at(&model, &x, &[0, 1], rank);
            assert!(
                (measured / expected - 1.0).abs() < 1e-3,
                "both at rank {rank}: {measured} vs {expected}"
            );
        }
    }

    #[test]
    fn data_aware_truncations_damage_less_and_are_deterministic() {
        let (_dev, model, x) = setup();
        let weight = measure(&model, &x, Truncation::Weight, Grouping::Layers);
        let data = measure(&model, &x, Truncation::default(), Grouping::Layers);
        for (d, w) in data.groups.iter().zip(&weight.groups) {
            assert!(
                d.damage.iter().zip(&w.damage).all(|(d, w)| d < w),
                "{d:?} vs {w:?}"
            );
        }
        assert_eq!(
            data,
            measure(&model, &x, Truncation::default(), Grouping::Layers)
        );
    }

    #[test]
    fn sequential_fits_match_prefix_truncation_alone_and_simulation_in_groups() {
        let (_dev, model, x) = setup();
        let exact = Fit::Exact {
            ridge: Fit::DEFAULT_RIDGE,
        };
        // Fitted afresh per rank, a layer alone loses what its prefix truncation does...
        let data = measure(&model, &x, Truncation::default(), Grouping::Layers);
        let sequential = measure(&model, &x, Truncation::Sequential(exact), Grouping::Layers);
        for (s, d) in sequential.groups.iter().zip(&data.groups) {
            assert_eq!((&s.ranks, &s.layers), (&d.ranks, &d.layers));
            for (a, b) in s.damage.iter().zip(&d.damage) {
                assert!((a / b - 1.0).abs() < 1e-4, "{s:?} vs {d:?}");
            }
        }
        // ...and a group loses what `simulate` gives its plan: both layers at the rank, `b.0`
        // fitted on what the fitted `a` hands it.
        let both = measure(
            &model,
            &x,
            Truncation::Sequential(exact),
            Grouping::By(|_| "both".into()),
        );
        let run = |m: &<Two<f32, Dev> as Factorizable>::Factorized| {
            m.forward(x.clone());
        };
        let y = model.forward(x.clone()).as_vec();
        for (&rank, &measured) in both.groups[0].ranks.iter().zip(&both.groups[0].damage) {
            let plan = both.uniform(rank, Cost::Macs).unwrap();
            let simulated = model.simulate(&plan, Some(exact), &quiet(), run).unwrap();
            let expected = damage::mse(&y, &simulated.run(|m| m.forward(x.clone()).as_vec()));
            assert!(
                (measured / expected - 1.0).abs() < 1e-6,
                "rank {rank}: {measured} vs {expected}"
            );
        }
    }

    #[test]
    fn a_simulated_plan_computes_what_the_compiled_variant_does() {
        let (_dev, model, x) = setup();
        let cfg = quiet();
        let sensitivity = model
            .sensitivity(
                &SensitivityParams {
                    grid: RankGrid::Multiples { multiple: 8 },
                    truncation: Truncation::Weight,
                    ..Default::default()
                },
                &cfg,
                |m| m.forward(x.clone()).as_vec(),
                |a: &Vec<f32>, b: &Vec<f32>| damage::mse(a, b),
            )
            .unwrap();
        // The variant's rank, 24, on every layer.
        let plan = sensitivity.uniform(24, Cost::Macs).unwrap();
        assert_eq!(
            plan.layers,
            [("a".into(), Some(24)), ("b.0".into(), Some(24))]
        );
        let run = |m: &<Two<f32, Dev> as Factorizable>::Factorized| {
            m.forward(x.clone());
        };
        let close = |a: Vec<f32>, b: Vec<f32>| {
            let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            let gap = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            gap <= 1e-3 * scale
        };
        let compiled = model.factorize(&cfg).unwrap();
        let simulated = model.simulate(&plan, None, &cfg, run).unwrap();
        assert!(close(
            compiled.forward(x.clone()).as_vec(),
            simulated.run(|m| m.forward(x.clone()).as_vec())
        ));
        for fit in [Fit::Exact { ridge: 0.0 }, Fit::correcting()] {
            let (compiled, _) = model.factorize_calibrated(&cfg, fit, run).unwrap();
            let simulated = model.simulate(&plan, Some(fit), &cfg, run).unwrap();
            assert!(
                close(
                    compiled.forward(x.clone()).as_vec(),
                    simulated.run(|m| m.forward(x.clone()).as_vec())
                ),
                "{fit:?}"
            );
        }
        // A budget plan at the same cost loses no more, by the measured damages.
        let budgeted = sensitivity.plan(Cost::Macs, plan.cost).unwrap();
        assert!(budgeted.cost <= plan.cost && budgeted.damage <= plan.damage);
        // A plan naming a layer the variant keeps is an error naming it.
        let mut wrong = plan.clone();
        wrong.layers[1].0 = "head".into();
        let err = model.simulate(&wrong, None, &cfg, run).unwrap_err();
        assert!(err.to_string().contains("head"), "{err}");
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
                &FactorizeConfig::default(),
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
    use factorize_runtime::Fit;
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
                &FactorizeConfig::default(),
            )
            .unwrap();
        assert_eq!(f.b.first.weight.as_vec(), expected.first.weight.as_vec());

        // The correcting fit runs the variant as the dense model through convolutions too, and
        // lands closer to the dense model's output.
        let (c, _) = model
            .factorize_calibrated(&FactorizeConfig::default(), Fit::correcting(), |m| {
                m.forward(x.clone());
            })
            .unwrap();
        let y = model.forward(x.clone()).as_vec();
        let err = |z: Vec<f64>| y.iter().zip(&z).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        let (e_cor, e_exact) = (
            err(c.forward(x.clone()).as_vec()),
            err(f.forward(x.clone()).as_vec()),
        );
        assert!(e_cor < e_exact, "correcting {e_cor} vs exact {e_exact}");
    }
}
