//! FactorizedLinear as a dfdx module, and its construction from a dense Linear.

use dfdx::nn::modules::Linear;
use dfdx::optim::{Sgd, SgdConfig};
use dfdx::prelude::*;
use factorize_runtime::synthetic::{matrix_with_spectrum, optimal_relative_error, power_law};
use factorize_runtime::{
    builders, Backend, FactorizeConfig, FactorizeError, FactorizedLinear, Method, Status,
};

type Dev = Cpu;

fn dense_with_spectrum<const I: usize, const O: usize>(
    dev: &Dev,
    sigma: &[f64],
) -> Linear<I, O, f32, Dev> {
    let mut l = dev.build_module::<dfdx::nn::builders::Linear<I, O>, f32>();
    let w: Vec<f32> = matrix_with_spectrum(O, I, sigma, 9)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    l.weight.copy_from(&w);
    l
}

fn frob(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn accepts_every_input_linear_accepts() {
    let dev: Dev = Default::default();
    let m = dev.build_module::<dfdx::nn::builders::Linear<6, 4>, f32>();
    let f: FactorizedLinear<6, 2, 4, f32, Dev> =
        FactorizedLinear::from_linear(&m, &FactorizeConfig::default()).unwrap();
    let _: Tensor<Rank1<4>, f32, Dev> = f.forward(dev.zeros::<Rank1<6>>());
    let _: Tensor<Rank2<3, 4>, f32, Dev> = f.forward(dev.zeros::<Rank2<3, 6>>());
    let _: Tensor<(usize, Const<4>), f32, Dev> = f.forward(dev.zeros_like(&(5, Const::<6>)));
    let _: Tensor<Rank3<2, 3, 4>, f32, Dev> = f.forward(dev.zeros::<Rank3<2, 3, 6>>());
    let _: Tensor<(usize, usize, Const<4>), f32, Dev> =
        f.forward(dev.zeros_like(&(2, 7, Const::<6>)));
    // With a tape, and through forward_mut.
    let mut f = f;
    let _: Tensor<Rank2<3, 4>, f32, Dev, OwnedTape<f32, Dev>> =
        f.forward_mut(dev.zeros::<Rank2<3, 6>>().traced(f.alloc_grads()));
}

#[test]
fn exact_when_the_weight_has_rank_at_most_latent() {
    let dev: Dev = Default::default();
    let dense = dense_with_spectrum::<40, 30>(&dev, &[2.0, 1.0, 0.5]);
    let f: FactorizedLinear<40, 3, 30, f32, Dev> =
        FactorizedLinear::from_linear(&dense, &FactorizeConfig::default()).unwrap();
    let x: Tensor<Rank2<8, 40>, f32, Dev> = dev.sample_normal();
    let y0 = dense.forward(x.clone()).as_vec();
    let y1 = f.forward(x).as_vec();
    let norm = frob(&y0, &vec![0.0; y0.len()]);
    assert!(frob(&y0, &y1) <= 1e-5 * norm, "{}", frob(&y0, &y1) / norm);
}

#[test]
fn weights_are_the_truncated_svd_and_the_bias_moves_to_the_second_map() {
    let dev: Dev = Default::default();
    let sigma = power_law(48, 0.6);
    let dense = dense_with_spectrum::<64, 48>(&dev, &sigma);
    let (f, row) = FactorizedLinear::<64, 12, 48, f32, Dev>::from_linear_with_report(
        "block.fc",
        &dense,
        &FactorizeConfig::default(),
    )
    .unwrap();
    assert_eq!(f.second.bias.as_vec(), dense.bias.as_vec());
    // Error of the product of the stored f32 weights, in f64, against the optimum.
    let a = f.first.weight.as_vec(); // [12, 64]
    let b = f.second.weight.as_vec(); // [48, 12]
    let w = dense.weight.as_vec();
    let mut err = 0.0f64;
    for o in 0..48 {
        for i in 0..64 {
            let p: f64 = (0..12)
                .map(|k| b[o * 12 + k] as f64 * a[k * 64 + i] as f64)
                .sum();
            err += (w[o * 64 + i] as f64 - p).powi(2);
        }
    }
    let norm = frob(&w, &vec![0.0; w.len()]);
    let measured = err.sqrt() / norm;
    let optimum = optimal_relative_error(&sigma, 12);
    assert!(
        (measured / optimum - 1.0).abs() < 1e-4,
        "{measured} vs {optimum}"
    );
    // The report row.
    assert_eq!(row.path, "block.fc");
    assert_eq!(row.status, Status::Replaced);
    assert_eq!((row.latent, row.in_dim, row.out_dim), (12, 64, 48));
    assert_eq!((row.macs_before, row.macs_after), (64 * 48, 12 * (64 + 48)));
    assert_eq!(
        (row.params_before, row.params_after),
        (64 * 48 + 48, 12 * 112 + 48)
    );
    assert!((row.relative_error.unwrap() / optimum - 1.0).abs() < 1e-4);
    let expected = if factorize_runtime::engine::gpu_available().is_ok() {
        Backend::Cuda
    } else {
        Backend::Cpu
    };
    assert_eq!(row.backend, Some(expected));
    // The source is untouched.
    assert_eq!(dense.weight.as_vec(), w);
}

#[test]
fn fresh_method_reinitialises() {
    let dev: Dev = Default::default();
    let dense = dense_with_spectrum::<64, 48>(&dev, &power_law(48, 0.6));
    let cfg = FactorizeConfig {
        method: Method::Fresh,
        ..Default::default()
    };
    let (f, row) =
        FactorizedLinear::<64, 12, 48, f32, Dev>::from_linear_with_report("fc", &dense, &cfg)
            .unwrap();
    // PyTorch's default init: uniform in ±1/sqrt(fan_in).
    let bound = 1.0 / (64f32).sqrt();
    assert!(f.first.weight.as_vec().iter().all(|x| x.abs() <= bound));
    assert!(row.relative_error.unwrap() > 0.5);
}

#[test]
fn tensor_collection_build_reset_count_dtype_and_safetensors() {
    let dev: Dev = Default::default();
    let mut f = dev.build_module::<builders::FactorizedLinear<10, 3, 7>, f32>();
    assert_eq!(f.num_trainable_params(), 10 * 3 + 3 * 7 + 7);
    f.reset_params();
    let f64_version: FactorizedLinear<10, 3, 7, f64, Dev> = f.to_dtype::<f64>();
    assert_eq!(f64_version.second.bias.as_vec().len(), 7);
    let moved = f.to_device(&dev);
    assert_eq!(moved.first.weight.as_vec(), f.first.weight.as_vec());

    let dir = std::env::temp_dir().join(format!("factorize-linear-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f.safetensors");
    f.save_safetensors(&path).unwrap();
    let mut g = dev.build_module::<builders::FactorizedLinear<10, 3, 7>, f32>();
    g.load_safetensors(&path).unwrap();
    assert_eq!(g.first.weight.as_vec(), f.first.weight.as_vec());
    assert_eq!(g.second.weight.as_vec(), f.second.weight.as_vec());
    assert_eq!(g.second.bias.as_vec(), f.second.bias.as_vec());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn trains_with_a_dfdx_optimizer() {
    let dev = Dev::seed_from_u64(0);
    let mut f = FactorizedLinear::<8, 4, 3, f32, Dev>::build(&dev);
    let mut grads = f.alloc_grads();
    let mut opt = Sgd::new(
        &f,
        SgdConfig {
            lr: 0.05,
            ..Default::default()
        },
    );
    let x: Tensor<Rank2<32, 8>, f32, Dev> = dev.sample_normal();
    let target: Tensor<Rank2<32, 3>, f32, Dev> = dev.sample_normal();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let y = f.forward_mut(x.trace(grads));
        let loss = mse_loss(y, target.clone());
        losses.push(loss.array());
        grads = loss.backward();
        opt.update(&mut f, &grads).unwrap();
        f.zero_grads(&mut grads);
    }
    assert!(losses[19] < 0.8 * losses[0], "{losses:?}");
}

#[test]
fn bad_weights_are_an_error_and_the_source_is_untouched() {
    let dev: Dev = Default::default();
    let mut dense = dev.build_module::<dfdx::nn::builders::Linear<6, 4>, f32>();
    let mut w = dense.weight.as_vec();
    w[5] = f32::NAN;
    dense.weight.copy_from(&w);
    let e = FactorizedLinear::<6, 2, 4, f32, Dev>::from_linear_with_report(
        "head",
        &dense,
        &FactorizeConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            FactorizeError::NonFinite {
                tensor: "weight",
                index: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`head`"));
    let mut b = dense.bias.as_vec();
    w[5] = 0.0;
    dense.weight.copy_from(&w);
    b[1] = f32::INFINITY;
    dense.bias.copy_from(&b);
    let e = FactorizedLinear::<6, 2, 4, f32, Dev>::from_linear(&dense, &FactorizeConfig::default())
        .unwrap_err();
    assert!(
        matches!(e, FactorizeError::NonFinite { tensor: "bias", .. }),
        "{e}"
    );
    // A rank above min(I, O) is refused.
    b[1] = 0.5;
    dense.bias.copy_from(&b);
    let e = FactorizedLinear::<6, 5, 4, f32, Dev>::from_linear(&dense, &FactorizeConfig::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            FactorizeError::Rank {
                rank: 5,
                max: 4,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(dense.bias.as_vec(), b);
}

#[test]
fn calibrated_construction_and_typed_rank_reduction() {
    use factorize_runtime::Fit;
    let dev = Dev::seed_from_u64(2);
    let dense = dense_with_spectrum::<64, 48>(&dev, &power_law(48, 0.3));
    let x: Tensor<(usize, Const<64>), f32, Dev> = dev.sample_normal_like(&(200, Const));
    let (f, row) = FactorizedLinear::<64, 16, 48, f32, Dev>::from_linear_calibrated(
        "fc",
        &dense,
        &x,
        Fit::Exact { ridge: 0.0 },
        &FactorizeConfig::default(),
    )
    .unwrap();
    assert!(row.nmse.unwrap() > 0.0 && row.nmse.unwrap() < 1.0);
    // The calibrated layer reproduces the outputs on its data better than weight-space SVD.
    let svd =
        FactorizedLinear::<64, 16, 48, f32, Dev>::from_linear(&dense, &FactorizeConfig::default())
            .unwrap();
    let y = dense.forward(x.clone()).as_vec();
    let err = |z: Vec<f32>| {
        y.iter()
            .zip(&z)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
    };
    assert!(err(f.forward(x.clone()).as_vec()) <= err(svd.forward(x.clone()).as_vec()));

    // Lowering the rank: from the weights, the result is the best rank-8 approximation of B·A.
    let small: FactorizedLinear<64, 8, 48, f32, Dev> =
        svd.reduce::<8>(&FactorizeConfig::default()).unwrap();
    let direct =
        FactorizedLinear::<64, 8, 48, f32, Dev>::from_linear(&dense, &FactorizeConfig::default())
            .unwrap();
    let (a, b) = (
        small.forward(x.clone()).as_vec(),
        direct.forward(x.clone()).as_vec(),
    );
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = b.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
    assert!(diff <= 1e-4 * norm, "{diff} vs {norm}");
    // From data: fitted to the layer's own outputs.
    let (smaller, row) = f
        .reduce_calibrated::<8, usize>("fc", &x, Fit::exact(), &FactorizeConfig::default())
        .unwrap();
    let _: &FactorizedLinear<64, 8, 48, f32, Dev> = &smaller;
    assert_eq!(row.latent, 8);
}
