use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<512, 512, E, D>,
}

fn main() {
    let dev: Cpu = Default::default();
    let m = Model::<f32, Cpu> { fc: BuildModule::build(&dev) };
    let f = m.factorize(&factorize_runtime::FactorizeConfig::default()).unwrap();
    let x: Tensor<Rank2<4, 384>, f32, Cpu> = dev.zeros();
    let _ = f.fc.forward(x);
}
