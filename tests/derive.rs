//! `#[derive(Factorizable)]` end to end: which fields are replaced, the variant's forward,
//! reports, exactness, save/load.

#[path = "../factorize-runtime/tests/runtime/common/mod.rs"]
mod common;

use dfdx::nn::modules::{LayerNorm1D, Linear, ReLU};
use dfdx::prelude::*;
use factorize_runtime::cost::{linear_decision, FactorizeParams, Latent};
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::weights::read_matrices;
use factorize_runtime::{
    mirror, Factorizable, FactorizeAs, FactorizeConfig, FactorizeError, FactorizedLinear, Status,
    TensorCollection,
};

type Dev = Cpu;
const D_MODEL: usize = 512;
const D_FF: usize = 2 * D_MODEL;

/// A transformer FFN block: named consts and a const expression as dims. `TensorCollection`
/// makes the original buildable, savable and trainable, as the variant is.
#[derive(Factorizable, TensorCollection)]
pub struct Ffn<E: Dtype, D: Device<E>> {
    pub up: Linear<D_MODEL, D_FF, E, D>,
    pub act: ReLU,
    pub down: Linear<{ D_MODEL * 2 }, D_MODEL, E, D>,
}

#[mirror]
impl<E: Dtype, D: Device<E>, B: Dim> Module<Tensor<(B, Const<D_MODEL>), E, D>> for Ffn<E, D> {
    type Output = Tensor<(B, Const<D_MODEL>), E, D>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, Const<D_MODEL>), E, D>) -> Result<Self::Output, D::Err> {
        self.down
            .try_forward(self.act.try_forward(self.up.try_forward(x)?)?)
    }
}

/// Nested struct, a tuple field (dfdx sequential), a skipped field, a narrow field, a layer the
/// struct's rank does not pay on, a carried-over LayerNorm, struct-level parameters.
#[derive(Factorizable)]
#[factorize(latent_features = 64, min_features = 300)]
pub struct Encoder<E: Dtype, D: Device<E>> {
    /// Keeps its own parameters (latent 128).
    pub ffn: Ffn<E, D>,
    pub norm: LayerNorm1D<D_MODEL, E, D>,
    pub seq: (Linear<512, 512, E, D>, ReLU, Linear<512, 260, E, D>),
    #[factorize(skip)]
    pub frozen: Linear<512, 512, E, D>,
    /// The struct's rank 64 is past this layer's break-even (63): kept, not an error.
    #[factorize(min_features = 128)]
    pub no_saving: Linear<128, 128, E, D>,
    #[factorize(latent = 0.25, min_features = 200)]
    pub own: Linear<512, 256, E, D>,
}

#[mirror]
impl<E: Dtype, D: Device<E>> Module<Tensor<Rank2<4, D_MODEL>, E, D>> for Encoder<E, D> {
    type Output = Tensor<Rank2<4, 256>, E, D>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<Rank2<4, D_MODEL>, E, D>) -> Result<Self::Output, D::Err> {
        let x = self.norm.try_forward(self.ffn.try_forward(x)?)?;
        let x = self.frozen.try_forward(x)?;
        let _ = self.seq.try_forward(x.clone())?;
        self.own.try_forward(x)
    }
}

/// Dims from the struct's own const generics: replaced only with an explicit latent.
#[derive(Factorizable)]
pub struct Square<const N: usize, E: Dtype, D: Device<E>> {
    #[factorize(latent = 64)]
    pub fc: Linear<N, N, E, D>,
    #[factorize(skip)]
    pub other: Linear<N, 8, E, D>,
}

fn build<M: BuildModule<Dev, f32>>(dev: &Dev) -> M {
    M::build(dev)
}

fn ffn(dev: &Dev) -> Ffn<f32, Dev> {
    Ffn {
        up: build(dev),
        act: ReLU,
        down: build(dev),
    }
}

fn encoder(dev: &Dev) -> Encoder<f32, Dev> {
    Encoder {
        ffn: ffn(dev),
        norm: build(dev),
        seq: (build(dev), ReLU, build(dev)),
        frozen: build(dev),
        no_saving: build(dev),
        own: build(dev),
    }
}

fn set_spectrum<const I: usize, const O: usize>(l: &mut Linear<I, O, f32, Dev>, sigma: &[f64]) {
    let w: Vec<f32> = matrix_with_spectrum(O, I, sigma, (I * 31 + O) as u64)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    l.weight.copy_from(&w);
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn fields_are_replaced_exactly_as_the_rule_says() {
    let dev: Dev = Default::default();
    let model = encoder(&dev);
    let (f, report) = model
        .factorize_with_report(&FactorizeConfig::default())
        .unwrap();
    // The compiler chose these types; naming them here is the test.
    let _: &FactorizedLinear<D_MODEL, 128, D_FF, f32, Dev> = &f.ffn.up;
    let _: &FactorizedLinear<D_FF, 128, D_MODEL, f32, Dev> = &f.ffn.down;
    let _: &LayerNorm1D<D_MODEL, f32, Dev> = &f.norm;
    let _: &FactorizedLinear<512, 64, 512, f32, Dev> = &f.seq.0;
    let _: &Linear<512, 260, f32, Dev> = &f.seq.2; // 260 < min_features 300
    let _: &Linear<512, 512, f32, Dev> = &f.frozen;
    let _: &Linear<128, 128, f32, Dev> = &f.no_saving; // 64 > 63, the largest saving rank
    let _: &FactorizedLinear<512, 64, 256, f32, Dev> = &f.own; // 0.25 · 256, min 200
    let rows: Vec<(&str, Status)> = report
        .layers
        .iter()
        .map(|r| (r.path.as_str(), r.status))
        .collect();
    assert_eq!(
        rows,
        [
            ("ffn.up", Status::Replaced),
            ("ffn.down", Status::Replaced),
            ("seq.0", Status::Replaced),
            (
                "seq.2",
                Status::TooNarrow {
                    width: 260,
                    min: 300
                }
            ),
            ("frozen", Status::Skipped),
            (
                "no_saving",
                Status::NoSaving {
                    latent: 64,
                    max_rank: 63
                }
            ),
            ("own", Status::Replaced),
        ]
    );
    // Same input and output types as the original.
    let x: Tensor<Rank2<4, D_MODEL>, f32, Dev> = dev.sample_normal();
    let _: Tensor<Rank2<4, 256>, f32, Dev> = f.forward(x.clone());
    let _: Tensor<Rank2<4, 256>, f32, Dev> = model.forward(x);
}

#[test]
fn carried_over_fields_are_bitwise_copies_and_the_source_is_untouched() {
    let dev: Dev = Default::default();
    let model = encoder(&dev);
    let before: Vec<Vec<f32>> = [&model.frozen, &model.seq.0]
        .iter()
        .map(|l| l.weight.as_vec())
        .collect();
    let f = model.factorize(&FactorizeConfig::default()).unwrap();
    assert_eq!(f.frozen.weight.as_vec(), before[0]);
    assert_eq!(f.no_saving.weight.as_vec(), model.no_saving.weight.as_vec());
    assert_eq!(f.seq.2.bias.as_vec(), model.seq.2.bias.as_vec());
    assert_eq!(f.norm.gamma.as_vec(), model.norm.gamma.as_vec());
    let after: Vec<Vec<f32>> = [&model.frozen, &model.seq.0]
        .iter()
        .map(|l| l.weight.as_vec())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn an_error_names_the_layer_and_leaves_the_model_as_it_was() {
    let dev: Dev = Default::default();
    let mut model = encoder(&dev);
    let mut w = model.own.weight.as_vec();
    w[3] = f32::NAN;
    model.own.weight.copy_from(&w);
    let snapshot = model.ffn.up.weight.as_vec();
    let e = model.factorize(&FactorizeConfig::default()).unwrap_err();
    assert!(
        matches!(e, FactorizeError::NonFinite { ref layer, .. } if layer == "own"),
        "{e}"
    );
    assert_eq!(model.ffn.up.weight.as_vec(), snapshot);
}

#[test]
fn outputs_are_unchanged_when_weights_have_rank_at_most_latent() {
    let dev: Dev = Default::default();
    let mut model = ffn(&dev);
    set_spectrum(&mut model.up, &power_law(100, 0.5));
    set_spectrum(&mut model.down, &power_law(128, 0.5));
    let f = model.factorize(&FactorizeConfig::default()).unwrap();
    let x: Tensor<Rank2<16, D_MODEL>, f32, Dev> = dev.sample_normal();
    let y0 = model.forward(x.clone()).as_vec();
    let y1 = f.forward(x).as_vec();
    assert!(rel(&y0, &y1) <= 1e-5, "{}", rel(&y0, &y1));
}

#[test]
fn generic_dims_with_explicit_latent() {
    let dev: Dev = Default::default();
    let m = Square::<512, f32, Dev> {
        fc: build(&dev),
        other: build(&dev),
    };
    let (f, report) = m
        .factorize_with_report(&FactorizeConfig::default())
        .unwrap();
    let _: &FactorizedLinear<512, 64, 512, f32, Dev> = &f.fc;
    assert_eq!(report.layers[0].status, Status::Replaced);
    assert_eq!(report.layers[1].status, Status::Skipped);
}

#[test]
fn works_for_f64_models() {
    let dev: Dev = Default::default();
    let m: Ffn<f64, Dev> = Ffn {
        up: BuildModule::build(&dev),
        act: ReLU,
        down: BuildModule::build(&dev),
    };
    let f = m.factorize(&FactorizeConfig::default()).unwrap();
    let x: Tensor<Rank2<2, D_MODEL>, f64, Dev> = dev.sample_normal();
    let _: Tensor<Rank2<2, D_MODEL>, f64, Dev> = f.forward(x);
}

#[test]
fn variant_saves_and_loads_with_identical_outputs() {
    let dev: Dev = Default::default();
    let f = ffn(&dev).factorize(&FactorizeConfig::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("factorize-derive-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ffn_factorized.safetensors");
    f.save_safetensors(&path).unwrap();
    let mut g = FfnFactorized::<f32, Dev>::build(&dev);
    g.load_safetensors(&path).unwrap();
    let x: Tensor<Rank2<8, D_MODEL>, f32, Dev> = dev.sample_normal();
    assert_eq!(f.forward(x.clone()).as_vec(), g.forward(x).as_vec());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dense_checkpoint_to_factorized_checkpoint() {
    // The documented flow: load a dense checkpoint, factorize once, save, deploy the variant.
    let dev: Dev = Default::default();
    let dir = std::env::temp_dir().join(format!("factorize-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (dense_path, small_path) = (dir.join("dense.safetensors"), dir.join("small.safetensors"));
    let trained = ffn(&dev);
    trained.save_safetensors(&dense_path).unwrap();

    let mut model = Ffn::<f32, Dev>::build(&dev);
    model.load_safetensors(&dense_path).unwrap();
    model
        .factorize(&FactorizeConfig::default())
        .unwrap()
        .save_safetensors(&small_path)
        .unwrap();

    let mut deployed = FfnFactorized::<f32, Dev>::build(&dev);
    deployed.load_safetensors(&small_path).unwrap();
    let direct = trained.factorize(&FactorizeConfig::default()).unwrap();
    let x: Tensor<Rank2<8, D_MODEL>, f32, Dev> = dev.sample_normal();
    assert_eq!(
        deployed.forward(x.clone()).as_vec(),
        direct.forward(x).as_vec()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The real MiniLM FFN weights: each layer's error equals its SVD optimum.
#[derive(Factorizable)]
pub struct MiniLmFfn<E: Dtype, D: Device<E>> {
    pub up: Linear<384, 1536, E, D>,
    pub down: Linear<1536, 384, E, D>,
}

#[test]
fn real_minilm_ffn_layers_meet_their_optimum() {
    let Some(dir) = common::minilm_dir("derive on MiniLM FFN") else {
        return;
    };
    let matrices = read_matrices(dir.join("weights.safetensors")).unwrap();
    let dev: Dev = Default::default();
    for layer in ["layer0", "layer5"] {
        let get = |name: &str| {
            matrices
                .iter()
                .find(|m| m.name == format!("{layer}.{name}.weight"))
                .unwrap()
        };
        let (up, down) = (get("ffn_up"), get("ffn_down"));
        let mut m = MiniLmFfn::<f32, Dev> {
            up: build(&dev),
            down: build(&dev),
        };
        m.up.weight
            .copy_from(&up.data.iter().map(|x| *x as f32).collect::<Vec<_>>());
        m.down
            .weight
            .copy_from(&down.data.iter().map(|x| *x as f32).collect::<Vec<_>>());
        let (_, report) = m
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        for (row, w) in report.layers.iter().zip([up, down]) {
            let sigma = common::singular_values(&w.data, w.out_dim, w.in_dim);
            let optimum = factorize_runtime::synthetic::optimal_relative_error(&sigma, 128);
            let got = row.relative_error.unwrap();
            assert!(
                (got / optimum - 1.0).abs() <= 1e-4,
                "{layer}.{}: {got} vs {optimum}",
                row.path
            );
        }
    }
}

/// Property: over a spread of widths, a field is replaced exactly when the cost rule says so.
macro_rules! width_cases {
    ($($name:ident: $i:literal x $o:literal latent $l:literal;)*) => {
        $(
            #[derive(Factorizable)]
            #[factorize(latent_features = $l, min_features = 64)]
            pub struct $name<E: Dtype, D: Device<E>> {
                pub fc: Linear<$i, $o, E, D>,
            }
        )*

        #[test]
        fn replaced_exactly_when_the_rule_says_so() {
            let dev: Dev = Default::default();
            $(
                let m = $name::<f32, Dev> { fc: build(&dev) };
                let f = m.factorize(&FactorizeConfig::default()).unwrap();
                let params = FactorizeParams {
                    latent_features: Latent::Count($l),
                    min_features: 64,
                    ..FactorizeParams::DEFAULT
                };
                let expected = linear_decision(&params, $i, $o).is_replace();
                let replaced = std::any::type_name_of_val(&f.fc).contains("FactorizedLinear");
                assert_eq!(replaced, expected, "{} ({} → {}, latent {})", stringify!($name), $i, $o, $l);
            )*
        }
    };
}

// Widths and ranks drawn once from a seeded generator, plus the break-even edges.
width_cases! {
    W0: 64 x 64 latent 31;
    W1: 64 x 64 latent 32;
    W2: 96 x 200 latent 64;
    W3: 96 x 200 latent 65;
    W4: 300 x 70 latent 56;
    W5: 300 x 70 latent 57;
    W6: 63 x 500 latent 8;
    W7: 128 x 129 latent 64;
    W8: 128 x 128 latent 64;
    W9: 257 x 333 latent 144;
    W10: 257 x 333 latent 145;
    W11: 181 x 97 latent 40;
    W12: 450 x 64 latent 56;
    W13: 450 x 64 latent 57;
}

mod ranks_file {
    use super::*;

    /// Ranks from `tests/ranks/flat.ranks`, under `head`: `a` at 96, `b` dense, `c` by the rule,
    /// and `inner.fc` read by `Inner` itself.
    #[derive(Factorizable)]
    #[factorize(ranks = "tests/ranks/flat.ranks", ranks_prefix = "head")]
    pub struct Planned<E: Dtype, D: Device<E>> {
        pub a: Linear<512, 512, E, D>,
        pub b: Linear<512, 256, E, D>,
        pub c: Linear<512, 512, E, D>,
        pub act: ReLU,
        pub inner: Inner<E, D>,
    }

    /// A nested struct reading its own entries from the same file.
    #[derive(Factorizable)]
    #[factorize(ranks = "tests/ranks/flat.ranks", ranks_prefix = "head.inner")]
    pub struct Inner<E: Dtype, D: Device<E>> {
        pub fc: Linear<256, 256, E, D>,
    }

    #[test]
    fn entries_set_each_fields_rank_or_keep_it_dense() {
        let dev: Dev = Default::default();
        let model = Planned::<f32, Dev> {
            a: BuildModule::build(&dev),
            b: BuildModule::build(&dev),
            c: BuildModule::build(&dev),
            act: ReLU,
            inner: Inner {
                fc: BuildModule::build(&dev),
            },
        };
        let (f, report) = model
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        // The types say it: the file's rank, the dense layer, the rule's default rank.
        let _: &FactorizedLinear<512, 96, 512, f32, Dev> = &f.a;
        let _: &Linear<512, 256, f32, Dev> = &f.b;
        let _: &FactorizedLinear<512, 128, 512, f32, Dev> = &f.c;
        // 256 → 256 at 32: forced by the nested struct's entry (the rule's 128 saves nothing).
        let _: &FactorizedLinear<256, 32, 256, f32, Dev> = &f.inner.fc;
        let rows: Vec<(&str, Status, usize)> = report
            .layers
            .iter()
            .map(|r| (r.path.as_str(), r.status, r.latent))
            .collect();
        assert_eq!(
            rows,
            [
                ("a", Status::Replaced, 96),
                ("b", Status::Skipped, 0),
                ("c", Status::Replaced, 128),
                ("inner.fc", Status::Replaced, 32)
            ]
        );
    }
}

mod convolutions {
    use super::Dev;
    use dfdx::nn::modules::ReLU;
    use dfdx::prelude::*;
    use factorize_runtime::conv::Conv2D;
    use factorize_runtime::{mirror, Factorizable, FactorizeConfig, FactorizedConv2D, Status};

    /// Convolutions under factorize_convs, min_channels and latent_channels (default 0.25).
    #[derive(Factorizable)]
    pub struct ConvNet<E: Dtype, D: Device<E>> {
        pub stem: Conv2D<3, 256, 3, 1, 1, 1, E, D>,
        pub body: Conv2D<256, 256, 3, 1, 1, 1, E, D>,
        pub proj: (Conv2D<256, 256, 1, 1, 0, 1, E, D>, ReLU),
        #[factorize(latent = 0.9)]
        pub wide: Conv2D<256, 256, 1, 1, 0, 1, E, D>,
        #[factorize(skip)]
        pub frozen: Conv2D<256, 256, 3, 2, 1, 1, E, D>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>, B: Dim, H: Dim, W: Dim> Module<Tensor<(B, Const<3>, H, W), E, D>>
        for ConvNet<E, D>
    {
        type Output = Tensor<(B, Const<256>, usize, usize), E, D>;
        type Error = D::Err;
        fn try_forward(
            &self,
            x: Tensor<(B, Const<3>, H, W), E, D>,
        ) -> Result<Self::Output, D::Err> {
            let x = self.body.try_forward(self.stem.try_forward(x)?)?;
            let x = self.wide.try_forward(self.proj.try_forward(x)?)?;
            self.frozen.try_forward(x)
        }
    }

    #[derive(Factorizable)]
    #[factorize(factorize_convs = false)]
    pub struct NoConvs<E: Dtype, D: Device<E>> {
        pub body: Conv2D<256, 256, 3, 1, 1, 1, E, D>,
    }

    #[test]
    fn conv_fields_follow_the_rule() {
        let dev: Dev = Default::default();
        let net = ConvNet::<f32, Dev> {
            stem: BuildModule::build(&dev),
            body: BuildModule::build(&dev),
            proj: BuildModule::build(&dev),
            wide: BuildModule::build(&dev),
            frozen: BuildModule::build(&dev),
        };
        let (f, report) = net
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        let _: &Conv2D<3, 256, 3, 1, 1, 1, f32, Dev> = &f.stem; // 3 < min_channels
        let _: &FactorizedConv2D<256, 64, 256, 3, 1, 1, 1, f32, Dev> = &f.body; // 0.25 · 256
        let _: &FactorizedConv2D<256, 64, 256, 1, 1, 0, 1, f32, Dev> = &f.proj.0;
        let _: &Conv2D<256, 256, 1, 1, 0, 1, f32, Dev> = &f.wide; // 230 > break-even 127
        let _: &Conv2D<256, 256, 3, 2, 1, 1, f32, Dev> = &f.frozen;
        let rows: Vec<(&str, Status, usize)> = report
            .layers
            .iter()
            .map(|r| (r.path.as_str(), r.status, r.kernel))
            .collect();
        assert_eq!(
            rows,
            [
                ("stem", Status::TooNarrow { width: 3, min: 256 }, 3),
                ("body", Status::Replaced, 3),
                ("proj.0", Status::Replaced, 1),
                (
                    "wide",
                    Status::NoSaving {
                        latent: 230,
                        max_rank: 127
                    },
                    1
                ),
                ("frozen", Status::Skipped, 3),
            ]
        );
        assert_eq!(report.layers[1].macs_after, 64 * (256 * 9 + 256));
        let x: Tensor<Rank4<1, 3, 6, 6>, f32, Dev> = dev.sample_normal();
        let (a, b) = (net.forward(x.clone()), f.forward(x));
        assert_eq!(a.shape().concrete(), b.shape().concrete());

        let plain = NoConvs::<f32, Dev> {
            body: BuildModule::build(&dev),
        };
        let (g, report) = plain
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        let _: &Conv2D<256, 256, 3, 1, 1, 1, f32, Dev> = &g.body;
        assert_eq!(report.layers[0].status, Status::Disabled);
    }
}

/// dfdx's `Repeated` stack and residual wrappers of derived blocks: each block factorized on
/// its own, in order.
mod stacks {
    use super::*;
    use dfdx::nn::modules::{GeneralizedResidual, Repeated, Residual};
    use factorize_runtime::Fit;

    type Rows = Tensor<(usize, Const<128>), f32, Dev>;

    #[derive(Factorizable)]
    #[factorize(latent_features = 32, min_features = 128)]
    pub struct Block<E: Dtype, D: Device<E>> {
        pub up: Linear<128, 256, E, D>,
        pub act: ReLU,
        pub down: Linear<256, 128, E, D>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<128>), E, D>> for Block<E, D> {
        type Output = Tensor<(usize, Const<128>), E, D>;
        type Error = D::Err;
        fn try_forward(
            &self,
            x: Tensor<(usize, Const<128>), E, D>,
        ) -> Result<Self::Output, D::Err> {
            self.down
                .try_forward(self.act.try_forward(self.up.try_forward(x)?)?)
        }
    }

    #[derive(Factorizable)]
    pub struct Stack<E: Dtype, D: Device<E>> {
        pub blocks: Repeated<Block<E, D>, 3>,
        /// Below the default minimum of 256 features: kept.
        pub head: Linear<128, 128, E, D>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<128>), E, D>> for Stack<E, D> {
        type Output = Tensor<(usize, Const<128>), E, D>;
        type Error = D::Err;
        fn try_forward(
            &self,
            x: Tensor<(usize, Const<128>), E, D>,
        ) -> Result<Self::Output, D::Err> {
            self.head.try_forward(self.blocks.try_forward(x)?)
        }
    }

    #[derive(Factorizable)]
    pub struct Wrapped<E: Dtype, D: Device<E>> {
        pub res: Residual<Block<E, D>>,
        pub both: GeneralizedResidual<Block<E, D>, Block<E, D>>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<128>), E, D>> for Wrapped<E, D> {
        type Output = Tensor<(usize, Const<128>), E, D>;
        type Error = D::Err;
        fn try_forward(
            &self,
            x: Tensor<(usize, Const<128>), E, D>,
        ) -> Result<Self::Output, D::Err> {
            self.both.try_forward(self.res.try_forward(x)?)
        }
    }

    /// dfdx's wrappers with the layers written out inside, as dfdx users write residual MLPs.
    /// (An alias would hide the layers from the derive, hence clippy's complexity allowance.)
    #[allow(clippy::type_complexity)]
    #[derive(Factorizable)]
    #[factorize(latent_features = 32, min_features = 128)]
    pub struct Inline<E: Dtype, D: Device<E>> {
        pub res: Residual<(Linear<128, 256, E, D>, ReLU, Linear<256, 128, E, D>)>,
        pub stack: Repeated<(Linear<128, 128, E, D>, ReLU), 2>,
        pub both: GeneralizedResidual<Linear<128, 128, E, D>, Block<E, D>>,
    }

    #[mirror]
    impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<128>), E, D>> for Inline<E, D> {
        type Output = Tensor<(usize, Const<128>), E, D>;
        type Error = D::Err;
        fn try_forward(
            &self,
            x: Tensor<(usize, Const<128>), E, D>,
        ) -> Result<Self::Output, D::Err> {
            self.both
                .try_forward(self.stack.try_forward(self.res.try_forward(x)?)?)
        }
    }

    #[test]
    fn layers_written_inside_wrappers_are_factorized() {
        let dev = Dev::seed_from_u64(5);
        let mut model = Inline::<f32, Dev> {
            res: Residual((build(&dev), ReLU, build(&dev))),
            stack: Repeated {
                modules: (0..2).map(|_| (build(&dev), ReLU)).collect(),
            },
            both: GeneralizedResidual {
                f: build(&dev),
                r: block(&dev, 32),
            },
        };
        // Rank-32 weights everywhere, so the variant computes the same function.
        set_spectrum(&mut model.res.0 .0, &power_law(32, 0.5));
        set_spectrum(&mut model.res.0 .2, &power_law(32, 0.5));
        for m in &mut model.stack.modules {
            set_spectrum(&mut m.0, &power_law(32, 0.5));
        }
        set_spectrum(&mut model.both.f, &power_law(32, 0.5));
        let (f, report) = model
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        let _: &FactorizedLinear<128, 32, 256, f32, Dev> = &f.res.0 .0;
        let _: &FactorizedLinear<128, 32, 128, f32, Dev> = &f.stack.modules[1].0;
        let _: &FactorizedLinear<128, 32, 128, f32, Dev> = &f.both.f;
        let paths: Vec<&str> = report.layers.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "res.0.0",
                "res.0.2",
                "stack.0.0",
                "stack.1.0",
                "both.f",
                "both.r.up",
                "both.r.down"
            ]
        );
        assert!(report.layers.iter().all(|r| r.status == Status::Replaced));
        let x: Rows = dev.sample_normal_like(&(16, Const));
        let (y0, y1) = (
            model.forward(x.clone()).as_vec(),
            f.forward(x.clone()).as_vec(),
        );
        assert!(rel(&y0, &y1) <= 1e-5, "{}", rel(&y0, &y1));
        // The calibration walks reach inside the wrappers too.
        let (_, report) = model
            .factorize_calibrated(
                &FactorizeConfig::default(),
                Fit::Exact { ridge: 0.0 },
                |m| {
                    m.forward(x.clone());
                },
            )
            .unwrap();
        assert!(report.layers.iter().all(|r| r.nmse.is_some()), "{report}");
    }

    /// A block whose weights have rank `rank` (power-law spectra).
    fn block(dev: &Dev, rank: usize) -> Block<f32, Dev> {
        let mut b = Block {
            up: build(dev),
            act: ReLU,
            down: build(dev),
        };
        set_spectrum(&mut b.up, &power_law(rank, 0.5));
        set_spectrum(&mut b.down, &power_law(rank, 0.5));
        b
    }

    fn stack(dev: &Dev, rank: usize) -> Stack<f32, Dev> {
        let modules = (0..3).map(|_| block(dev, rank)).collect();
        Stack {
            blocks: Repeated { modules },
            head: build(dev),
        }
    }

    #[test]
    fn every_block_is_factorized_under_its_index() {
        let dev = Dev::seed_from_u64(2);
        let model = stack(&dev, 32);
        let (f, report) = model
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        let paths: Vec<&str> = report.layers.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "blocks.0.up",
                "blocks.0.down",
                "blocks.1.up",
                "blocks.1.down",
                "blocks.2.up",
                "blocks.2.down",
                "head"
            ]
        );
        assert!(report.layers[..6]
            .iter()
            .all(|r| r.status == Status::Replaced && r.latent == 32));
        assert_ne!(report.layers[6].status, Status::Replaced);
        // Rank 32 weights: the factorized stack computes the same function.
        let x: Rows = dev.sample_normal_like(&(16, Const));
        let (y0, y1) = (model.forward(x.clone()).as_vec(), f.forward(x).as_vec());
        assert!(rel(&y0, &y1) <= 1e-5, "{}", rel(&y0, &y1));
    }

    #[test]
    fn calibration_fits_the_blocks_in_forward_order() {
        let dev = Dev::seed_from_u64(3);
        let model = stack(&dev, 128);
        let x: Rows = dev.sample_normal_like(&(200, Const));
        let fit = Fit::Exact { ridge: 0.0 };
        let (f, report) = model
            .factorize_calibrated(&FactorizeConfig::default(), fit, |m| {
                m.forward(x.clone());
            })
            .unwrap();
        assert!(
            report.layers[..6].iter().all(|r| r.nmse.is_some()),
            "{report}"
        );
        // Block 1's first layer was fitted on what the refitted block 0 hands it.
        let h = f.blocks.modules[0].forward(x.clone());
        let (expected, _) = FactorizedLinear::<128, 32, 256, f32, Dev>::from_linear_calibrated(
            "blocks.1.up",
            &model.blocks.modules[1].up,
            &h,
            fit,
            &FactorizeConfig::default(),
        )
        .unwrap();
        assert_eq!(
            f.blocks.modules[1].up.first.weight.as_vec(),
            expected.first.weight.as_vec()
        );
    }

    #[test]
    fn residual_wrappers_are_looked_into() {
        let dev = Dev::seed_from_u64(4);
        let model = Wrapped {
            res: Residual(block(&dev, 32)),
            both: GeneralizedResidual {
                f: block(&dev, 32),
                r: block(&dev, 32),
            },
        };
        let (f, report) = model
            .factorize_with_report(&FactorizeConfig::default())
            .unwrap();
        let paths: Vec<&str> = report.layers.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "res.0.up",
                "res.0.down",
                "both.f.up",
                "both.f.down",
                "both.r.up",
                "both.r.down"
            ]
        );
        assert!(report.layers.iter().all(|r| r.status == Status::Replaced));
        let x: Rows = dev.sample_normal_like(&(16, Const));
        let (y0, y1) = (model.forward(x.clone()).as_vec(), f.forward(x).as_vec());
        assert!(rel(&y0, &y1) <= 1e-5, "{}", rel(&y0, &y1));
    }
}

/// The rank as the struct's own const generic: one source, one variant per rank.
#[derive(Factorizable)]
#[factorize(latent_features = R)]
pub struct Ranked<const R: usize, E: Dtype, D: Device<E>> {
    pub up: Linear<512, 1024, E, D>,
    #[factorize(latent = 16)]
    pub own: Linear<512, 512, E, D>,
    #[factorize(skip)]
    pub kept: Linear<512, 512, E, D>,
}

fn ranked<const R: usize>(dev: &Dev) -> Ranked<R, f32, Dev> {
    Ranked {
        up: build(dev),
        own: build(dev),
        kept: build(dev),
    }
}

#[test]
fn a_const_generic_rank_gives_one_variant_per_rank() {
    let dev: Dev = Default::default();
    let (small, report) = ranked::<32>(&dev)
        .factorize_with_report(&FactorizeConfig::default())
        .unwrap();
    let _: &FactorizedLinear<512, 32, 1024, f32, Dev> = &small.up;
    let _: &FactorizedLinear<512, 16, 512, f32, Dev> = &small.own; // the field's own rank
    let _: &Linear<512, 512, f32, Dev> = &small.kept;
    let statuses: Vec<Status> = report.layers.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [Status::Replaced, Status::Replaced, Status::Skipped]
    );
    assert_eq!(report.layers[0].latent, 32);
    let larger = ranked::<200>(&dev)
        .factorize(&FactorizeConfig::default())
        .unwrap();
    let _: &FactorizedLinear<512, 200, 1024, f32, Dev> = &larger.up;
}

/// The training story of `examples/finetune.rs`: a dense model built, trained with Adam through
/// its tape-generic forward, factorized, fine-tuned, saved and loaded.
#[allow(dead_code)]
#[path = "../examples/finetune.rs"]
mod finetune;

#[test]
fn fine_tuning_the_factorized_variant_lowers_its_loss() {
    use finetune::{evaluate, train, Mlp, MlpFactorized, BATCH, TEACHER_GAIN, WIDTH};
    let dev = Cpu::seed_from_u64(7);
    let mut teacher = Mlp::<f32, Cpu>::build(&dev);
    teacher.fc2.weight = teacher.fc2.weight.clone() * TEACHER_GAIN;
    let mut model = Mlp::<f32, Cpu>::build(&dev);
    let (first, last) = train(&dev, &mut model, &teacher, 200, 1e-3).unwrap();
    assert!(last < 0.5 * first, "dense training: {first} → {last}");

    let mut small = model.factorize(&FactorizeConfig::default()).unwrap();
    let _: &FactorizedLinear<WIDTH, 48, 1024, f32, Cpu> = &small.fc1;
    let before = evaluate(&dev, &small, &teacher, 8);
    let dense = evaluate(&dev, &model, &teacher, 8);
    assert!(
        before > dense,
        "rank 48 of a trained layer loses something: {before} vs {dense}"
    );
    train(&dev, &mut small, &teacher, 100, 3e-4).unwrap();
    let after = evaluate(&dev, &small, &teacher, 8);
    assert!(
        after < 0.95 * before,
        "fine-tuning: held-out loss {before} → {after}"
    );

    let dir = std::env::temp_dir().join(format!("factorize-finetune-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (dense_path, small_path) = (dir.join("dense.safetensors"), dir.join("small.safetensors"));
    model.save_safetensors(&dense_path).unwrap();
    small.save_safetensors(&small_path).unwrap();
    let mut dense_again = Mlp::<f32, Cpu>::build(&dev);
    dense_again.load_safetensors(&dense_path).unwrap();
    let mut deployed = MlpFactorized::<f32, Cpu>::build(&dev);
    deployed.load_safetensors(&small_path).unwrap();
    let x: Tensor<Rank2<BATCH, WIDTH>, f32, Cpu> = dev.sample_normal();
    assert_eq!(
        model.forward(x.clone()).as_vec(),
        dense_again.forward(x.clone()).as_vec()
    );
    assert_eq!(
        small.forward(x.clone()).as_vec(),
        deployed.forward(x).as_vec()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `distill`: the factorized variant trained towards the dense model's outputs.
mod distillation {
    use super::finetune::{Mlp, MlpFactorized, BATCH, TEACHER_GAIN, WIDTH};
    use dfdx::prelude::*;
    use factorize_runtime::distill::{distill, DistillConfig, DistillLog, Schedule, Trained};
    use factorize_runtime::{Factorizable, FactorizeConfig, FactorizeError};

    type Input = Tensor<Rank2<BATCH, WIDTH>, f32, Cpu>;
    type Batches = Vec<(Input, Tensor<Rank2<BATCH, 16>, f32, Cpu>)>;

    /// A dense model with a strong hidden branch, its SVD variant, and `n` batches of its
    /// inputs and outputs.
    fn setup(dev: &Cpu, n: usize) -> (Mlp<f32, Cpu>, MlpFactorized<f32, Cpu>, Batches) {
        let mut dense = Mlp::<f32, Cpu>::build(dev);
        dense.fc2.weight = dense.fc2.weight.clone() * TEACHER_GAIN;
        let small = dense.factorize(&FactorizeConfig::default()).unwrap();
        let batches = (0..n)
            .map(|_| {
                let x: Input = dev.sample_normal();
                let y = dense.forward(x.clone());
                (x, y)
            })
            .collect();
        (dense, small, batches)
    }

    fn run(
        small: &mut MlpFactorized<f32, Cpu>,
        batches: &Batches,
        cfg: &DistillConfig,
    ) -> Result<DistillLog, FactorizeError> {
        distill(
            small,
            batches,
            cfg,
            |m: &MlpFactorized<f32, Cpu>, x, grads| m.try_forward(x.clone().traced(grads)),
        )
    }

    fn error(model: &MlpFactorized<f32, Cpu>, batches: &Batches) -> f32 {
        let total: f32 = (batches.iter())
            .map(|(x, y)| mse_loss(model.forward(x.clone()), y.clone()).array())
            .sum();
        total / batches.len() as f32
    }

    #[test]
    fn training_the_factors_lowers_held_out_error_and_leaves_the_rest() {
        let dev = Cpu::seed_from_u64(11);
        let (_, mut small, batches) = setup(&dev, 12);
        let (train, held_out) = batches.split_at(8);
        let (train, held_out) = (train.to_vec(), held_out.to_vec());
        let before = small.clone();
        let cfg = DistillConfig {
            steps: 60,
            learning_rate: 1e-3,
            progress: false,
            ..Default::default()
        };
        let log = run(&mut small, &train, &cfg).unwrap();
        assert_eq!(log.losses.len(), 60);
        assert!(
            log.last(8) < 0.5 * log.first(8),
            "training loss {} → {}",
            log.first(8),
            log.last(8)
        );
        let (was, is) = (error(&before, &held_out), error(&small, &held_out));
        assert!(is < 0.7 * was, "held-out error {was} → {is}");
        // The factors moved; the dense head (too narrow to factorize) did not.
        assert_ne!(
            small.fc1.first.weight.as_vec(),
            before.fc1.first.weight.as_vec()
        );
        assert_ne!(
            small.fc2.second.bias.as_vec(),
            before.fc2.second.bias.as_vec()
        );
        assert_eq!(small.head.weight.as_vec(), before.head.weight.as_vec());
        assert_eq!(small.head.bias.as_vec(), before.head.bias.as_vec());

        // Training everything moves the head too.
        let mut all = before.clone();
        let cfg = DistillConfig {
            trained: Trained::All,
            steps: 5,
            ..cfg
        };
        run(&mut all, &train, &cfg).unwrap();
        assert_ne!(all.head.weight.as_vec(), before.head.weight.as_vec());
    }

    #[test]
    fn a_failed_distillation_leaves_the_model_as_it_was() {
        let dev = Cpu::seed_from_u64(12);
        let (_, mut small, batches) = setup(&dev, 2);
        let x: Input = dev.sample_normal();
        let output = small.forward(x.clone()).as_vec();
        let diverging = DistillConfig {
            steps: 40,
            learning_rate: 1e12,
            progress: false,
            ..Default::default()
        };
        let err = run(&mut small, &batches, &diverging).unwrap_err();
        assert!(err.to_string().contains("lower the learning rate"), "{err}");
        assert_eq!(small.forward(x.clone()).as_vec(), output);
        let err = run(&mut small, &Vec::new(), &DistillConfig::default()).unwrap_err();
        let message = err.to_string();
        let expected = "layer `<model>`: invalid parameter `batches`: no batch";
        assert!(message.starts_with(expected), "{message}");
        let backwards = DistillConfig {
            learning_rate: -1e-3,
            ..diverging
        };
        let err = run(&mut small, &batches, &backwards).unwrap_err();
        assert!(err.to_string().contains("`learning_rate`"), "{err}");
        let all_warmup = DistillConfig {
            schedule: Schedule::Cosine { warmup: 40 },
            learning_rate: 1e-3,
            ..diverging
        };
        let err = run(&mut small, &batches, &all_warmup).unwrap_err();
        assert!(err.to_string().contains("`schedule`"), "{err}");
        assert_eq!(small.forward(x).as_vec(), output);
    }

    #[test]
    fn the_schedule_sets_each_steps_learning_rate() {
        let dev = Cpu::seed_from_u64(13);
        let (_, small, batches) = setup(&dev, 4);
        let peak = 1e-3;
        let losses = |learning_rate, schedule| {
            let cfg = DistillConfig {
                steps: 10,
                learning_rate,
                schedule,
                progress: false,
                ..Default::default()
            };
            run(&mut small.clone(), &batches, &cfg).unwrap().losses
        };
        let cosine = losses(peak, Schedule::Cosine { warmup: 4 });
        // The warm-up's first step takes a quarter of the peak, as a constant quarter does
        // (each step's loss is measured before its update)...
        let quarter = losses(peak / 4.0, Schedule::Constant);
        assert_eq!(cosine[..2], quarter[..2]);
        // ...and its second half of it.
        assert_ne!(cosine[2], quarter[2]);
        let full = losses(peak, Schedule::Constant);
        assert_ne!(cosine[1], full[1]);
    }
}

mod seq {
    // As dfdx users write it: the prelude's builders.
    use dfdx::prelude::*;
    use factorize_runtime::sequential;

    sequential! {
        /// dfdx's most common model shape: a tuple of builders, with a nested tuple.
        #[factorize(latent_features = 64, min_features = 300)]
        pub type SeqMlp = (
            Linear<512, 1024>,
            ReLU,
            (Linear<1024, 512>, ReLU),
            Linear<512, 260>,
            LayerNorm1D<260>,
            Residual<(Linear<260, 520>, ReLU, Linear<520, 260>)>,
        );
    }
}
use seq::{SeqMlp, SeqMlpFactorized};

#[test]
fn a_sequential_model_is_factorized_by_the_rule() {
    let dev: Dev = Default::default();
    let mut model = dev.build_module::<SeqMlp, f32>();
    set_spectrum(&mut model.0, &power_law(512, 1.0));
    set_spectrum(&mut (model.2).0, &power_law(512, 1.0));
    let before = model.clone();
    let (small, report) = model
        .factorize_as_with_report::<SeqMlpFactorized>(&FactorizeConfig::default())
        .unwrap();
    // The rule, at compile time: 64 saves on the 512-wide layers; 260 < min_features keeps the last.
    let _: &FactorizedLinear<512, 64, 1024, f32, Dev> = &small.0;
    let _: &FactorizedLinear<1024, 64, 512, f32, Dev> = &(small.2).0;
    let _: &dfdx::nn::modules::Linear<512, 260, f32, Dev> = &small.3;
    const NARROW: Status = Status::TooNarrow {
        width: 260,
        min: 300,
    };
    let rows: Vec<(&str, Status)> = report
        .layers
        .iter()
        .map(|r| (r.path.as_str(), r.status))
        .collect();
    assert_eq!(
        rows,
        [
            ("0", Status::Replaced),
            ("2.0", Status::Replaced),
            ("3", NARROW),
            ("5.0.0", NARROW),
            ("5.0.2", NARROW),
        ]
    );
    // Each replaced layer is at its Eckart–Young optimum.
    let optimum = factorize_runtime::synthetic::optimal_relative_error(&power_law(512, 1.0), 64);
    for row in &report.layers[..2] {
        let err = row.relative_error.unwrap();
        assert!(
            (err - optimum).abs() < 1e-4,
            "{}: {err} vs {optimum}",
            row.path
        );
    }
    // The source is untouched, the kept and carried layers are copies, and the variant runs
    // as a dfdx tuple, in sequence.
    assert_eq!(model.0.weight.as_vec(), before.0.weight.as_vec());
    assert_eq!(small.3.weight.as_vec(), model.3.weight.as_vec());
    assert_eq!(small.4.gamma.as_vec(), model.4.gamma.as_vec());
    let x: Tensor<Rank2<4, 512>, f32, Dev> = dev.sample_normal();
    let (dense_y, small_y) = (model.forward(x.clone()), small.forward(x));
    assert!(rel(&small_y.as_vec(), &dense_y.as_vec()) < 0.5);

    // The variant is a builder: deployment builds it and loads the saved weights.
    let dir = std::env::temp_dir().join(format!("factorize-seq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seq.safetensors");
    small.save_safetensors(&path).unwrap();
    let mut deployed = dev.build_module::<SeqMlpFactorized, f32>();
    deployed.load_safetensors(&path).unwrap();
    let x: Tensor<Rank2<4, 512>, f32, Dev> = dev.sample_normal();
    assert_eq!(
        small.forward(x.clone()).as_vec(),
        deployed.forward(x).as_vec()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_sequential_model_error_names_the_layer_and_leaves_the_model_as_it_was() {
    let dev: Dev = Default::default();
    let mut model = dev.build_module::<SeqMlp, f32>();
    let mut w = (model.2).0.weight.as_vec();
    w[5] = f32::INFINITY;
    (model.2).0.weight.copy_from(&w);
    let snapshot = model.0.weight.as_vec();
    let e = model
        .factorize_as::<SeqMlpFactorized>(&FactorizeConfig::default())
        .unwrap_err();
    assert!(
        matches!(e, FactorizeError::NonFinite { ref layer, .. } if layer == "2.0"),
        "{e}"
    );
    assert_eq!(model.0.weight.as_vec(), snapshot);
}

/// Models written before dfdx 0.12 use the deprecated `GeLU` (= `FastGeLU`): carried over.
#[test]
#[allow(deprecated)]
fn the_deprecated_gelu_is_carried_over() {
    use dfdx::nn::modules::GeLU;
    let carried: GeLU = GeLU.factorize(&FactorizeConfig::default()).unwrap();
    let dev: Dev = Default::default();
    let x: Tensor<Rank1<4>, f32, Dev> = dev.sample_normal();
    assert_eq!(carried.forward(x.clone()).array(), GeLU.forward(x).array());
}

/// Every dfdx module without a `Linear` inside is carried over, a learned tensor included: the
/// variant holds the same values, builds, and counts the same parameters but the pair's.
#[derive(Factorizable, TensorCollection)]
pub struct CarriedOver<E: Dtype, D: Device<E>> {
    pub fc: Linear<512, 512, E, D>,
    pub scale: Tensor<Rank1<512>, E, D>,
    pub bn: dfdx::nn::modules::BatchNorm2D<3, E, D>,
    pub bias: dfdx::nn::modules::Bias2D<3, E, D>,
    pub prelu: dfdx::nn::prelu::PReLU<E, D>,
    pub prelu_1d: dfdx::nn::prelu::PReLU1D<Const<4>, E, D>,
    pub log_softmax: dfdx::nn::modules::LogSoftmax,
}

#[test]
fn modules_without_linears_are_carried_over() {
    let dev: Dev = Default::default();
    let mut model = CarriedOver::<f32, Dev>::build(&dev);
    model.scale = dev.sample_normal();
    model.prelu_1d.a = dev.sample_normal();
    let small = model.factorize(&FactorizeConfig::default()).unwrap();
    let _: &FactorizedLinear<512, 128, 512, f32, Dev> = &small.fc;
    assert_eq!(small.scale.array(), model.scale.array());
    assert_eq!(small.prelu_1d.a.array(), model.prelu_1d.a.array());
    assert_eq!(small.bn.running_var.array(), model.bn.running_var.array());
    let pair = 512 * 128 + 128 * 512 + 512;
    assert_eq!(
        small.num_trainable_params(),
        model.num_trainable_params() - (512 * 512 + 512) + pair
    );
    let rebuilt = CarriedOverFactorized::<f32, Dev>::build(&dev);
    assert_eq!(rebuilt.num_trainable_params(), small.num_trainable_params());
}
