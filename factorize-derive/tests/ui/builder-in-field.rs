// dfdx's builder form (`Linear<128, 256>`, as `dev.build_module` takes) inside a struct field:
// one error at each builder, with the module's form.
use dfdx::nn::builders::{LayerNorm1D, Linear, ReLU};
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>> {
    pub res: Residual<(Linear<128, 256>, ReLU, Linear<256, 128>)>,
    pub norm: LayerNorm1D<128>,
    pub head: dfdx::nn::modules::Linear<128, 10, E, D>,
}

fn main() {}
