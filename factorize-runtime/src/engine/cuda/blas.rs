//! Safe wrappers over the raw cuBLAS and cuSOLVER calls the engine makes: each checks the
//! status code (allocation failures become [`GpuError::OutOfMemory`]) and states why its
//! pointers are valid.

use cudarc::cublas::sys as blas_sys;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::cusolver::sys as solver_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{failed, Gpu, GpuError};

pub(super) type Op = blas_sys::cublasOperation_t;
pub(super) const N: Op = Op::CUBLAS_OP_N;
pub(super) const T: Op = Op::CUBLAS_OP_T;

pub(super) fn int(n: usize) -> Result<i32, GpuError> {
    i32::try_from(n).map_err(|_| GpuError::Failed(format!("dimension {n} exceeds the BLAS range")))
}

/// Errors unless a buffer of `len` values holds a column-major `rows × cols` block with leading
/// dimension `ld`: the extent a BLAS call reads or writes. Every wrapper checks its operands
/// with it before handing their pointers to the library.
fn holds(what: &str, len: usize, (rows, cols, ld): (usize, usize, usize)) -> Result<(), GpuError> {
    let needed = if rows == 0 || cols == 0 {
        0
    } else {
        ld * (cols - 1) + rows
    };
    if ld < rows || len < needed {
        return Err(GpuError::Failed(format!(
            "{what}: a {rows} × {cols} block (leading dimension {ld}) does not fit in {len} values"
        )));
    }
    Ok(())
}

/// A column-major `rows × cols` matrix on the device, stored with leading dimension `rows`: the
/// view products take, so that their sizes follow from their operands instead of being
/// spelled out at every call.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a CudaSlice<f64>,
    rows: usize,
    cols: usize,
}

impl<'a> Mat<'a> {
    pub(super) fn new(data: &'a CudaSlice<f64>, (rows, cols): (usize, usize)) -> Self {
        Self { data, rows, cols }
    }

    /// The matrix read transposed in a product.
    pub(super) fn t(self) -> Operand<'a> {
        Operand::from(self).t()
    }
}

/// A factor of a product: a matrix read as it is (`N`) or transposed (`T`).
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    mat: Mat<'a>,
    op: Op,
}

impl<'a> From<Mat<'a>> for Operand<'a> {
    fn from(mat: Mat<'a>) -> Self {
        Self { mat, op: N }
    }
}

impl Operand<'_> {
    /// The operand transposed once more.
    pub(super) fn t(self) -> Self {
        let op = if self.op == N { T } else { N };
        Self { op, ..self }
    }

    /// Rows and columns as the product reads them.
    fn dims(&self) -> (usize, usize) {
        product_shape(self.op == T, (self.mat.rows, self.mat.cols))
    }
}

/// `(rows, cols)` of a stored `rows × cols` matrix, read transposed or not.
fn product_shape(transposed: bool, (rows, cols): (usize, usize)) -> (usize, usize) {
    if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    }
}

/// `(m, n, k)` of the product of an `a.0 × a.1` and a `b.0 × b.1` operand, or an error naming
/// both when their inner dimensions differ.
fn product_dims(a: (usize, usize), b: (usize, usize)) -> Result<(usize, usize, usize), GpuError> {
    if a.1 != b.0 {
        return Err(GpuError::Failed(format!(
            "product of a {} × {} and a {} × {} operand",
            a.0, a.1, b.0, b.1
        )));
    }
    Ok((a.0, b.1, a.1))
}

impl Gpu {
    /// `alpha·op(a)·op(b)`, a new column-major matrix.
    pub(super) fn product<'a>(
        &self,
        alpha: f64,
        a: impl Into<Operand<'a>>,
        b: impl Into<Operand<'a>>,
    ) -> Result<CudaSlice<f64>, GpuError> {
        let (a, b) = (a.into(), b.into());
        let (m, n, _) = product_dims(a.dims(), b.dims())?;
        let mut c = self.stream.alloc_zeros::<f64>(m * n)?;
        self.product_into(alpha, a, b, 0.0, &mut c)?;
        Ok(c)
    }

    /// `c ← alpha·op(a)·op(b) + beta·c`, `c` holding the column-major result.
    pub(super) fn product_into<'a>(
        &self,
        alpha: f64,
        a: impl Into<Operand<'a>>,
        b: impl Into<Operand<'a>>,
        beta: f64,
        c: &mut CudaSlice<f64>,
    ) -> Result<(), GpuError> {
        let (a, b) = (a.into(), b.into());
        let (m, n, k) = product_dims(a.dims(), b.dims())?;
        self.gemm(
            (a.op, b.op),
            (m, n, k),
            alpha,
            (a.mat.data, a.mat.rows),
            (b.mat.data, b.mat.rows),
            beta,
            (c, m),
        )
    }

    /// `C = alpha·op(A)·op(B) + beta·C`, column-major, `C` is `m × n`.
    #[allow(clippy::too_many_arguments)]
    fn gemm<A: DevicePtr<f64>, B: DevicePtr<f64>, C: DevicePtrMut<f64>>(
        &self,
        (ta, tb): (Op, Op),
        (m, n, k): (usize, usize, usize),
        alpha: f64,
        (a, lda): (&A, usize),
        (b, ldb): (&B, usize),
        beta: f64,
        (c, ldc): (&mut C, usize),
    ) -> Result<(), GpuError> {
        let stored =
            |t: Op, rows: usize, cols: usize| if t == N { (rows, cols) } else { (cols, rows) };
        let (ar, ac) = stored(ta, m, k);
        let (br, bc) = stored(tb, k, n);
        holds("gemm A", a.len(), (ar, ac, lda))?;
        holds("gemm B", b.len(), (br, bc, ldb))?;
        holds("gemm C", c.len(), (m, n, ldc))?;
        let cfg = GemmConfig {
            transa: ta,
            transb: tb,
            m: int(m)?,
            n: int(n)?,
            k: int(k)?,
            alpha,
            lda: int(lda)?,
            ldb: int(ldb)?,
            beta,
            ldc: int(ldc)?,
        };
        // SAFETY: the three extents were checked above; cudarc orders the call on the stream of
        // the slices' guards.
        unsafe { self.blas.gemm(cfg, a, b, c) }.map_err(|e| failed("cuBLAS gemm", e))
    }

    pub(super) fn norm(&self, x: &CudaSlice<f64>) -> Result<f64, GpuError> {
        let mut out = 0.0f64;
        let (px, _gx) = x.device_ptr(&self.stream);
        // SAFETY: reads `x.len()` values of `x`, alive while its guard is; writes `out`.
        let status = unsafe {
            blas_sys::cublasDnrm2_v2(
                *self.blas.handle(),
                int(x.len())?,
                px as *const f64,
                1,
                &mut out,
            )
        };
        check_blas(status, "cuBLAS nrm2")?;
        Ok(out)
    }

    /// Orthonormalises the columns of `z` (`s × b`) in place: Cholesky-QR, twice.
    /// `false` when `zᵀz` is not numerically positive definite.
    pub(super) fn cholesky_qr2(
        &self,
        z: &mut CudaSlice<f64>,
        s: usize,
        b: usize,
    ) -> Result<bool, GpuError> {
        self.cholesky_qr(z, s, b, 2)
    }

    /// Cholesky-QR, `passes` times. One pass leaves columns orthonormal to about `κ(z)²·ε`,
    /// enough to carry a basis of the same span to the next product; the second makes them
    /// orthonormal to working precision.
    pub(super) fn cholesky_qr(
        &self,
        z: &mut CudaSlice<f64>,
        s: usize,
        b: usize,
        passes: usize,
    ) -> Result<bool, GpuError> {
        holds("Cholesky-QR block", z.len(), (s, b, s))?;
        let mut c = self.stream.alloc_zeros::<f64>(b * b)?;
        let mut info = self.stream.alloc_zeros::<i32>(passes)?;
        let fill = solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER;
        let mut lwork = 0i32;
        {
            let (pc, _g) = c.device_ptr_mut(&self.stream);
            // SAFETY: `c` is `b × b`, allocated above; only `lwork` is written.
            let status = unsafe {
                solver_sys::cusolverDnDpotrf_bufferSize(
                    self.solver.cu(),
                    fill,
                    int(b)?,
                    pc as *mut f64,
                    int(b)?,
                    &mut lwork,
                )
            };
            check_solver(status, "cuSOLVER potrf workspace")?;
        }
        let mut work = self.stream.alloc_zeros::<f64>(lwork.max(1) as usize)?;
        for pass in 0..passes {
            let block = Mat::new(&*z, (s, b));
            self.product_into(1.0, block.t(), block, 0.0, &mut c)?;
            {
                let (pc, _g1) = c.device_ptr_mut(&self.stream);
                let (pw, _g2) = work.device_ptr_mut(&self.stream);
                let mut slot = info.slice_mut(pass..pass + 1);
                let (pi, _g3) = slot.device_ptr_mut(&self.stream);
                // SAFETY: `c` is `b × b`, `work` holds the `lwork` values asked for, `slot` one
                // flag; all three allocated here.
                let status = unsafe {
                    solver_sys::cusolverDnDpotrf(
                        self.solver.cu(),
                        fill,
                        int(b)?,
                        pc as *mut f64,
                        int(b)?,
                        pw as *mut f64,
                        lwork,
                        pi as *mut i32,
                    )
                };
                check_solver(status, "cuSOLVER potrf")?;
            }
            // Z ← Z·R⁻¹ with R the upper Cholesky factor. A failed factorization is caught
            // below, after both passes, to keep the stream free of round trips.
            let one = 1.0f64;
            let (pc, _g1) = c.device_ptr(&self.stream);
            let (pz, _g2) = z.device_ptr_mut(&self.stream);
            // SAFETY: `c` is `b × b`; `z` holds `s × b` (checked on entry).
            let status = unsafe {
                blas_sys::cublasDtrsm_v2(
                    *self.blas.handle(),
                    blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                    blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                    N,
                    blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                    int(s)?,
                    int(b)?,
                    &one,
                    pc as *const f64,
                    int(b)?,
                    pz as *mut f64,
                    int(s)?,
                )
            };
            check_blas(status, "cuBLAS trsm")?;
        }
        Ok(self.stream.clone_dtoh(&info)?.iter().all(|&f| f == 0))
    }

    /// Eigenvalues (ascending) and eigenvectors (columns, in place of `a`) of the symmetric `n × n` `a`.
    /// With `vectors == false` only the eigenvalues are computed (and `a` is destroyed).
    pub(super) fn syevd(
        &self,
        a: &mut CudaSlice<f64>,
        n: usize,
        vectors: bool,
    ) -> Result<Vec<f64>, GpuError> {
        let mode = if vectors {
            solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR
        } else {
            solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_NOVECTOR
        };
        let fill = solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        holds("syevd matrix", a.len(), (n, n, n))?;
        let mut values = self.stream.alloc_zeros::<f64>(n)?;
        let mut info = self.stream.alloc_zeros::<i32>(1)?;
        let mut lwork = 0i32;
        {
            let (pa, _g1) = a.device_ptr(&self.stream);
            let (pv, _g2) = values.device_ptr(&self.stream);
            // SAFETY: `a` holds `n × n` (checked), `values` `n`; only `lwork` is written.
            let status = unsafe {
                solver_sys::cusolverDnDsyevd_bufferSize(
                    self.solver.cu(),
                    mode,
                    fill,
                    int(n)?,
                    pa as *const f64,
                    int(n)?,
                    pv as *const f64,
                    &mut lwork,
                )
            };
            check_solver(status, "cuSOLVER syevd workspace")?;
        }
        let mut work = self.stream.alloc_zeros::<f64>(lwork.max(1) as usize)?;
        {
            let (pa, _g1) = a.device_ptr_mut(&self.stream);
            let (pv, _g2) = values.device_ptr_mut(&self.stream);
            let (pw, _g3) = work.device_ptr_mut(&self.stream);
            let (pi, _g4) = info.device_ptr_mut(&self.stream);
            // SAFETY: `a` holds `n × n` (checked), `values` `n`, `work` the `lwork` values asked
            // for, `info` one flag.
            let status = unsafe {
                solver_sys::cusolverDnDsyevd(
                    self.solver.cu(),
                    mode,
                    fill,
                    int(n)?,
                    pa as *mut f64,
                    int(n)?,
                    pv as *mut f64,
                    pw as *mut f64,
                    lwork,
                    pi as *mut i32,
                )
            };
            check_solver(status, "cuSOLVER syevd")?;
        }
        let flag = self.stream.clone_dtoh(&info)?;
        if flag[0] != 0 {
            return Err(GpuError::Failed(format!(
                "cuSOLVER syevd info = {}",
                flag[0]
            )));
        }
        Ok(self.stream.clone_dtoh(&values)?)
    }

    /// The last `rank` of the `cols` columns of `a` (`rows × cols`), in reverse order.
    pub(super) fn leading_columns(
        &self,
        a: &CudaSlice<f64>,
        rows: usize,
        cols: usize,
        rank: usize,
    ) -> Result<CudaSlice<f64>, GpuError> {
        // One GEMM with the exchange matrix instead of `rank` small copies (launch-bound).
        let mut exchange = vec![0.0f64; rank * rank];
        for j in 0..rank {
            exchange[j * rank + (rank - 1 - j)] = 1.0;
        }
        let exchange = self.stream.clone_htod(&exchange)?;
        let last = a.slice((cols - rank) * rows..cols * rows);
        let mut out = self.stream.alloc_zeros::<f64>(rows * rank)?;
        self.gemm(
            (N, N),
            (rows, rank, rank),
            1.0,
            (&last, rows),
            (&exchange, rank),
            0.0,
            (&mut out, rows),
        )?;
        Ok(out)
    }

    /// The trace of a Gram matrix `g` (`s × s`): its diagonal is nonnegative, so the absolute
    /// sum of the diagonal.
    pub(super) fn gram_trace(&self, g: &CudaSlice<f64>, s: usize) -> Result<f64, GpuError> {
        holds("Gram matrix", g.len(), (s, s, s))?;
        let mut out = 0.0f64;
        let (pg, _g) = g.device_ptr(&self.stream);
        // SAFETY: reads the `s` diagonal values of the `s × s` `g` (checked), stride `s + 1`.
        let status = unsafe {
            blas_sys::cublasDasum_v2(
                *self.blas.handle(),
                int(s)?,
                pg as *const f64,
                int(s + 1)?,
                &mut out,
            )
        };
        check_blas(status, "cuBLAS asum")?;
        Ok(out)
    }

    /// `Σ x_i·y_i` over two equally long blocks.
    pub(super) fn dot(&self, x: &CudaSlice<f64>, y: &CudaSlice<f64>) -> Result<f64, GpuError> {
        holds("dot", y.len(), (x.len(), 1, x.len()))?;
        let mut out = 0.0f64;
        let (px, _gx) = x.device_ptr(&self.stream);
        let (py, _gy) = y.device_ptr(&self.stream);
        // SAFETY: reads `x.len()` values of `x` and of `y` (checked to be as long).
        let status = unsafe {
            blas_sys::cublasDdot_v2(
                *self.blas.handle(),
                int(x.len())?,
                px as *const f64,
                1,
                py as *const f64,
                1,
                &mut out,
            )
        };
        check_blas(status, "cuBLAS dot")?;
        Ok(out)
    }

    /// Adds `value` to the diagonal of the `n × n` `a`.
    pub(super) fn add_to_diagonal(
        &self,
        a: &mut CudaSlice<f64>,
        n: usize,
        value: f64,
    ) -> Result<(), GpuError> {
        holds("add to diagonal", a.len(), (n, n, n))?;
        let ones = self.stream.clone_htod(&vec![1.0f64; n])?;
        let (po, _g1) = ones.device_ptr(&self.stream);
        let (pa, _g2) = a.device_ptr_mut(&self.stream);
        // SAFETY: reads the `n` ones, updates the `n` diagonal values of the `n × n` `a`
        // (checked), stride `n + 1`.
        let status = unsafe {
            blas_sys::cublasDaxpy_v2(
                *self.blas.handle(),
                int(n)?,
                &value,
                po as *const f64,
                1,
                pa as *mut f64,
                int(n + 1)?,
            )
        };
        check_blas(status, "cuBLAS axpy")
    }

    /// `out = α·x + β·y` for column-major `rows × cols` blocks.
    pub(super) fn axpby(
        &self,
        (alpha, x): (f64, &CudaSlice<f64>),
        (beta, y): (f64, &CudaSlice<f64>),
        out: &mut CudaSlice<f64>,
        (rows, cols): (usize, usize),
    ) -> Result<(), GpuError> {
        for (name, len) in [
            ("axpby x", x.len()),
            ("axpby y", y.len()),
            ("axpby out", out.len()),
        ] {
            holds(name, len, (rows, cols, rows))?;
        }
        let (px, _g1) = x.device_ptr(&self.stream);
        let (py, _g2) = y.device_ptr(&self.stream);
        let (po, _g3) = out.device_ptr_mut(&self.stream);
        // geam: the one cuBLAS call that sums two blocks into a third.
        // SAFETY: all three hold `rows × cols` (checked).
        let status = unsafe {
            blas_sys::cublasDgeam(
                *self.blas.handle(),
                N,
                N,
                int(rows)?,
                int(cols)?,
                &alpha,
                px as *const f64,
                int(rows)?,
                &beta,
                py as *const f64,
                int(rows)?,
                po as *mut f64,
                int(rows)?,
            )
        };
        check_blas(status, "cuBLAS geam")
    }

    /// `A·diag(x)` for a column-major `m × n` `A`.
    pub(super) fn dgmm(
        &self,
        a: &CudaSlice<f64>,
        m: usize,
        n: usize,
        x: &CudaSlice<f64>,
    ) -> Result<CudaSlice<f64>, GpuError> {
        holds("dgmm A", a.len(), (m, n, m))?;
        holds("dgmm x", x.len(), (n, 1, n))?;
        let mut c = self.stream.alloc_zeros::<f64>(m * n)?;
        {
            let (pa, _g1) = a.device_ptr(&self.stream);
            let (px, _g2) = x.device_ptr(&self.stream);
            let (pc, _g3) = c.device_ptr_mut(&self.stream);
            // SAFETY: `a` holds `m × n` and `x` `n` (checked); `c` is `m × n`, allocated here.
            let status = unsafe {
                blas_sys::cublasDdgmm(
                    *self.blas.handle(),
                    blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                    int(m)?,
                    int(n)?,
                    pa as *const f64,
                    int(m)?,
                    px as *const f64,
                    1,
                    pc as *mut f64,
                    int(m)?,
                )
            };
            check_blas(status, "cuBLAS dgmm")?;
        }
        Ok(c)
    }

    /// The transpose (`n × m`) of a column-major `m × n` `a`.
    pub(super) fn transpose(
        &self,
        a: &CudaSlice<f64>,
        m: usize,
        n: usize,
    ) -> Result<CudaSlice<f64>, GpuError> {
        holds("transpose", a.len(), (m, n, m))?;
        let mut c = self.stream.alloc_zeros::<f64>(m * n)?;
        {
            let (one, zero) = (1.0f64, 0.0f64);
            let (pa, _g1) = a.device_ptr(&self.stream);
            let (pc, _g2) = c.device_ptr_mut(&self.stream);
            // SAFETY: `a` holds `m × n` (checked); `c` is `n × m`, allocated here, and is also
            // passed as the `beta = 0` operand, which geam allows in place (same leading
            // dimension).
            let status = unsafe {
                blas_sys::cublasDgeam(
                    *self.blas.handle(),
                    T,
                    N,
                    int(n)?,
                    int(m)?,
                    &one,
                    pa as *const f64,
                    int(m)?,
                    &zero,
                    pc as *const f64,
                    int(n)?,
                    pc as *mut f64,
                    int(n)?,
                )
            };
            check_blas(status, "cuBLAS geam")?;
        }
        Ok(c)
    }
}

pub(super) fn check_blas(status: blas_sys::cublasStatus_t, what: &str) -> Result<(), GpuError> {
    match status {
        blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        blas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => {
            Err(GpuError::OutOfMemory(format!("{what}: {status:?}")))
        }
        other => Err(failed(what, other)),
    }
}

pub(super) fn check_solver(
    status: solver_sys::cusolverStatus_t,
    what: &str,
) -> Result<(), GpuError> {
    match status {
        solver_sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS => Ok(()),
        solver_sys::cusolverStatus_t::CUSOLVER_STATUS_ALLOC_FAILED => {
            Err(GpuError::OutOfMemory(format!("{what}: {status:?}")))
        }
        other => Err(failed(what, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_take_their_sizes_from_the_operands() {
        // A stored 5 × 3, read transposed: 3 × 5; times a 5 × 2: 3 × 2 over 5.
        let a = product_shape(true, (5, 3));
        assert_eq!(a, (3, 5));
        assert_eq!(product_dims(a, (5, 2)).ok(), Some((3, 2, 5)));
        assert_eq!(product_dims((4, 1), (1, 4)).ok(), Some((4, 4, 1)));
        let Err(GpuError::Failed(message)) = product_dims((3, 5), (3, 2)) else {
            panic!("inner dimensions 5 and 3 chained");
        };
        assert_eq!(message, "product of a 3 × 5 and a 3 × 2 operand");
    }
}
