// A mistake in the attributes is one error, however much code uses the model: the derive
// emits a fallback impl, so `model.factorize(..)` and `#[mirror]` add none of their own.
use dfdx::nn::modules::{Linear, ReLU};
use dfdx::prelude::*;
use factorize_runtime::prelude::*;

#[derive(Factorizable)]
#[factorize(latent_featurez = 64)]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<512, 512, E, D>,
    pub act: ReLU,
}

#[mirror]
impl<E: Dtype, D: Device<E>> Module<Tensor<(usize, Const<512>), E, D>> for Model<E, D> {
    type Output = Tensor<(usize, Const<512>), E, D>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(usize, Const<512>), E, D>) -> Result<Self::Output, D::Err> {
        self.act.try_forward(self.fc.try_forward(x)?)
    }
}

fn main() {
    let dev: Cpu = Default::default();
    let model = Model::<f32, Cpu> { fc: BuildModule::build(&dev), act: ReLU };
    let _x: Option<ModelFactorized<f32, Cpu>> = None;
    let small = model.factorize(&FactorizeConfig::default()).unwrap();
    let _ = small.forward(dev.zeros_like(&(3, Const::<512>)));
}
