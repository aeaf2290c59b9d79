use dfdx::nn::modules::{LayerNorm1D, Linear, ReLU};
use dfdx::prelude::*;
use factorize_runtime::{mirror, Factorizable, FactorizeConfig, FactorizedLinear, Status};

const D_MODEL: usize = 512;
const D_FF: usize = 1024;

#[derive(Factorizable)]
pub struct Ffn<E: Dtype, D: Device<E>> {
    pub up: Linear<D_MODEL, D_FF, E, D>,
    pub act: ReLU,
    pub down: Linear<D_FF, { D_MODEL }, E, D>,
}

#[mirror]
impl<E: Dtype, D: Device<E>, B: Dim> Module<Tensor<(B, Const<D_MODEL>), E, D>> for Ffn<E, D> {
    type Output = Tensor<(B, Const<D_MODEL>), E, D>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, Const<D_MODEL>), E, D>) -> Result<Self::Output, D::Err> {
        let h = self.act.try_forward(self.up.try_forward(x)?)?;
        self.down.try_forward(h)
    }
}

#[derive(Factorizable)]
#[factorize(latent_features = 64)]
pub struct Net<E: Dtype, D: Device<E>> {
    pub ffn: Ffn<E, D>,
    pub norm: LayerNorm1D<D_MODEL, E, D>,
    pub seq: (Linear<512, 512, E, D>, ReLU, Linear<512, 100, E, D>),
    #[factorize(skip)]
    pub skipped: Linear<512, 512, E, D>,
    #[factorize(latent = 300)]
    pub too_big: Linear<512, 512, E, D>,
}

#[derive(Factorizable)]
pub struct Generic<const N: usize, E: Dtype, D: Device<E>> {
    #[factorize(latent = 64)]
    pub fc: Linear<N, N, E, D>,
}

#[test]
fn it_works() {
    let dev: Cpu = Default::default();
    let ffn = Ffn::<f32, Cpu> {
        up: BuildModule::build(&dev),
        act: ReLU,
        down: BuildModule::build(&dev),
    };
    let (f, report) = ffn
        .factorize_with_report(&FactorizeConfig::default())
        .unwrap();
    println!("{report}");
    let _: &FactorizedLinear<512, 128, 1024, f32, Cpu> = &f.up;
    let x: Tensor<Rank2<4, 512>, f32, Cpu> = dev.sample_normal();
    let _y: Tensor<Rank2<4, 512>, f32, Cpu> = f.forward(x);
    let g = FfnFactorized::<f32, Cpu>::build(&dev);
    assert_eq!(g.num_trainable_params(), f.num_trainable_params());

    let net = Net::<f32, Cpu> {
        ffn,
        norm: BuildModule::build(&dev),
        seq: BuildModule::build(&dev),
        skipped: BuildModule::build(&dev),
        too_big: BuildModule::build(&dev),
    };
    let (n, report) = net
        .factorize_with_report(&FactorizeConfig::default())
        .unwrap();
    println!("{report}");
    let _: &FactorizedLinear<512, 64, 512, f32, Cpu> = &n.seq.0;
    let _: &Linear<512, 100, f32, Cpu> = &n.seq.2;
    let _: &Linear<512, 512, f32, Cpu> = &n.too_big;
    assert_eq!(report.layers.len(), 6);
    assert_eq!(report.layers[4].status, Status::Skipped);

    let gm = Generic::<512, f32, Cpu> {
        fc: BuildModule::build(&dev),
    };
    let gf = gm.factorize(&FactorizeConfig::default()).unwrap();
    let _: &FactorizedLinear<512, 64, 512, f32, Cpu> = &gf.fc;
}
