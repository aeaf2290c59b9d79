// A module generic over dtype and device that is not `Factorizable`, in a tuple and alone, in
// a struct with a const-generic rank, then used: one error, at the first field that holds it.
use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::{Factorizable, FactorizeConfig};

pub struct Custom<E: Dtype, D: Device<E>> {
    pub scale: Tensor<Rank1<512>, E, D>,
}

#[derive(Factorizable)]
pub struct Model<const R: usize, E: Dtype, D: Device<E>> {
    #[factorize(latent = R)]
    pub fc: Linear<512, 512, E, D>,
    pub block: (Linear<512, 512, E, D>, Custom<E, D>),
    pub again: Custom<E, D>,
}

fn use_it(model: &Model<64, f32, Cpu>) -> ModelFactorized<64, f32, Cpu> {
    model.factorize(&FactorizeConfig::default()).unwrap()
}

fn main() {
    let _ = use_it;
}
