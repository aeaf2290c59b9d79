//! [`FastForward`]: inference forwards on dfdx's `Cpu` for the modules that dominate a
//! transformer, with the same results as dfdx's own (to float rounding).
//!
//! dfdx 0.13's CPU kernels for these are slow at transformer sizes: its GEMM (gemm 0.15) is
//! well behind faer's on `rows × 384 × 1536` products, and its element-wise ops (erf GELU,
//! LayerNorm) are single-threaded with a libm call per element (numbers in the README). For
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
//! and [`FastLinear`], a `Linear` or [`FactorizedLinear`] with what follows it in a transformer
//! fused into its product (an erf GELU; a residual add and LayerNorm), and [`attention`], a
//! fused multi-head self-attention over padded sentences.
//!
//! A whole post-norm transformer block runs on host buffers from its input to its output with
//! [`try_feed_forward`] and [`self_attention`]: the input is copied once, and the projections,
//! the attention and the hidden activations never become tensors, each of which would cost an
//! allocation and a copy in and out (numbers in `docs/performance.md`).
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
use std::cell::RefCell;

use dfdx::nn::modules::{AccurateGeLU, LayerNorm1D, Linear};
use dfdx::prelude::*;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::calibrate::RecordInput;
use crate::conv::host::Element;
use crate::linear::FactorizedLinear;

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

/// Rows of `N` features: what the fused forwards of [`FastLinear`] take and return.
pub type Rows<const N: usize, E, D, T = NoneTape> = Tensor<(usize, Const<N>), E, D, T>;

/// A `Linear` of rows (`I` → `O` features, tape `T`), dense or factorized, with the modules that
/// follow it in a transformer fused into its product on the fast route: each GEMM thread applies
/// them to its block of rows while the block is in cache, which saves their own passes over
/// copies of the output (dfdx lends no view of a tensor's buffer, so each op copies). Other
/// inputs take the modules' own `try_forward`s, in order, so the result is the same.
///
/// Implemented by `Linear` and [`FactorizedLinear`] (sealed), and what [`try_feed_forward`] and
/// [`self_attention`] take.
pub trait FastLinear<const I: usize, const O: usize, E: Dtype, D: Device<E>, T: Tape<E, D>>:
    Routed + FastForward<Rows<I, E, D, T>, Output = Rows<O, E, D, T>, Error = D::Err>
{
    /// `gelu(self(x))` with erf GELU ([`AccurateGeLU`]).
    fn try_forward_fast_gelu(&self, x: Rows<I, E, D, T>) -> Result<Rows<O, E, D, T>, D::Err>;

    /// `norm(self(x) + residual)`: a post-norm transformer's output projection.
    fn try_forward_fast_add_norm(
        &self,
        x: Rows<I, E, D, T>,
        residual: Rows<O, E, D>,
        norm: &LayerNorm1D<O, E, D>,
    ) -> Result<Rows<O, E, D, T>, D::Err>;
}

/// What a GEMM thread applies to its block of output rows, on host buffers of `F`.
enum HostEpilogue<'a, F: Fast> {
    Identity,
    Gelu,
    /// Add the same rows of `residual` (the output's shape), then LayerNorm.
    AddNorm {
        residual: &'a [F],
        norm: &'a HostNorm<F>,
    },
}

impl<F: Fast> HostEpilogue<'_, F> {
    /// Applies it to `y`, rows `first..` of the output, `width` values each.
    fn apply(&self, y: &mut [F], first: usize, width: usize) {
        match self {
            Self::Identity => {}
            Self::Gelu => pulp::Arch::new().dispatch(Gelu(y)),
            Self::AddNorm { residual, norm } => {
                norm.apply(y, Some(&residual[first * width..first * width + y.len()]))
            }
        }
    }
}

/// A `LayerNorm1D`'s parameters on the host.
struct HostNorm<F: Fast> {
    gamma: Vec<F>,
    beta: Vec<F>,
    epsilon: F,
}

impl<F: Fast> HostNorm<F> {
    /// `norm`'s parameters, when it is a `LayerNorm1D<M, F, Cpu>`.
    fn of<const M: usize>(norm: &dyn Any) -> Option<Self> {
        let norm = norm.downcast_ref::<LayerNorm1D<M, F, Cpu>>()?;
        Some(Self {
            gamma: host(&norm.gamma),
            beta: host(&norm.beta),
            epsilon: F::from(norm.epsilon)?,
        })
    }

    /// Normalises each row of `rows` in place, after adding `residual`'s when given.
    fn apply(&self, rows: &mut [F], residual: Option<&[F]>) {
        pulp::Arch::new().dispatch(Normalize {
            rows,
            residual,
            gamma: &self.gamma,
            beta: &self.beta,
            epsilon: self.epsilon,
        })
    }
}

/// Host buffers a thread keeps between calls for [`HostCopy`]: enough for the input, weights,
/// projections and intermediates of a fused block ([`self_attention`] holds eight at once).
/// They stay allocated at the sizes last used (a few MB each for a transformer layer), the
/// price of not reallocating them per call.
const SCRATCH_BUFFERS: usize = 8;

/// The element types of the fast route, with their erf.
trait Fast: Element + Dtype + num_traits::Float {
    fn error_function(self) -> Self;
    /// `exp` for arguments in `[-87, 0]` (a softmax's, once shifted by the maximum).
    fn exp_shifted(self) -> Self;
    /// This thread's spare host buffers of this type (see [`HostCopy`]).
    fn scratch() -> &'static std::thread::LocalKey<RefCell<Vec<Vec<Self>>>>;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
}

impl Fast for f64 {
    fn scratch() -> &'static std::thread::LocalKey<RefCell<Vec<Vec<f64>>>> {
        &SCRATCH_F64
    }

    fn error_function(self) -> f64 {
        libm::erf(self)
    }

    fn exp_shifted(self) -> f64 {
        self.exp()
    }
}

impl Fast for f32 {
    fn scratch() -> &'static std::thread::LocalKey<RefCell<Vec<Vec<f32>>>> {
        &SCRATCH_F32
    }

    /// XLA's rational approximation of erf on `[-4, 4]` (erf is ±1 to f32 precision beyond):
    /// no exp and no branch, so it vectorises. Error below 1e-6 of libm's `erf` (tested).
    /// Always inlined, so that it is compiled with the caller's SIMD features: called out of
    /// line from AVX code, its SSE instructions would pay an SSE/AVX transition each.
    #[inline(always)]
    fn error_function(self) -> f32 {
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = -2.726_142_3e-10_f32;
        p = p.mul_add(x2, 2.770_681_4e-8);
        p = p.mul_add(x2, -2.101_024e-6);
        p = p.mul_add(x2, -5.692_506_4e-5);
        p = p.mul_add(x2, -7.349_906_3e-4);
        p = p.mul_add(x2, -2.954_6e-3);
        p = p.mul_add(x2, -1.609_603_3e-2);
        let mut q = -1.456_607_2e-5_f32;
        q = q.mul_add(x2, -2.133_740_6e-4);
        q = q.mul_add(x2, -1.682_827e-3);
        q = q.mul_add(x2, -7.373_329e-3);
        q = q.mul_add(x2, -1.426_474e-2);
        x * p / q
    }

    /// `2ⁿ·exp(r)` with `n = round(x/ln 2)`, `|r| ≤ ln 2 / 2` and exp(r) by its Taylor series
    /// to degree 7 (truncation 5e-9): inlined and branch-free, so it vectorises, where libm's
    /// `expf` is an out-of-line call per element. Within 2 ulp of `expf` (tested).
    #[inline(always)]
    fn exp_shifted(self) -> f32 {
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits: `n`
        // both as a float and as an integer, without `round` and a saturating cast (neither
        // vectorises on AVX2).
        const ROUND: f32 = 12_582_912.0;
        let x = self.clamp(-87.0, 0.0);
        let shifted = x * std::f32::consts::LOG2_E + ROUND;
        let n = shifted - ROUND;
        let bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
        let r = x - n * LN2_HI - n * LN2_LO;
        let mut p = 1.0_f32 / 5040.0;
        p = p.mul_add(r, 1.0 / 720.0);
        p = p.mul_add(r, 1.0 / 120.0);
        p = p.mul_add(r, 1.0 / 24.0);
        p = p.mul_add(r, 1.0 / 6.0);
        p = p.mul_add(r, 0.5);
        p = p.mul_add(r, 1.0);
        p = p.mul_add(r, 1.0);
        p * f32::from_bits(bits.wrapping_add(127) << 23)
    }
}

/// Lanes of the vectorised loops: one AVX register of f32.
const LANES: usize = 8;

/// `map` of each of `values`, folded by `f` over [`LANES`] lanes, then the lanes folded: `f`
/// must be associative and commutative up to rounding (a sum, a maximum), and then the loop
/// vectorises.
#[inline(always)]
fn reduce<F: Fast>(values: &[F], init: F, map: impl Fn(F) -> F, f: impl Fn(F, F) -> F) -> F {
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, map(b)));
    for chunk in chunks {
        for i in 0..LANES {
            lanes[i] = f(lanes[i], map(chunk[i]));
        }
    }
    lanes.iter().fold(tail, |a, &b| f(a, b))
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

/// A host buffer (a tensor's copy, a product) taken from this thread's [`Fast::scratch`] and
/// given back when dropped. dfdx lends no slice of a `Cpu` tensor's data, so each forward
/// copies its input and weights; reusing the buffers keeps that to a memcpy, where fresh
/// megabyte allocations also paid page faults and zeroing.
struct HostCopy<F: Fast>(Vec<F>);

impl<F: Fast> HostCopy<F> {
    /// A spare buffer of this thread, its contents unspecified: the smallest of capacity `len`
    /// or more when there is one, else the largest (to grow).
    fn spare(len: usize) -> Self {
        let buf = F::scratch().with(|pool| {
            let mut pool = pool.borrow_mut();
            let fits = (0..pool.len())
                .filter(|&i| pool[i].capacity() >= len)
                .min_by_key(|&i| pool[i].capacity());
            let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        });
        Self(buf)
    }

    /// A copy of `t`'s values, row-major.
    fn of<S: Shape>(t: &Tensor<S, F, Cpu>) -> Self {
        let t = t.clone().contiguous();
        let len = t.shape().num_elements();
        let mut copy = Self::spare(len);
        // Only values beyond the buffer's last length are written twice.
        copy.0.resize(len, F::zero());
        t.copy_into(&mut copy.0);
        copy
    }
}

impl<F: Fast> std::ops::Deref for HostCopy<F> {
    type Target = [F];
    fn deref(&self) -> &[F] {
        &self.0
    }
}

impl<F: Fast> Drop for HostCopy<F> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        F::scratch().with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < SCRATCH_BUFFERS {
                pool.push(buf);
            }
        });
    }
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

/// `epilogue(x·Wᵀ + b)` into `y`, its contents replaced: `x` `[rows, in]`, `w` `[out, in]`,
/// row-major, no bias when `bias` is `None`.
fn gemm<F: Fast>(
    y: &mut Vec<F>,
    x: &[F],
    w: &[F],
    bias: Option<&[F]>,
    (rows, out): (usize, usize),
    epilogue: &HostEpilogue<'_, F>,
) {
    let inner = w.len() / out;
    let w = MatRef::from_row_major_slice(w, out, inner);
    y.clear();
    y.reserve(rows * out);
    // Blocks of rows on rayon's threads, each a sequential faer GEMM (see `crate::pool` for
    // why not faer's own parallelism), written as `Yᵀ = W·Xᵀ` so that the output is the
    // column-major matrix faer's kernels write best. Each thread also writes its block's bias
    // first, so the output is written in parallel and in cache, never zeroed beforehand.
    let block = rows
        .div_ceil(rayon::current_num_threads())
        .max(GEMM_MIN_ROWS);
    y.spare_capacity_mut()[..rows * out]
        .par_chunks_mut(block * out)
        .zip(x.par_chunks(block * inner))
        .enumerate()
        .for_each(|(i, (y, x))| {
            for row in y.chunks_exact_mut(out) {
                match bias {
                    Some(bias) => {
                        for (a, &b) in row.iter_mut().zip(bias) {
                            a.write(b);
                        }
                    }
                    None => row.fill(std::mem::MaybeUninit::new(F::zero())),
                }
            }
            // SAFETY: every value of the block was written just above, and `MaybeUninit<F>`
            // has `F`'s layout.
            let y = unsafe { &mut *(y as *mut [std::mem::MaybeUninit<F>] as *mut [F]) };
            let r = x.len() / inner;
            matmul(
                MatMut::from_column_major_slice_mut(y, out, r),
                Accum::Add,
                w,
                MatRef::from_row_major_slice(x, r, inner).transpose(),
                F::one(),
                Par::Seq,
            );
            epilogue.apply(y, i * block, out);
        });
    // SAFETY: the blocks cover the first `rows · out` values, and each block wrote all of its
    // own before its GEMM.
    unsafe { y.set_len(rows * out) };
}

/// A linear layer's weights copied to the host, row-major: what its product on host buffers
/// needs. Built by [`Routed::host`] once per forward (dfdx lends no view of a weight either).
enum HostLinear<F: Fast> {
    /// `y = W·x + b`, `W` `[out, in]`.
    Dense { weight: HostCopy<F>, bias: Vec<F> },
    /// `y = B·(A·x) + b`, `A` `[latent, in]`, `B` `[out, latent]`.
    Pair {
        first: HostCopy<F>,
        second: HostCopy<F>,
        bias: Vec<F>,
    },
}

impl<F: Fast> HostLinear<F> {
    /// A `Linear<I, O, F, Cpu>`'s weights; `None` for other tensors.
    fn dense<const I: usize, const O: usize>(weight: &dyn Any, bias: &dyn Any) -> Option<Self> {
        Some(Self::Dense {
            weight: HostCopy::of(weight.downcast_ref::<Tensor<Rank2<O, I>, F, Cpu>>()?),
            bias: host(bias.downcast_ref::<Tensor<Rank1<O>, F, Cpu>>()?),
        })
    }

    /// A `FactorizedLinear<I, L, O, F, Cpu>`'s factors and bias; `None` for other tensors.
    fn pair<const I: usize, const L: usize, const O: usize>(
        first: &dyn Any,
        second: &dyn Any,
        bias: &dyn Any,
    ) -> Option<Self> {
        Some(Self::Pair {
            first: HostCopy::of(first.downcast_ref::<Tensor<Rank2<L, I>, F, Cpu>>()?),
            second: HostCopy::of(second.downcast_ref::<Tensor<Rank2<O, L>, F, Cpu>>()?),
            bias: host(bias.downcast_ref::<Tensor<Rank1<O>, F, Cpu>>()?),
        })
    }

    /// `epilogue(self(x))` for the `rows` rows of `x`, into `y` (contents replaced).
    fn forward(&self, x: &[F], rows: usize, y: &mut Vec<F>, epilogue: &HostEpilogue<'_, F>) {
        match self {
            Self::Dense { weight, bias } => {
                gemm(y, x, weight, Some(bias), (rows, bias.len()), epilogue)
            }
            Self::Pair {
                first,
                second,
                bias,
            } => {
                let latent = second.len() / bias.len();
                let mut h = HostCopy::spare(rows * latent);
                gemm(
                    &mut h.0,
                    x,
                    first,
                    None,
                    (rows, latent),
                    &HostEpilogue::Identity,
                );
                gemm(y, &h, second, Some(bias), (rows, bias.len()), epilogue);
            }
        }
    }
}

/// `layer`'s weights on the host as `F`, when they are `Cpu` tensors of `F`.
fn host_linear<F: Fast>(layer: &(impl Routed + ?Sized)) -> Option<HostLinear<F>> {
    layer.host()?.downcast().ok().map(|host| *host)
}

/// `layer`'s forward of `x` on the host with `epilogue` (`I` → `O` features), or `None` when
/// `x` is not a tape-free `Cpu` tensor of `F` (or the layer's weights are not).
fn linear_route<F: Fast, X: RecordInput + 'static, Out: 'static, const I: usize, const O: usize>(
    x: &X,
    layer: &impl Routed,
    epilogue: &Epilogue<'_>,
) -> Option<Out> {
    let input = as_cpu::<(usize, Const<I>), F, X>(x)?;
    let rows = input.shape().0;
    // The add+norm epilogue's residual and parameters on the host, owned here.
    let add_norm = match *epilogue {
        Epilogue::AddNorm { residual, norm } => {
            let residual = residual.downcast_ref::<Tensor<(usize, Const<O>), F, Cpu>>()?;
            if residual.shape().0 != rows {
                return None;
            }
            Some((HostCopy::of(residual), HostNorm::of::<O>(norm)?))
        }
        Epilogue::Identity | Epilogue::Gelu => None,
    };
    let epilogue = match &add_norm {
        Some((residual, norm)) => HostEpilogue::AddNorm { residual, norm },
        None if matches!(epilogue, Epilogue::Gelu) => HostEpilogue::Gelu,
        None => HostEpilogue::Identity,
    };
    let weights = host_linear::<F>(layer)?;
    let mut y = Vec::new();
    weights.forward(&HostCopy::of(input), rows, &mut y, &epilogue);
    layer.record(x);
    cast(input.device().tensor_from_vec(y, (rows, Const::<O>)))
}

impl<const I: usize, const O: usize, E: Dtype, D: Device<E>, T> FastForward<T>
    for Linear<I, O, E, D>
where
    T: RecordInput + 'static,
    Self: Module<T>,
    <Self as Module<T>>::Output: 'static,
{
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error> {
        match routes!(x, linear_route[I, O], self, &Epilogue::Identity) {
            Some(y) => Ok(y),
            None => self.try_forward(x),
        }
    }
}

impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>, T> FastForward<T>
    for FactorizedLinear<I, L, O, E, D>
where
    T: RecordInput + 'static,
    Self: Module<T>,
    <Self as Module<T>>::Output: 'static,
{
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error> {
        match routes!(x, linear_route[I, O], self, &Epilogue::Identity) {
            Some(y) => Ok(y),
            None => self.try_forward(x),
        }
    }
}

impl<const I: usize, const O: usize, E: Dtype, D: Device<E>, T: Tape<E, D> + 'static, M>
    FastLinear<I, O, E, D, T> for M
where
    M: Routed + FastForward<Rows<I, E, D, T>, Output = Rows<O, E, D, T>, Error = D::Err>,
{
    fn try_forward_fast_gelu(&self, x: Rows<I, E, D, T>) -> Result<Rows<O, E, D, T>, D::Err> {
        match routes!(x, linear_route[I, O], self, &Epilogue::Gelu) {
            Some(y) => Ok(y),
            None => AccurateGeLU.try_forward(self.try_forward(x)?),
        }
    }

    fn try_forward_fast_add_norm(
        &self,
        x: Rows<I, E, D, T>,
        residual: Rows<O, E, D>,
        norm: &LayerNorm1D<O, E, D>,
    ) -> Result<Rows<O, E, D, T>, D::Err> {
        let epilogue = Epilogue::AddNorm {
            residual: &residual,
            norm,
        };
        match routes!(x, linear_route[I, O], self, &epilogue) {
            Some(y) => Ok(y),
            None => norm.try_forward(self.try_forward(x)?.try_add(residual)?),
        }
    }
}

/// What [`FastLinear`] builds on, public only to the crate: the sealed trait names it.
mod sealed {
    /// What a linear route applies to each block of its output rows while it is in cache.
    pub enum Epilogue<'a> {
        Identity,
        Gelu,
        /// Add the residual (a tensor of the output's shape), then the `LayerNorm1D`.
        AddNorm {
            residual: &'a dyn std::any::Any,
            norm: &'a dyn std::any::Any,
        },
    }

    /// What differs between the linear layer kinds on the host route.
    pub trait Routed {
        /// The layer's weights copied to the host: a `HostLinear` of `f32` or `f64` (the
        /// layer's dtype), or `None` when they are not `Cpu` tensors of either.
        fn host(&self) -> Option<Box<dyn std::any::Any>>;

        /// Records `x` as the layer's input, as its `Module` forward would (a no-op unless a
        /// calibration pass records).
        fn record(&self, x: &dyn super::RecordInput);
    }
}
use sealed::{Epilogue, Routed};

/// `host` boxed for [`Routed::host`].
fn boxed<H: Any>(host: Option<H>) -> Option<Box<dyn Any>> {
    host.map(|h| Box::new(h) as Box<dyn Any>)
}

impl<const I: usize, const O: usize, E: Dtype, D: Device<E>> Routed for Linear<I, O, E, D> {
    fn host(&self) -> Option<Box<dyn Any>> {
        let (w, b) = (&self.weight as &dyn Any, &self.bias as &dyn Any);
        boxed(HostLinear::<f32>::dense::<I, O>(w, b))
            .or_else(|| boxed(HostLinear::<f64>::dense::<I, O>(w, b)))
    }

    fn record(&self, _: &dyn RecordInput) {}
}

/// The dense stand-in's product while one is set (calibration), else the pair's; inputs are
/// recorded as the `Module` forward records them.
impl<const I: usize, const L: usize, const O: usize, E: Dtype, D: Device<E>> Routed
    for FactorizedLinear<I, L, O, E, D>
{
    fn host(&self) -> Option<Box<dyn Any>> {
        let address = self as *const Self as usize;
        if let Some(dense) = crate::stand_in::stand_in::<Linear<I, O, E, D>>(address) {
            return dense.host();
        }
        let (a, b) = (
            &self.first.weight as &dyn Any,
            &self.second.weight as &dyn Any,
        );
        let bias = &self.second.bias as &dyn Any;
        boxed(HostLinear::<f32>::pair::<I, L, O>(a, b, bias))
            .or_else(|| boxed(HostLinear::<f64>::pair::<I, L, O>(a, b, bias)))
    }

    fn record(&self, x: &dyn RecordInput) {
        x.record(self as *const Self as usize);
    }
}

/// `norm(x + down(gelu(up(x))))`: a post-norm transformer's feed-forward block (erf GELU).
///
/// On the fast route (tape-free `Cpu` rows of f32 or f64, outside calibration) it runs on host
/// buffers from end to end: `x` is copied once (it is also the residual) and the hidden
/// activations never become a tensor. Otherwise it composes [`FastLinear`]'s forwards, so it
/// also trains.
///
/// ```
/// use dfdx::prelude::*;
/// use factorize_runtime::fast;
///
/// let dev: Cpu = Default::default();
/// let up = dev.build_module::<Linear<8, 32>, f32>();
/// let down = dev.build_module::<Linear<32, 8>, f32>();
/// let norm = dev.build_module::<LayerNorm1D<8>, f32>();
/// let x: Tensor<(usize, Const<8>), f32, Cpu> = dev.sample_normal_like(&(5, Const));
/// let fused = fast::try_feed_forward(&up, &down, &norm, x.clone()).unwrap().as_vec();
/// let composed = norm.forward(down.forward(up.forward(x.clone()).gelu()) + x).as_vec();
/// assert!(fused.iter().zip(&composed).all(|(a, b)| (a - b).abs() < 1e-3));
/// ```
pub fn try_feed_forward<
    const M: usize,
    const H: usize,
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D> + 'static,
>(
    up: &impl FastLinear<M, H, E, D, T>,
    down: &impl FastLinear<H, M, E, D, T>,
    norm: &LayerNorm1D<M, E, D>,
    x: Rows<M, E, D, T>,
) -> Result<Rows<M, E, D, T>, D::Err> {
    let fast = if crate::calibrate::recording() {
        None
    } else {
        routes!(x, feed_forward_route[M, H], up, down, norm)
    };
    if let Some(y) = fast {
        return Ok(y);
    }
    let (x, tape) = x.split_tape();
    let h = up.try_forward_fast_gelu(x.clone().put_tape(tape))?;
    down.try_forward_fast_add_norm(h, x, norm)
}

fn feed_forward_route<F: Fast, X: 'static, Out: 'static, const M: usize, const H: usize>(
    x: &X,
    up: &impl Routed,
    down: &impl Routed,
    norm: &dyn Any,
) -> Option<Out> {
    let x = as_cpu::<(usize, Const<M>), F, X>(x)?;
    let rows = x.shape().0;
    let (up, down) = (host_linear::<F>(up)?, host_linear::<F>(down)?);
    let norm = HostNorm::of::<M>(norm)?;
    let residual = HostCopy::of(x);
    let mut h = HostCopy::spare(rows * H);
    up.forward(&residual, rows, &mut h.0, &HostEpilogue::Gelu);
    let mut y = Vec::new();
    let epilogue = HostEpilogue::AddNorm {
        residual: &residual,
        norm: &norm,
    };
    down.forward(&h, rows, &mut y, &epilogue);
    cast(x.device().tensor_from_vec(y, (rows, Const::<M>)))
}

/// `norm(x + output(attention(query(x), key(x), value(x))))`: a post-norm transformer's
/// self-attention block, with [`attention`]'s heads, padding and masking, on host buffers from
/// end to end (`x` copied once; the projections and the attention never become tensors).
///
/// `None` unless `x` is a tape-free `Cpu` tensor of f32 or f64 and no calibration pass
/// records: the caller then composes the block (the MiniLM example falls back to
/// [`FastLinear`]'s forwards and [`attention`], or dfdx's ops under a tape).
///
/// # Panics
/// As [`attention`].
pub fn self_attention<
    const H: usize,
    const DH: usize,
    const W: usize,
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D> + 'static,
>(
    (query, key, value, output): (
        &impl FastLinear<W, W, E, D, T>,
        &impl FastLinear<W, W, E, D, T>,
        &impl FastLinear<W, W, E, D, T>,
        &impl FastLinear<W, W, E, D, T>,
    ),
    norm: &LayerNorm1D<W, E, D>,
    x: &Rows<W, E, D, T>,
    lengths: &[usize],
    positions: usize,
) -> Option<Rows<W, E, D, T>> {
    check_attention::<H, DH, W>(x.shape().0, lengths, positions);
    if crate::calibrate::recording() {
        return None;
    }
    let projections = [query as &dyn Routed, key, value, output];
    routes!(*x, self_attention_route[DH, W], projections, norm, lengths, positions)
}

fn self_attention_route<F: Fast, X: 'static, Out: 'static, const DH: usize, const W: usize>(
    x: &X,
    [query, key, value, output]: [&dyn Routed; 4],
    norm: &dyn Any,
    lengths: &[usize],
    positions: usize,
) -> Option<Out> {
    let x = as_cpu::<(usize, Const<W>), F, X>(x)?;
    let rows = x.shape().0;
    let norm = HostNorm::of::<W>(norm)?;
    let residual = HostCopy::of(x);
    // Each layer's weights go back to the pool once its product is done.
    let project = |layer: &dyn Routed| {
        let mut y = HostCopy::spare(rows * W);
        host_linear::<F>(layer)?.forward(&residual, rows, &mut y.0, &HostEpilogue::Identity);
        Some(y)
    };
    let (q, k, v) = (project(query)?, project(key)?, project(value)?);
    let mut context = HostCopy::spare(rows * W);
    context.0.resize(rows * W, F::zero());
    attend::<F, DH>([&q, &k, &v], W, lengths, positions, &mut context.0);
    let mut y = Vec::new();
    let epilogue = HostEpilogue::AddNorm {
        residual: &residual,
        norm: &norm,
    };
    host_linear::<F>(output)?.forward(&context, rows, &mut y, &epilogue);
    cast(x.device().tensor_from_vec(y, (rows, Const::<W>)))
}

fn layer_norm_route<F: Fast, X: 'static, Out: 'static, const M: usize>(
    x: &X,
    norm: &dyn Any,
) -> Option<Out> {
    let x = as_cpu::<(usize, Const<M>), F, X>(x)?;
    let norm = HostNorm::of::<M>(norm)?;
    let mut v = host(x);
    v.par_chunks_mut(M * ROWS_PER_TASK)
        .for_each(|rows| norm.apply(rows, None));
    cast(x.device().tensor_from_vec(v, *x.shape()))
}

impl<const M: usize, E: Dtype, D: Device<E>, T: 'static> FastForward<T> for LayerNorm1D<M, E, D>
where
    Self: Module<T>,
    <Self as Module<T>>::Output: 'static,
{
    fn try_forward_fast(&self, x: T) -> Result<Self::Output, Self::Error> {
        match routes!(x, layer_norm_route[M], self as &dyn Any) {
            Some(y) => Ok(y),
            None => self.try_forward(x),
        }
    }
}

/// Values per parallel task of the element-wise kernels.
const VALUES_PER_TASK: usize = 16 * 1024;

fn gelu_route<F: Fast, S: Shape, Out: 'static>(x: &dyn Any) -> Option<Out> {
    let x = x.downcast_ref::<Tensor<S, F, Cpu>>()?;
    let mut v = host(x);
    v.par_chunks_mut(VALUES_PER_TASK)
        .for_each(|chunk| pulp::Arch::new().dispatch(Gelu(chunk)));
    cast(x.device().tensor_from_vec(v, *x.shape()))
}

/// LayerNorm of each row of `rows` in place, `(x − mean)/√(var + ε)·γ + β`, after adding the
/// same rows of `residual` when there is one. Rows are `γ.len()` wide.
struct Normalize<'a, F> {
    rows: &'a mut [F],
    residual: Option<&'a [F]>,
    gamma: &'a [F],
    beta: &'a [F],
    epsilon: F,
}

impl<F: Fast> pulp::WithSimd for Normalize<'_, F> {
    type Output = ();

    /// Always inlined into pulp's dispatch, so compiled with the CPU's SIMD features.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            rows,
            residual,
            gamma,
            beta,
            epsilon,
        } = self;
        let width = gamma.len();
        let n = F::from(width).unwrap_or_else(F::one);
        for (r, row) in rows.chunks_exact_mut(width).enumerate() {
            if let Some(residual) = residual {
                for (a, &b) in row.iter_mut().zip(&residual[r * width..(r + 1) * width]) {
                    *a += b;
                }
            }
            let mean = reduce(row, F::zero(), |a| a, |a, b| a + b) / n;
            let var = reduce(row, F::zero(), |a| (a - mean) * (a - mean), |a, b| a + b) / n;
            let scale = (var + epsilon).sqrt().recip();
            for ((a, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                *a = (*a - mean) * scale * g + b;
            }
        }
    }
}

/// erf GELU in place, `x·(1 + erf(x/√2))/2`.
struct Gelu<'a, F>(&'a mut [F]);

impl<F: Fast> pulp::WithSimd for Gelu<'_, F> {
    type Output = ();

    /// Always inlined into pulp's dispatch, so compiled with the CPU's SIMD features.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let half = F::from(0.5).unwrap_or_else(F::one);
        let inv_sqrt2 = F::from(std::f64::consts::FRAC_1_SQRT_2).unwrap_or_else(F::one);
        for a in self.0 {
            *a = half * *a * (F::one() + (*a * inv_sqrt2).error_function());
        }
    }
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

/// Multi-head self-attention on the host, fused: `softmax(Q·Kᵀ/√DH + mask)·V` per head, with
/// the heads side by side in the rows' `W = H·DH` columns (as a `Linear` writes them).
///
/// Sentence `i` occupies rows `i·positions .. (i+1)·positions` of `q`, `k` and `v`, and its
/// first `lengths[i]` positions are real tokens: keys beyond them are masked out (every query
/// row, padding included, attends to the real keys only, as an additive `-∞` mask does).
/// Returns `None` unless the tensors are tape-free `Cpu` tensors of f32 or f64; the caller then
/// composes dfdx's ops (as the MiniLM example does), which also carry a tape.
/// [`self_attention`] fuses it with its projections.
///
/// # Panics
/// If `W != H·DH`, the row count is not `lengths.len()·positions`, or a length exceeds
/// `positions` or is 0.
pub fn attention<const H: usize, const DH: usize, const W: usize, E: Dtype, D: Device<E>>(
    q: &Tensor<(usize, Const<W>), E, D>,
    k: &Tensor<(usize, Const<W>), E, D>,
    v: &Tensor<(usize, Const<W>), E, D>,
    lengths: &[usize],
    positions: usize,
) -> Option<Tensor<(usize, Const<W>), E, D>> {
    check_attention::<H, DH, W>(q.shape().0, lengths, positions);
    let (q, k, v) = (q as &dyn Any, k as &dyn Any, v as &dyn Any);
    attention_route::<f32, DH, W, _>(q, k, v, lengths, positions)
        .or_else(|| attention_route::<f64, DH, W, _>(q, k, v, lengths, positions))
}

/// [`attention`]'s preconditions, for `rows` rows.
fn check_attention<const H: usize, const DH: usize, const W: usize>(
    rows: usize,
    lengths: &[usize],
    positions: usize,
) {
    assert_eq!(
        H * DH,
        W,
        "attention: {H} heads of {DH} are not {W} columns"
    );
    assert_eq!(rows, lengths.len() * positions, "attention: rows");
    assert!(
        lengths.iter().all(|&l| (1..=positions).contains(&l)),
        "attention: lengths must lie in 1..={positions}"
    );
}

fn attention_route<F: Fast, const DH: usize, const W: usize, Out: 'static>(
    q: &dyn Any,
    k: &dyn Any,
    v: &dyn Any,
    lengths: &[usize],
    positions: usize,
) -> Option<Out> {
    let view = |t: &dyn Any| {
        t.downcast_ref::<Tensor<(usize, Const<W>), F, Cpu>>()
            .map(HostCopy::of)
    };
    let (qs, ks, vs) = (view(q)?, view(k)?, view(v)?);
    let dev = q
        .downcast_ref::<Tensor<(usize, Const<W>), F, Cpu>>()?
        .device()
        .clone();
    let mut out = vec![F::zero(); qs.len()];
    attend::<F, DH>([&qs, &ks, &vs], W, lengths, positions, &mut out);
    cast(dev.tensor_from_vec(out, (qs.len() / W, Const::<W>)))
}

/// [`attention`] on host buffers: `[q, k, v]` and `out` are rows of `width` values.
fn attend<F: Fast, const DH: usize>(
    [q, k, v]: [&[F]; 3],
    width: usize,
    lengths: &[usize],
    positions: usize,
    out: &mut [F],
) {
    // One task per sentence: its rows of `out` are written by it alone.
    out.par_chunks_mut(positions * width)
        .zip(lengths.par_iter())
        .enumerate()
        .for_each(|(i, (out, &len))| {
            let rows = i * positions * width..(i + 1) * positions * width;
            pulp::Arch::new().dispatch(Sentence::<F, DH> {
                q: &q[rows.clone()],
                k: &k[rows.clone()],
                v: &v[rows],
                out,
                width,
                len,
            })
        });
}

/// Query rows whose scores are accumulated together: one vector of keys serves them all, and
/// their accumulators are independent, so the FMAs do not wait on each other's results.
const QUERIES: usize = 4;

/// One sentence of [`attention`]: its rows of `q`, `k`, `v` and `out` (positions × `width`,
/// heads of `DH` side by side), of which the first `len` positions are real tokens.
struct Sentence<'a, F, const DH: usize> {
    q: &'a [F],
    k: &'a [F],
    v: &'a [F],
    out: &'a mut [F],
    width: usize,
    len: usize,
}

impl<F: Fast, const DH: usize> pulp::WithSimd for Sentence<'_, F, DH> {
    type Output = ();

    /// Always inlined into pulp's dispatch, so compiled with the CPU's SIMD features: a
    /// closure's body there would be a function of its own, built for baseline x86-64 (SSE2,
    /// with a libm call for every `round` in `exp_shifted`).
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            q,
            k,
            v,
            out,
            width,
            len,
        } = self;
        let positions = q.len() / width;
        let scale = F::from(1.0 / (DH as f64).sqrt()).unwrap_or_else(F::one);
        // Terms that would end below the smallest normal number after division by the sum
        // (at most `len`) are flushed to 0; they are < 1e-36 of the largest. Arithmetic on
        // subnormals and exp's underflow path are each tens of times slower, and real
        // attention scores (±40) reach them on most rows.
        let floor = (F::min_positive_value() * F::from(len).unwrap_or_else(F::one)).ln();
        // A head's keys in vectors of `LANES` keys, each vector transposed (`DH × LANES`,
        // zero-padded past `len`): a query's scores then accumulate eight keys to a register,
        // with no horizontal sums, reading the vector's keys in order.
        let vectors = len.div_ceil(LANES);
        let stride = vectors * LANES;
        let mut keys = vec![F::zero(); DH * stride];
        let mut scores = vec![F::zero(); QUERIES * stride];
        for h in 0..width / DH {
            // Head `h` of position `p`.
            let head = |p: usize| p * width + h * DH..p * width + (h + 1) * DH;
            for j in 0..len {
                let (c, l) = (j / LANES, j % LANES);
                for (d, &x) in k[head(j)].iter().enumerate() {
                    keys[(c * DH + d) * LANES + l] = x;
                }
            }
            for first in (0..positions).step_by(QUERIES) {
                let n = QUERIES.min(positions - first);
                // The block's queries; past the last position, the last one again (its scores
                // are computed and not used).
                let query: [&[F; DH]; QUERIES] = std::array::from_fn(|i| {
                    let p = first + i.min(n - 1);
                    q[head(p)].try_into().expect("a head is DH wide")
                });
                for (c, vector) in keys.chunks_exact(DH * LANES).enumerate() {
                    let mut acc = [[F::zero(); LANES]; QUERIES];
                    for (d, keys) in vector.chunks_exact(LANES).enumerate() {
                        for (acc, query) in acc.iter_mut().zip(&query) {
                            let x = query[d];
                            for (a, &y) in acc.iter_mut().zip(keys) {
                                *a = x.mul_add(y, *a);
                            }
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        scores[i * stride + c * LANES..][..LANES].copy_from_slice(acc);
                    }
                }
                for (i, probs) in scores.chunks_exact_mut(stride).take(n).enumerate() {
                    let probs = &mut probs[..len];
                    let max = reduce(probs, F::neg_infinity(), |a| a, F::max) * scale;
                    for s in probs.iter_mut() {
                        let d = *s * scale - max;
                        let e = d.exp_shifted();
                        *s = if d < floor { F::zero() } else { e };
                    }
                    let inv = reduce(probs, F::zero(), |a| a, |a, b| a + b).recip();
                    let mut acc = [F::zero(); DH];
                    for (j, &s) in probs.iter().enumerate() {
                        let w = s * inv;
                        for (a, &x) in acc.iter_mut().zip(&v[head(j)]) {
                            *a = w.mul_add(x, *a);
                        }
                    }
                    out[head(first + i)].copy_from_slice(&acc);
                }
            }
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
    fn f32_exp_is_within_2_ulp_of_libm() {
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (ours, libm) = (x.exp_shifted(), x.exp());
            let ulp = f32::from_bits(libm.to_bits() + 1) - libm;
            assert!(
                (ours - libm).abs() <= 2.0 * ulp,
                "exp({x}): {ours} vs {libm}"
            );
        }
    }

    #[test]
    fn fused_attention_equals_the_definition() {
        let dev: Cpu = Default::default();
        // Lengths below, at and across the eight-key vectors, and a sentence of one token.
        let (lengths, positions) = ([3usize, 11, 1, 16, 8], 16);
        let rows = lengths.len() * positions;
        let t = |seed: f32| -> Tensor<(usize, Const<8>), f32, Cpu> {
            let v = (0..rows * 8)
                .map(|i| (i as f32 * seed).sin() * 3.0)
                .collect();
            dev.tensor_from_vec(v, (rows, Const))
        };
        let (q, k, v) = (t(0.37), t(0.71), t(1.3));
        let ours = attention::<2, 4, 8, f32, Cpu>(&q, &k, &v, &lengths, positions)
            .expect("a Cpu f32 tensor takes the fast route")
            .as_vec();
        let (q, k, v) = (q.as_vec(), k.as_vec(), v.as_vec());
        for (i, &len) in lengths.iter().enumerate() {
            for h in 0..2 {
                for p in 0..positions {
                    let at = |r: usize| (i * positions + r) * 8 + h * 4;
                    let scores: Vec<f64> = (0..len)
                        .map(|j| {
                            (0..4)
                                .map(|d| (q[at(p) + d] * k[at(j) + d]) as f64)
                                .sum::<f64>()
                                / 2.0
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..4 {
                        let want: f64 = (0..len).map(|j| e[j] / sum * v[at(j) + d] as f64).sum();
                        let got = ours[at(p) + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "sentence {i} head {h} pos {p}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn host_copies_reuse_buffers_without_stale_values() {
        let dev: Cpu = Default::default();
        let tensor = |n: usize, seed: f32| -> Tensor<(usize,), f32, Cpu> {
            dev.tensor_from_vec((0..n).map(|i| i as f32 * seed).collect(), (n,))
        };
        let (a, b, c) = (tensor(1000, 1.0), tensor(10, -2.0), tensor(5000, 0.5));
        let first = HostCopy::of(&a);
        assert_eq!(&first[..], &a.as_vec()[..]);
        let address = first.as_ptr();
        drop(first);
        // The smaller copy reuses the returned buffer and holds only its own values.
        let second = HostCopy::of(&b);
        assert_eq!(second.as_ptr(), address);
        assert_eq!(&second[..], &b.as_vec()[..]);
        drop(second);
        assert_eq!(&HostCopy::of(&c)[..], &c.as_vec()[..]);
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
        // A width with a tail beyond whole vectors.
        let x13: Tensor<(usize, Const<13>), f32, Cpu> = dev.sample_normal_like(&(37, Const));
        let ln13 = dev.build_module::<builders::LayerNorm1D<13>, f32>();
        close(
            &ln13.forward_fast(x13.clone()).as_vec(),
            &ln13.forward(x13).as_vec(),
            1e-5,
        );
        let big = x.clone() * 3.0;
        close(
            &AccurateGeLU.forward_fast(big.clone()).as_vec(),
            &AccurateGeLU.forward(big.clone()).as_vec(),
            2e-6,
        );
        let small: FactorizedLinear<24, 6, 40, f32, Cpu> =
            FactorizedLinear::from_linear(&fc, &crate::config::FactorizeConfig::default()).unwrap();
        close(
            &small.forward_fast(x.clone()).as_vec(),
            &small.forward(x.clone()).as_vec(),
            1e-5,
        );
        // The fused GELU, on more rows than one thread's block.
        let x: Tensor<(usize, Const<24>), f32, Cpu> = dev.sample_normal_like(&(301, Const));
        close(
            &fc.try_forward_fast_gelu(x.clone()).unwrap().as_vec(),
            &AccurateGeLU.forward(fc.forward(x.clone())).as_vec(),
            1e-5,
        );
        close(
            &small.try_forward_fast_gelu(x.clone()).unwrap().as_vec(),
            &AccurateGeLU.forward(small.forward(x.clone())).as_vec(),
            1e-5,
        );
        // The fused residual add and LayerNorm.
        let residual: Tensor<(usize, Const<40>), f32, Cpu> = dev.sample_normal_like(&(301, Const));
        let mut norm = dev.build_module::<builders::LayerNorm1D<40>, f32>();
        norm.gamma = dev.sample_normal();
        norm.beta = dev.sample_normal();
        let fused = fc.try_forward_fast_add_norm(x.clone(), residual.clone(), &norm);
        let composed = norm.forward(fc.forward(x.clone()) + residual.clone());
        close(&fused.unwrap().as_vec(), &composed.as_vec(), 1e-5);
        let fused = small.try_forward_fast_add_norm(x.clone(), residual.clone(), &norm);
        let composed = norm.forward(small.forward(x.clone()) + residual);
        close(&fused.unwrap().as_vec(), &composed.as_vec(), 1e-5);
        // f64 takes the fast route too.
        let x64: Tensor<(usize, Const<24>), f64, Cpu> = dev.sample_normal_like(&(9, Const));
        let fc64 = dev.build_module::<builders::Linear<24, 40>, f64>();
        let (a, b) = (
            fc64.forward_fast(x64.clone()).as_vec(),
            fc64.forward(x64).as_vec(),
        );
        assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-12));
    }

    fn normal_norm<const M: usize>(dev: &Cpu) -> LayerNorm1D<M, f32, Cpu> {
        let mut norm = dev.build_module::<builders::LayerNorm1D<M>, f32>();
        norm.gamma = dev.sample_normal();
        norm.beta = dev.sample_normal();
        norm
    }

    #[test]
    fn fused_feed_forward_equals_its_composition() {
        let dev: Cpu = Default::default();
        // More rows than one thread's block.
        let x: Tensor<(usize, Const<24>), f32, Cpu> = dev.sample_normal_like(&(301, Const));
        let up = dev.build_module::<builders::Linear<24, 40>, f32>();
        let down = dev.build_module::<builders::Linear<40, 24>, f32>();
        let norm = normal_norm::<24>(&dev);
        let fused = try_feed_forward(&up, &down, &norm, x.clone()).unwrap();
        let h = AccurateGeLU.forward(up.forward(x.clone()));
        let want = norm.forward(down.forward(h) + x.clone());
        close(&fused.as_vec(), &want.as_vec(), 1e-5);
        // Factorized layers, and a factorized one before a dense one.
        let cfg = crate::config::FactorizeConfig::default();
        let up_pair: FactorizedLinear<24, 6, 40, f32, Cpu> =
            FactorizedLinear::from_linear(&up, &cfg).unwrap();
        let down_pair: FactorizedLinear<40, 6, 24, f32, Cpu> =
            FactorizedLinear::from_linear(&down, &cfg).unwrap();
        let h = AccurateGeLU.forward(up_pair.forward(x.clone()));
        let fused = try_feed_forward(&up_pair, &down_pair, &norm, x.clone()).unwrap();
        let want = norm.forward(down_pair.forward(h.clone()) + x.clone());
        close(&fused.as_vec(), &want.as_vec(), 1e-5);
        let fused = try_feed_forward(&up_pair, &down, &norm, x.clone()).unwrap();
        let want = norm.forward(down.forward(h) + x.clone());
        close(&fused.as_vec(), &want.as_vec(), 1e-5);
    }

    #[test]
    fn fused_blocks_step_aside_while_calibration_records() {
        use crate::calibrate::{Capture, Recording};
        let dev: Cpu = Default::default();
        let x: Tensor<(usize, Const<24>), f32, Cpu> = dev.sample_normal_like(&(5, Const));
        let cfg = crate::config::FactorizeConfig::default();
        let up: FactorizedLinear<24, 6, 40, f32, Cpu> = FactorizedLinear::from_linear(
            &dev.build_module::<builders::Linear<24, 40>, f32>(),
            &cfg,
        )
        .unwrap();
        let down = dev.build_module::<builders::Linear<40, 24>, f32>();
        let norm = normal_norm::<24>(&dev);
        let recording = Recording::start(Capture::All);
        let y = try_feed_forward(&up, &down, &norm, x.clone()).unwrap();
        let calls = recording.take();
        drop(recording);
        // The factorized layer saw `x` and recorded it, as its own forward does.
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, &up as *const _ as usize);
        let recorded: Vec<f32> = calls[0].1.values.iter().map(|&v| v as f32).collect();
        assert_eq!(recorded, x.as_vec());
        let fused = try_feed_forward(&up, &down, &norm, x).unwrap();
        close(&y.as_vec(), &fused.as_vec(), 1e-5);
    }

    #[test]
    fn fused_self_attention_equals_its_composition() {
        let dev: Cpu = Default::default();
        let (lengths, positions) = ([3usize, 11, 1, 16, 8], 16);
        let x: Tensor<(usize, Const<8>), f32, Cpu> =
            dev.sample_normal_like(&(lengths.len() * positions, Const));
        let layer = || dev.build_module::<builders::Linear<8, 8>, f32>();
        let (q, k, v, o) = (layer(), layer(), layer(), layer());
        let norm = normal_norm::<8>(&dev);
        let fused = self_attention::<2, 4, 8, f32, Cpu, NoneTape>(
            (&q, &k, &v, &o),
            &norm,
            &x,
            &lengths,
            positions,
        )
        .expect("a Cpu f32 tensor takes the fast route");
        let context = attention::<2, 4, 8, f32, Cpu>(
            &q.forward(x.clone()),
            &k.forward(x.clone()),
            &v.forward(x.clone()),
            &lengths,
            positions,
        )
        .unwrap();
        let want = norm.forward(o.forward(context) + x.clone());
        close(&fused.as_vec(), &want.as_vec(), 1e-5);
        // A traced input is left to the caller.
        let grads = q.alloc_grads();
        let traced = x.traced(grads);
        let projections = (&q, &k, &v, &o);
        assert!(self_attention::<2, 4, 8, f32, Cpu, _>(
            projections,
            &norm,
            &traced,
            &lengths,
            positions
        )
        .is_none());
    }

    #[test]
    fn a_recording_tape_takes_dfdx_route_and_gets_gradients() {
        let dev: Cpu = Default::default();
        let fc = dev.build_module::<builders::Linear<4, 3>, f32>();
        let x: Tensor<(usize, Const<4>), f32, Cpu> = dev.sample_normal_like(&(2, Const));
        let grads = fc.alloc_grads();
        let y = fc.forward_fast(x.clone().traced(grads));
        let g = y.sum().backward();
        assert!(g.get(&fc.weight).as_vec().iter().any(|v| *v != 0.0));
        // The fused forwards too, through each module's backward.
        let grads = fc.alloc_grads();
        let y = fc.try_forward_fast_gelu(x.clone().traced(grads)).unwrap();
        let g = y.sum().backward();
        assert!(g.get(&fc.weight).as_vec().iter().any(|v| *v != 0.0));
        let norm = dev.build_module::<builders::LayerNorm1D<3>, f32>();
        let residual: Tensor<(usize, Const<3>), f32, Cpu> = dev.sample_normal_like(&(2, Const));
        let grads = fc.alloc_grads();
        let y = fc.try_forward_fast_add_norm(x.clone().traced(grads), residual, &norm);
        let g = (y.unwrap() * 3.0).sum().backward();
        assert!(g.get(&fc.weight).as_vec().iter().any(|v| *v != 0.0));
        // And the fused feed-forward block, to both of its layers.
        let down = dev.build_module::<builders::Linear<3, 4>, f32>();
        let norm = dev.build_module::<builders::LayerNorm1D<4>, f32>();
        let y = try_feed_forward(&fc, &down, &norm, x.leaky_trace()).unwrap();
        let g = (y * 3.0).sum().backward();
        assert!(g.get(&fc.weight).as_vec().iter().any(|v| *v != 0.0));
        assert!(g.get(&down.weight).as_vec().iter().any(|v| *v != 0.0));
    }
}
