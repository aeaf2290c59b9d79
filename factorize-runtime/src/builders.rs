//! Builder types, as in `dfdx::nn::builders`: `dev.build_module::<M, E>()` builds the layer `M`
//! names on `dev` with dfdx's (PyTorch's) default init, alone or inside a dfdx tuple.
//!
//! ```
//! use dfdx::prelude::*;
//! use factorize_runtime::builders::{Conv2D, FactorizedConv2D, FactorizedLinear};
//! let dev: Cpu = Default::default();
//! let linear = dev.build_module::<FactorizedLinear<64, 8, 32>, f32>();
//! let y = linear.forward(dev.zeros::<Rank2<2, 64>>());
//! assert_eq!(y.shape(), &(Const::<2>, Const::<32>));
//! // A 3×3 stem then its factorized 3×3 (stride, padding, dilation default to 1, 0, 1).
//! let convs = dev.build_module::<(Conv2D<3, 16, 3, 1, 1>, FactorizedConv2D<16, 4, 16, 3, 1, 1>), f32>();
//! let z = convs.forward(dev.zeros::<Rank4<1, 3, 8, 8>>());
//! assert_eq!(z.shape().concrete(), [1, 16, 8, 8]);
//! ```

use dfdx::prelude::*;

/// Builds a [`crate::FactorizedLinear`] `I → L → O`.
#[derive(Debug, Copy, Clone, Eq, PartialEq)]
pub struct FactorizedLinear<const I: usize, const L: usize, const O: usize>;

/// Builds a [`crate::conv::Conv2D`].
#[derive(Debug, Copy, Clone, Eq, PartialEq)]
pub struct Conv2D<
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize = 1,
    const P: usize = 0,
    const DIL: usize = 1,
>;

/// Builds a [`crate::FactorizedConv2D`].
#[derive(Debug, Copy, Clone, Eq, PartialEq)]
pub struct FactorizedConv2D<
    const I: usize,
    const L: usize,
    const O: usize,
    const K: usize,
    const S: usize = 1,
    const P: usize = 0,
    const DIL: usize = 1,
>;

/// Each builder builds its module through the module's `BuildModule` (from its
/// `TensorCollection`).
macro_rules! builds {
    ($([$($generics:tt)*] $builder:ty => $built:ty;)*) => {$(
        impl<$($generics)*, E: Dtype, D: Device<E>> BuildOnDevice<D, E> for $builder
        where
            $built: BuildModule<D, E>,
        {
            type Built = $built;
            fn try_build_on_device(device: &D) -> Result<Self::Built, D::Err> {
                Self::Built::try_build(device)
            }
        }
    )*};
}

builds! {
    [const I: usize, const L: usize, const O: usize]
        FactorizedLinear<I, L, O> => crate::linear::FactorizedLinear<I, L, O, E, D>;
    [const I: usize, const O: usize, const K: usize, const S: usize, const P: usize, const DIL: usize]
        Conv2D<I, O, K, S, P, DIL> => crate::conv::Conv2D<I, O, K, S, P, DIL, E, D>;
    [
        const I: usize, const L: usize, const O: usize, const K: usize, const S: usize,
        const P: usize, const DIL: usize
    ] FactorizedConv2D<I, L, O, K, S, P, DIL> => crate::factorized_conv::FactorizedConv2D<I, L, O, K, S, P, DIL, E, D>;
}
