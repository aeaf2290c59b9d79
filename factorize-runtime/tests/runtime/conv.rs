//! Conv2D against a direct nested-loop convolution, and its gradients against finite differences.

use dfdx::prelude::*;
use factorize_runtime::conv::{output_size, Conv2D};

type Dev = Cpu;

/// The definition, written out: PyTorch's Conv2d with zero padding.
#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[f64],
    (b, c, h, w): (usize, usize, usize, usize),
    weight: &[f64],
    bias: &[f64],
    o: usize,
    k: usize,
    s: usize,
    p: usize,
    dil: usize,
) -> (Vec<f64>, usize, usize) {
    let (oh, ow) = (output_size(h, k, s, p, dil), output_size(w, k, s, p, dil));
    let mut y = vec![0.0; b * o * oh * ow];
    for n in 0..b {
        for f in 0..o {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = bias[f];
                    for ch in 0..c {
                        for a in 0..k {
                            for q in 0..k {
                                let r = (s * i + dil * a) as isize - p as isize;
                                let col = (s * j + dil * q) as isize - p as isize;
                                if r < 0 || col < 0 || r as usize >= h || col as usize >= w {
                                    continue;
                                }
                                let xv = x[((n * c + ch) * h + r as usize) * w + col as usize];
                                acc += weight[((f * c + ch) * k + a) * k + q] * xv;
                            }
                        }
                    }
                    y[((n * o + f) * oh + i) * ow + j] = acc;
                }
            }
        }
    }
    (y, oh, ow)
}

fn check<const K: usize, const S: usize, const P: usize, const DIL: usize>(h: usize, w: usize) {
    let dev = Dev::seed_from_u64((K * 100 + S * 10 + P + DIL) as u64);
    let conv = Conv2D::<3, 4, K, S, P, DIL, f64, Dev>::build(&dev);
    let x: Tensor<(Const<2>, Const<3>, usize, usize), f64, Dev> =
        dev.sample_normal_like(&(Const, Const, h, w));
    let (want, oh, ow) = reference(
        &x.as_vec(),
        (2, 3, h, w),
        &conv.weight.as_vec(),
        &conv.bias.as_vec(),
        4,
        K,
        S,
        P,
        DIL,
    );
    let y = conv.forward(x.clone());
    assert_eq!(
        y.shape().concrete(),
        [2, 4, oh, ow],
        "K{K} S{S} P{P} DIL{DIL}"
    );
    if oh * ow == 0 {
        return; // dfdx cannot read back an empty tensor; its shape is the whole answer.
    }
    for (a, b) in y.as_vec().iter().zip(&want) {
        assert!((a - b).abs() < 1e-12, "K{K} S{S} P{P} DIL{DIL}: {a} vs {b}");
    }
    // Unbatched input: the same numbers.
    let x0: Tensor<(Const<3>, usize, usize), f64, Dev> =
        dev.tensor_from_vec(x.as_vec()[..3 * h * w].to_vec(), (Const, h, w));
    let y0 = conv.forward(x0);
    assert_eq!(y0.shape().concrete(), [4, oh, ow]);
    assert_eq!(y0.as_vec(), y.as_vec()[..4 * oh * ow].to_vec());
}

#[test]
fn matches_the_definition_for_every_kernel_stride_padding_and_dilation() {
    check::<1, 1, 0, 1>(6, 5);
    check::<1, 2, 1, 1>(6, 5);
    check::<3, 1, 0, 1>(7, 6);
    check::<3, 1, 1, 1>(7, 6);
    check::<3, 2, 1, 1>(8, 7);
    check::<3, 2, 3, 2>(8, 7);
    check::<3, 1, 1, 2>(9, 9);
    check::<5, 1, 0, 1>(9, 8);
    check::<5, 2, 3, 1>(9, 8);
    check::<5, 1, 1, 2>(11, 10);
    check::<7, 1, 3, 1>(9, 9);
    check::<7, 2, 0, 1>(12, 11);
    check::<7, 2, 3, 2>(14, 13);
    // Input smaller than the dilated kernel: an empty output, no panic.
    check::<7, 1, 0, 2>(5, 5);
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Dev::seed_from_u64(9);
    let conv = Conv2D::<2, 3, 3, 2, 1, 2, f64, Dev>::build(&dev);
    let x: Tensor<Rank4<2, 2, 7, 6>, f64, Dev> = dev.sample_normal();
    let loss = |c: &Conv2D<2, 3, 3, 2, 1, 2, f64, Dev>,
                x: Tensor<Rank4<2, 2, 7, 6>, f64, Dev>|
     -> f64 { c.forward(x).square().sum::<Rank0, _>().array() };
    let y = conv.forward(x.leaky_trace());
    let l = y.square().sum::<Rank0, _>();
    let grads = l.backward();
    let (gx, gw, gb) = (
        grads.get(&x).as_vec(),
        grads.get(&conv.weight).as_vec(),
        grads.get(&conv.bias).as_vec(),
    );
    let eps = 1e-6;
    // Input.
    let xv = x.as_vec();
    for i in (0..xv.len()).step_by(7) {
        let (mut up, mut down) = (xv.clone(), xv.clone());
        up[i] += eps;
        down[i] -= eps;
        let fd = (loss(&conv, dev.tensor(up)) - loss(&conv, dev.tensor(down))) / (2.0 * eps);
        assert!(
            (fd - gx[i]).abs() < 1e-5 * (1.0 + fd.abs()),
            "dx[{i}]: {fd} vs {}",
            gx[i]
        );
    }
    // Weight and bias.
    let wv = conv.weight.as_vec();
    for i in 0..wv.len() {
        let mut c = conv.clone();
        let mut up = wv.clone();
        up[i] += eps;
        c.weight.copy_from(&up);
        let lu = loss(&c, x.clone());
        up[i] -= 2.0 * eps;
        c.weight.copy_from(&up);
        let fd = (lu - loss(&c, x.clone())) / (2.0 * eps);
        assert!(
            (fd - gw[i]).abs() < 1e-5 * (1.0 + fd.abs()),
            "dw[{i}]: {fd} vs {}",
            gw[i]
        );
    }
    let bv = conv.bias.as_vec();
    for i in 0..bv.len() {
        let mut c = conv.clone();
        let mut up = bv.clone();
        up[i] += eps;
        c.bias.copy_from(&up);
        let lu = loss(&c, x.clone());
        up[i] -= 2.0 * eps;
        c.bias.copy_from(&up);
        let fd = (lu - loss(&c, x.clone())) / (2.0 * eps);
        assert!(
            (fd - gb[i]).abs() < 1e-5 * (1.0 + fd.abs()),
            "db[{i}]: {fd} vs {}",
            gb[i]
        );
    }
}

#[test]
fn tensor_collection_and_default_init() {
    let dev = Dev::seed_from_u64(0);
    let mut c = Conv2D::<4, 6, 3, 1, 1, 1, f32, Dev>::build(&dev);
    assert_eq!(c.num_trainable_params(), 6 * 4 * 9 + 6);
    let bound = 1.0 / (4.0f32 * 9.0).sqrt();
    assert!(c
        .weight
        .as_vec()
        .iter()
        .chain(c.bias.as_vec().iter())
        .all(|v| v.abs() <= bound));
    c.reset_params();
    let _: Conv2D<4, 6, 3, 1, 1, 1, f64, Dev> = c.to_dtype::<f64>();
    let dir = std::env::temp_dir().join(format!("factorize-conv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.safetensors");
    c.save_safetensors(&path).unwrap();
    let mut d = Conv2D::<4, 6, 3, 1, 1, 1, f32, Dev>::build(&dev);
    d.load_safetensors(&path).unwrap();
    assert_eq!(c.weight.as_vec(), d.weight.as_vec());
    std::fs::remove_dir_all(&dir).ok();
}

mod factorized {
    use super::Dev;
    use dfdx::prelude::*;
    use factorize_runtime::conv::Conv2D;
    use factorize_runtime::cost::LayerKind;
    use factorize_runtime::engine::{relative_error, WeightMatrix};
    use factorize_runtime::synthetic::{matrix_with_spectrum, optimal_relative_error, power_law};
    use factorize_runtime::{FactorizeConfig, FactorizedConv2D, Status};

    fn conv_with_spectrum(dev: &Dev, sigma: &[f64]) -> Conv2D<8, 12, 3, 2, 1, 1, f64, Dev> {
        let mut c = Conv2D::<8, 12, 3, 2, 1, 1, f64, Dev>::build(dev);
        // The weight as the matrix [O, I·K·K] = [12, 72].
        c.weight.copy_from(&matrix_with_spectrum(12, 72, sigma, 4));
        c
    }

    #[test]
    fn weights_meet_the_optimum_of_the_unfolded_kernel() {
        let dev = Dev::seed_from_u64(3);
        let sigma = power_law(12, 0.7);
        let dense = conv_with_spectrum(&dev, &sigma);
        let (f, row) = FactorizedConv2D::<8, 4, 12, 3, 2, 1, 1, f64, Dev>::from_conv_with_report(
            "block.conv",
            &dense,
            &FactorizeConfig::default(),
        )
        .unwrap();
        let w = dense.weight.as_vec();
        let m = WeightMatrix::new("c", &w, 12, 72).unwrap();
        let measured = relative_error(&m, &f.second.weight.as_vec(), &f.first.weight.as_vec(), 4);
        let optimum = optimal_relative_error(&sigma, 4);
        assert!(
            (measured / optimum - 1.0).abs() < 1e-4,
            "{measured} vs {optimum}"
        );
        assert_eq!(f.second.bias.as_vec(), dense.bias.as_vec());
        assert_eq!(
            (row.kind, row.kernel, row.status),
            (LayerKind::Conv2D, 3, Status::Replaced)
        );
        assert_eq!((row.macs_before, row.macs_after), (72 * 12, 4 * (72 + 12)));
    }

    #[test]
    fn a_reduced_pair_meets_the_optimum_of_the_pair_it_reduces() {
        let dev = Dev::seed_from_u64(5);
        let sigma = power_law(12, 0.7);
        let dense = conv_with_spectrum(&dev, &sigma);
        let cfg = FactorizeConfig::default();
        let four =
            FactorizedConv2D::<8, 4, 12, 3, 2, 1, 1, f64, Dev>::from_conv(&dense, &cfg).unwrap();
        let two: FactorizedConv2D<8, 2, 12, 3, 2, 1, 1, f64, Dev> = four.reduce(&cfg).unwrap();
        // The rank-4 pair computes the top four singular directions of the kernel; its best rank
        // 2 keeps the top two of them.
        let a = four.first.weight.as_vec();
        let b = four.second.weight.as_vec();
        let product: Vec<f64> = (0..12)
            .flat_map(|o| (0..72).map(move |i| (o, i)))
            .map(|(o, i)| (0..4).map(|r| b[o * 4 + r] * a[r * 72 + i]).sum())
            .collect();
        let m = WeightMatrix::new("c", &product, 12, 72).unwrap();
        let measured = relative_error(
            &m,
            &two.second.weight.as_vec(),
            &two.first.weight.as_vec(),
            2,
        );
        let optimum = optimal_relative_error(&sigma[..4], 2);
        assert!(
            (measured / optimum - 1.0).abs() < 1e-4,
            "{measured} vs {optimum}"
        );
        assert_eq!(two.second.bias.as_vec(), dense.bias.as_vec());
    }

    #[test]
    fn outputs_are_unchanged_when_the_kernel_has_rank_at_most_latent() {
        let dev = Dev::seed_from_u64(4);
        let dense = conv_with_spectrum(&dev, &[1.0, 0.5, 0.25]);
        let f = FactorizedConv2D::<8, 3, 12, 3, 2, 1, 1, f64, Dev>::from_conv(
            &dense,
            &FactorizeConfig::default(),
        )
        .unwrap();
        let x: Tensor<Rank4<2, 8, 9, 9>, f64, Dev> = dev.sample_normal();
        let (a, b) = (dense.forward(x.clone()).as_vec(), f.forward(x).as_vec());
        let num: f64 = a.iter().zip(&b).map(|(p, q)| (p - q).powi(2)).sum();
        let den: f64 = a.iter().map(|p| p * p).sum();
        assert!((num / den).sqrt() < 1e-10);
        // Trainable like any dfdx module, and its parameter count is the factorized one.
        assert_eq!(f.num_trainable_params(), 3 * 72 + 12 * 3 + 12);
    }
}

mod calibrated {
    use super::Dev;
    use dfdx::prelude::*;
    use factorize_runtime::conv::Conv2D;
    use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
    use factorize_runtime::Fit;
    use factorize_runtime::{FactorizeConfig, FactorizeError, FactorizedConv2D};

    /// nmse measured on the outputs themselves.
    fn measured(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let mean = a.iter().sum::<f64>() / n;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / n / var
    }

    #[test]
    fn patches_fit_matches_the_conv_outputs_and_beats_weight_svd() {
        let dev = Dev::seed_from_u64(5);
        let mut dense = Conv2D::<8, 12, 3, 2, 1, 1, f64, Dev>::build(&dev);
        dense
            .weight
            .copy_from(&matrix_with_spectrum(12, 72, &power_law(12, 0.3), 4));
        // Images whose channels are strongly correlated, as feature maps are.
        let mix: Tensor<Rank2<8, 8>, f64, Dev> =
            dev.tensor(matrix_with_spectrum(8, 8, &power_law(8, 2.0), 6));
        let z: Tensor<Rank2<486, 8>, f64, Dev> = dev.sample_normal();
        let x = z
            .matmul(mix)
            .reshape::<Rank4<6, 9, 9, 8>>()
            .permute::<Rank4<6, 8, 9, 9>, Axes4<0, 3, 1, 2>>();
        let x: Tensor<Rank4<6, 8, 9, 9>, f64, Dev> =
            dev.tensor_from_vec(x.as_vec(), (Const, Const, Const, Const));
        let (f, row) = FactorizedConv2D::<8, 3, 12, 3, 2, 1, 1, f64, Dev>::from_conv_calibrated(
            "conv",
            &dense,
            &x,
            Fit::Exact { ridge: 0.0 },
            &FactorizeConfig::default(),
        )
        .unwrap();
        let y = dense.forward(x.clone()).as_vec();
        let got = measured(&y, &f.forward(x.clone()).as_vec());
        assert!(
            (got / row.nmse.unwrap() - 1.0).abs() < 1e-8,
            "{got} vs {}",
            row.nmse.unwrap()
        );
        let svd = FactorizedConv2D::<8, 3, 12, 3, 2, 1, 1, f64, Dev>::from_conv(
            &dense,
            &FactorizeConfig::default(),
        )
        .unwrap();
        assert!(got < measured(&y, &svd.forward(x.clone()).as_vec()));

        let tiny: Tensor<Rank4<1, 8, 1, 1>, f64, Dev> = dev.sample_normal();
        let dilated = Conv2D::<8, 12, 3, 1, 0, 2, f64, Dev>::build(&dev);
        let e = FactorizedConv2D::<8, 3, 12, 3, 1, 0, 2, f64, Dev>::from_conv_calibrated(
            "c",
            &dilated,
            &tiny,
            Fit::exact(),
            &FactorizeConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(e, FactorizeError::Calibration { .. }), "{e}");
    }
}
