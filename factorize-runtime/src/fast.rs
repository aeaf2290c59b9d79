//! [`FastForward`]: inference forwards on dfdx's `Cpu` for the modules that dominate a
//! transformer, with the same results as dfdx's own (to float rounding).
//!
//! dfdx 0.13's CPU kernels for these are slow at transformer sizes: its GEMM (gemm 0.15) runs at
//! about half of faer's speed on `rows × 384 × 1536` products, and its element-wise ops
//! (erf GELU, LayerNorm) are single-threaded with a libm call per element. For
//! tape-free `Cpu` tensors in f32 or f64 of the shapes below, `try_forward_fast` takes faer's
//! GEMM and multi-threaded row kernels instead; any other tensor (another device or dtype, a
//! tape that records for training, another shape) takes the module's own `try_forward`, so a
//! model written with it trains and runs anywhere dfdx does.
//!
//! | module | fast for |
//! |---|---|
//! | `Linear<I, O>`, [`FactorizedLinear`] | `Tensor<(usize, Const<I>)>` |
//! | `LayerNorm1D<M>` | `Tensor<(usize, Const<M>)>` |
//! | `AccurateGeLU` (erf form) | any shape |
//!
//! ```
//! use dfdx::prelude::*;
//! use factorize_runtime::fast::FastForward;
//!
//! let dev: Cpu = Default::default();
//! let fc = dev.build_module::<Linear<8, 4>, f32>();
//! let x: Tensor<(usize, Const<8>), f32, Cpu> = dev.sample_normal_like(&(5, Const));
//! let fast = fc.forward_fast(x.clone()).as_vec();
//! let slow = fc.forward(x).as_vec();
//! assert!(fast.iter().zip(&slow).all(|(a, b)| (a - b).abs() < 1e-5));
//! ```
//!
//! The route is chosen by type at run time (stable Rust has no specialisation): the input is
//! looked at as a tape-free `Tensor<_, f32 | f64, Cpu>` through [`Any`], one type-id comparison.

use std::any::Any;

use dfdx::nn::modules::{AccurateGeLU, LayerNorm1D, Linear};
use dfdx::prelude::*;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::calibrate::RecordInput;
use crate::conv::host::Element;
use crate::FactorizedLinear;

/// An inference forward with the same result as `try_forward`, faster on dfdx's `Cpu` (see the
/// [module docs](self) for which inputs take the fast route).
pub trait FastForward<T>: Module<T> {
    /// The forward; errors as `try_forward`.
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error>;

    /// The forward, panicking on a device error as dfdx's `forward` does.
    fn forward_fast(&self, x: T) -> Self::Output
    where
        Self::Error: std::fmt::Debug,
    {
        self.try_forward_fast(x).unwrap()
    }
}

/// Fewest rows per GEMM block: below this a block's packing costs more than it parallelises.
const GEMM_MIN_ROWS: usize = 32;

/// Rows processed per parallel task in the row kernels: enough work to amortise a rayon task.
const ROWS_PER_TASK: usize = 16;

/// The element types of the fast route, with their erf.
trait Fast: Element + Dtype + num_traits::Float {
    fn error_function(self) -> Self;
}

impl Fast for f64 {
    fn error_function(self) -> f64 {
        libm::erf(self)
    }
}

impl Fast for f32 {
    /// XLA's rational approximation of erf on `[-4, 4]` (erf is ±1 to f32 precision beyond):
    /// no exp and no branch, so it vectorises. Error below 1e-6 of libm's `erf` (tested).
    fn error_function(self) -> f32 {
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = -2.726_142_3e-10_f32;
        p = p * x2 + 2.770_681_4e-8;
        p = p * x2 - 2.101_024e-6;
        p = p * x2 - 5.692_506_4e-5;
        p = p * x2 - 7.349_906_3e-4;
        p = p * x2 - 2.954_6e-3;
        p = p * x2 - 1.609_603_3e-2;
        let mut q = -1.456_607_2e-5_f32;
        q = q * x2 - 2.133_740_6e-4;
        q = q * x2 - 1.682_827e-3;
        q = q * x2 - 7.373_329e-3;
        q = q * x2 - 1.426_474e-2;
        x * p / q
    }
}

/// `input` as a tape-free `Cpu` tensor of `F` and shape `S`, if it is one.
fn as_cpu<S: Shape, F: Fast, T: 'static>(input: &T) -> Option<&Tensor<S, F, Cpu>> {
    (input as &dyn Any).downcast_ref::<Tensor<S, F, Cpu>>()
}

/// The values of `t`, row-major: one memcpy of its buffer once it is contiguous (a no-op for
/// the usual tensors; dfdx's `as_vec` walks the strides at ~2 ns an element instead).
fn host<S: Shape, F: Fast>(t: &Tensor<S, F, Cpu>) -> Vec<F> {
    let t = t.clone().contiguous();
    let mut v = vec![F::default(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// `value` as `Out`, which it is whenever the fast route was taken.
fn cast<Out: 'static, V: 'static>(value: V) -> Option<Out> {
    let boxed: Box<dyn Any> = Box::new(value);
    boxed.downcast::<Out>().ok().map(|b| *b)
}

/// Runs `f32` then `f64` through `route`, which returns `None` when the input is not of that
/// element type.
macro_rules! routes {
    ($x:expr, $route:ident [$($dim:ident),*] $(, $arg:expr)*) => {
        $route::<f32, _, _, $($dim),*>(&$x $(, $arg)*)
            .or_else(|| $route::<f64, _, _, $($dim),*>(&$x $(, $arg)*))
    };
}

/// `y = x·Wᵀ (+ b)` on host buffers: `x` `[rows, in]`, `w` `[out, in]`, row-major.
fn gemm<F: Fast>(x: &[F], w: &[F], bias: Option<&[F]>, rows: usize, out: usize) -> Vec<F> {
    let inner = w.len() / out;
    let mut y = match bias {
        Some(b) => b.repeat(rows),
        None => vec![F::default(); rows * out],
    };
    let accum = if bias.is_some() {
        Accum::Add
    } else {
        Accum::Replace
    };
    let w = MatRef::from_row_major_slice(w, out, inner).transpose();
    // Blocks of rows on rayon's threads, each a sequential faer GEMM: faer's own parallel
    // GEMM leaves its workers spinning after it returns, which on a small machine starves the
    // row kernels that follow (in profiles of the MiniLM forward).
    let block = rows
        .div_ceil(rayon::current_num_threads())
        .max(GEMM_MIN_ROWS);
    y.par_chunks_mut(block * out)
        .zip(x.par_chunks(block * inner))
        .for_each(|(y, x)| {
            let r = x.len() / inner;
            matmul(
                MatMut::from_row_major_slice_mut(y, r, out),
                accum,
                MatRef::from_row_major_slice(x, r, inner),
                w,
                F::one(),
                Par::Seq,
            );
        });
    y
}

fn linear_route<F: Fast, X: 'static, Out: 'static, const I: usize, const O: usize>(
    x: &X,
    weight: &dyn Any,
    bias: &dyn Any,
) -> Option<Out> {
    let x = as_cpu::<(usize, Const<I>), F, X>(x)?;
    let w = weight.downcast_ref::<Tensor<Rank2<O, I>, F, Cpu>>()?;
    let b = bias.downcast_ref::<Tensor<Rank1<O>, F, Cpu>>()?;
    let rows = x.shape().0;
    let y = gemm(&host(x), &host(w), Some(&host(b)), rows, O);
    cast(x.device().tensor_from_vec(y, (rows, Const::<O>)))
}

impl<const I: usize, const O: usize, E: Dtype, D: Device<E>, T: 'static> FastForward<T>
    for Linear<I, O, E, D>
where
    Self: Module<T>,
    <Self as Module<T>>::Output: 'static,
{
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error> {
        match routes!(x, linear_route [I, O], &self.weight as &dyn Any, &self.bias as &dyn Any) {
            Some(y) => Ok(y),
            None => self.try_forward(x),
        }
    }
}

fn factorized_route<
    F: Fast,
    X: 'static,
    Out: 'static,
    const I: usize,
    const L: usize,
    const O: usize,
>(
    x: &X,
    first: &dyn Any,
    second: &dyn Any,
    bias: &dyn Any,
) -> Option<Out> {
    let x = as_cpu::<(usize, Const<I>), F, X>(x)?;
    let a = first.downcast_ref::<Tensor<Rank2<L, I>, F, Cpu>>()?;
    let b = second.downcast_ref::<Tensor<Rank2<O, L>, F, Cpu>>()?;
    let bias = bias.downcast_ref::<Tensor<Rank1<O>, F, Cpu>>()?;
    let rows = x.shape().0;
    let latent = gemm(&host(x), &host(a), None, rows, L);
    let y = gemm(&latent, &host(b), Some(&host(bias)), rows, O);
    cast(x.device().tensor_from_vec(y, (rows, Const::<O>)))
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>, T> FastForward<T>
    for FactorizedLinear<I, L, O, E, D>
where
    T: RecordInput + 'static,
    Self: Module<T>,
    <Self as Module<T>>::Output: 'static,
{
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error> {
        let routed = {
            let (first, second) = (
                &self.first.weight as &dyn Any,
                &self.second.weight as &dyn Any,
            );
            let bias = &self.second.bias as &dyn Any;
            routes!(x, factorized_route [I, L, O], first, second, bias)
        };
        match routed {
            Some(y) => {
                // As the dfdx route does: a no-op unless a calibration pass is recording.
                x.record(self as *const Self as usize);
                Ok(y)
            }
            None => self.try_forward(x),
        }
    }
}

/// `f` on every row of `values` (`rows × width`), rows in parallel, compiled for the widest SIMD
/// the CPU has so that the loops in `f` vectorise.
fn per_row<F: Fast>(values: &mut [F], width: usize, f: impl Fn(&mut [F]) + Sync) {
    values
        .par_chunks_mut(width * ROWS_PER_TASK)
        .for_each(|block| {
            pulp::Arch::new().dispatch(|| block.chunks_exact_mut(width).for_each(&f))
        });
}

fn layer_norm_route<F: Fast, X: 'static, Out: 'static, const M: usize>(
    x: &X,
    gamma: &dyn Any,
    beta: &dyn Any,
    epsilon: f64,
) -> Option<Out> {
    let x = as_cpu::<(usize, Const<M>), F, X>(x)?;
    let gamma = host(gamma.downcast_ref::<Tensor<Rank1<M>, F, Cpu>>()?);
    let beta = host(beta.downcast_ref::<Tensor<Rank1<M>, F, Cpu>>()?);
    let eps = F::from(epsilon)?;
    let width = F::from(M)?;
    let mut v = host(x);
    per_row(&mut v, M, |row| {
        let mean = row.iter().fold(F::zero(), |s, &a| s + a) / width;
        let var = row
            .iter()
            .fold(F::zero(), |s, &a| s + (a - mean) * (a - mean))
            / width;
        let scale = (var + eps).sqrt().recip();
        for ((a, &g), &b) in row.iter_mut().zip(&gamma).zip(&beta) {
            *a = (*a - mean) * scale * g + b;
        }
    });
    cast(x.device().tensor_from_vec(v, *x.shape()))
}

impl<const M: usize, E: Dtype, D: Device<E>, T: 'static> FastForward<T> for LayerNorm1D<M, E, D>
where
    Self: Module<T>,
    <Self as Module<T>>::Output: 'static,
{
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error> {
        let (gamma, beta) = (&self.gamma as &dyn Any, &self.beta as &dyn Any);
        match routes!(x, layer_norm_route[M], gamma, beta, self.epsilon) {
            Some(y) => Ok(y),
            None => self.try_forward(x),
        }
    }
}

/// The element-wise modules, on any shape: the input's buffer, changed in place.
fn rows_route<F: Fast, S: Shape, Out: 'static>(
    x: &Tensor<S, F, Cpu>,
    width: usize,
    f: impl Fn(&mut [F]) + Sync,
) -> Option<Out> {
    let mut v = host(x);
    per_row(&mut v, width.max(1), f);
    cast(x.device().tensor_from_vec(v, *x.shape()))
}

fn gelu_route<F: Fast, S: Shape, Out: 'static>(x: &dyn Any) -> Option<Out> {
    let x = x.downcast_ref::<Tensor<S, F, Cpu>>()?;
    let half = F::from(0.5)?;
    let inv_sqrt2 = F::from(std::f64::consts::FRAC_1_SQRT_2)?;
    let width = x.shape().concrete().into_iter().last().unwrap_or(1);
    rows_route(x, width, |row| {
        for a in row {
            *a = half * *a * (F::one() + (*a * inv_sqrt2).error_function());
        }
    })
}

impl<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D> + 'static> FastForward<Tensor<S, E, D, T>>
    for AccurateGeLU
{
    fn try_forward_fast(&self, x: Tensor<S, E, D, T>) -> Result<Tensor<S, E, D, T>, D::Err> {
        let any = &x as &dyn Any;
        match gelu_route::<f32, S, _>(any).or_else(|| gelu_route::<f64, S, _>(any)) {
            Some(y) => Ok(y),
            None => self.try_forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dfdx::nn::builders;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst <= tol, "max difference {worst} > {tol}");
    }

    #[test]
    fn f32_erf_is_within_1e6_of_libm() {
        let worst = (-6000..=6000)
            .map(|i| i as f64 / 1000.0)
            .map(|x| ((x as f32).error_function() as f64 - libm::erf(x)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn every_fast_route_equals_dfdx() {
        let dev: Cpu = Default::default();
        let x: Tensor<(usize, Const<24>), f32, Cpu> = dev.sample_normal_like(&(37, Const));
        let fc = dev.build_module::<builders::Linear<24, 40>, f32>();
        close(
            &fc.forward_fast(x.clone()).as_vec(),
            &fc.forward(x.clone()).as_vec(),
            1e-5,
        );
        let ln = {
            let mut ln = dev.build_module::<builders::LayerNorm1D<24>, f32>();
            ln.gamma = dev.sample_normal();
            ln.beta = dev.sample_normal();
            ln
        };
        close(
            &ln.forward_fast(x.clone()).as_vec(),
            &ln.forward(x.clone()).as_vec(),
            1e-5,
        );
        let big = x.clone() * 3.0;
        close(
            &AccurateGeLU.forward_fast(big.clone()).as_vec(),
            &AccurateGeLU.forward(big.clone()).as_vec(),
            2e-6,
        );
        let small: FactorizedLinear<24, 6, 40, f32, Cpu> =
            FactorizedLinear::from_linear(&fc, &crate::FactorizeConfig::default()).unwrap();
        close(
            &small.forward_fast(x.clone()).as_vec(),
            &small.forward(x.clone()).as_vec(),
            1e-5,
        );
        // f64 takes the fast route too.
        let x64: Tensor<(usize, Const<24>), f64, Cpu> = dev.sample_normal_like(&(9, Const));
        let fc64 = dev.build_module::<builders::Linear<24, 40>, f64>();
        let (a, b) = (
            fc64.forward_fast(x64.clone()).as_vec(),
            fc64.forward(x64).as_vec(),
        );
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-12));
    }

    #[test]
    fn a_recording_tape_takes_dfdx_route_and_gets_gradients() {
        let dev: Cpu = Default::default();
        let fc = dev.build_module::<builders::Linear<4, 3>, f32>();
        let x: Tensor<(usize, Const<4>), f32, Cpu> = dev.sample_normal_like(&(2, Const));
        let grads = fc.alloc_grads();
        let y = fc.forward_fast(x.traced(grads));
        let g = y.sum().backward();
        assert!(g.get(&fc.weight).as_vec().iter().any(|v| *v != 0.0));
    }
}
