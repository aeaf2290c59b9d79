//! Exactness on real pretrained weights (all-MiniLM-L6-v2 attention and FFN matrices).

mod common;

use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::engine::{low_rank, relative_error, WeightMatrix};
use factorize_runtime::weights::read_matrices;
use factorize_runtime::{FactorizeConfig, FactorizedLinear, Precision};

#[test]
fn every_layer_at_every_rank_meets_the_eckart_young_optimum() {
    let Some(dir) = common::minilm_dir("minilm exactness") else {
        return;
    };
    let matrices = read_matrices(dir.join("weights.safetensors")).unwrap();
    assert_eq!(
        matrices.len(),
        12,
        "six Linear weights in each of two blocks"
    );
    for m in &matrices {
        let sigma = common::singular_values(&m.data, m.out_dim, m.in_dim);
        let w = WeightMatrix::new(&m.name, &m.data, m.out_dim, m.in_dim).unwrap();
        for rank in [32, 64, 128] {
            let optimum = common::optimum(&sigma, rank);
            for precision in [Precision::F64, Precision::F32] {
                let f = low_rank(&w, rank, precision).unwrap();
                let measured = relative_error(&w, &f.second, &f.first, rank);
                assert!(
                    (measured / optimum - 1.0).abs() <= 1e-4,
                    "{} rank {rank} {precision:?}: {measured} vs optimum {optimum}",
                    m.name
                );
            }
        }
    }
}

#[test]
fn typed_ffn_layer_from_real_weights() {
    let Some(dir) = common::minilm_dir("minilm typed layer") else {
        return;
    };
    let matrices = read_matrices(dir.join("weights.safetensors")).unwrap();
    let up = matrices
        .iter()
        .find(|m| m.name == "layer5.ffn_up.weight")
        .unwrap();
    let dev: Cpu = Default::default();
    let mut dense = dev.build_module::<dfdx::nn::builders::Linear<384, 1536>, f32>();
    let w: Vec<f32> = up.data.iter().map(|x| *x as f32).collect();
    dense.weight.copy_from(&w);
    let (f, row) = FactorizedLinear::<384, 128, 1536, f32, Cpu>::from_linear_named(
        "layer5.ffn_up",
        &dense,
        &FactorizeConfig::default(),
    )
    .unwrap();
    // The error of the stored f32 weights, measured in f64.
    let first: Vec<f64> = f.first.weight.as_vec().iter().map(|x| *x as f64).collect();
    let second: Vec<f64> = f.second.weight.as_vec().iter().map(|x| *x as f64).collect();
    let wm = WeightMatrix::new("layer5.ffn_up", &up.data, 1536, 384).unwrap();
    let measured = relative_error(&wm, &second, &first, 128);
    let optimum = common::optimum(&common::singular_values(&up.data, 1536, 384), 128);
    assert!(
        (measured / optimum - 1.0).abs() <= 1e-4,
        "{measured} vs {optimum}"
    );
    assert!((row.relative_error.unwrap() / optimum - 1.0).abs() <= 1e-4);
    let _: &Linear<128, 1536, f32, Cpu> = &f.second;
}
