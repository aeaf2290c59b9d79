// Both derives on a struct with a field that is neither: one error from each, both at the
// field, and none from the use of the model.
use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::{Factorizable, TensorCollection};

pub struct Custom;

#[derive(Factorizable, TensorCollection)]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<512, 512, E, D>,
    pub custom: Custom,
}

fn main() {
    let dev: Cpu = Default::default();
    let _m = Model::<f32, Cpu>::build(&dev);
}
