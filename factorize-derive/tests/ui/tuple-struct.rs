use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>>(pub Linear<512, 512, E, D>);

fn main() {}
