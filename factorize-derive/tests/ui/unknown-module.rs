use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

pub struct Custom;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<512, 512, E, D>,
    pub custom: Custom,
}

fn main() {}
