//! The numerical parameters that the CPU and GPU engines share, as faer's `*Params` are: named,
//! documented, in one place. Constants private to one algorithm (the tridiagonal solver's
//! cluster and step limits, the GPU's staging and filter limits) are named where they are used.
//!
//! Where the two engines differ, and why:
//! - The CPU iterates only when the block is at most an eighth of the side and the side is
//!   over `small_dense`: faer's dense eigensolver is cheap on a few cores. The GPU iterates
//!   up to a quarter of the side: its dense `syevd` is slow next to its GEMMs.
//! - The GPU places its Rayleigh–Ritz checks every few products (`CHECK_SPACING` in
//!   `cuda/subspace.rs`), because a check is a `b × b` `syevd` there, about three filtered steps.
//! - Both compute in f64 by default; the CPU honours [`crate::Precision::F32`], the GPU computes
//!   in f64 always (Hopper's FP64 tensor cores make it nearly as fast).

/// Parameters of the subspace iteration that finds the leading eigenvectors of a Gram matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SubspaceParams {
    /// Stop once a step gains less than this fraction of the residual energy. Subspace
    /// iteration converges geometrically, so the energy still missing is a small multiple of
    /// the last gain; the engines' contract allows 2e-4 of the residual energy (1e-4 of its
    /// norm).
    pub tolerance: f64,
    /// The same for the data-aware fits: their output subspace settles the residual energy to
    /// this, well inside the 1e-6 the calibration nmse is tested to.
    pub calibrated_tolerance: f64,
    /// Products with the Gram matrix allowed; beyond this the dense eigensolver is cheaper
    /// than waiting.
    pub max_iterations: usize,
    /// The seed of the random start block (and of the tridiagonal solver's start vectors), so
    /// that factorizations are reproducible bit for bit.
    pub seed: u64,
    /// The block is `rank + max(rank / 2, min_oversampling)` columns (at most the side):
    /// oversampling speeds convergence of the last wanted vectors.
    pub min_oversampling: usize,
    /// CPU: Gram matrices up to this side always take the dense path (a few milliseconds).
    pub small_dense: usize,
    /// CPU: iterate only when this many blocks fit in the side (twice as many for tolerances
    /// tighter than `tolerance`, which take more steps): a dense eigensolve costs about a dozen
    /// steps with a block of an eighth of the side.
    pub blocks_per_side: usize,
    /// GPU: iterate only when this many blocks fit in the side.
    pub gpu_blocks_per_side: usize,
}

/// The values the engines use.
pub(crate) const SUBSPACE: SubspaceParams = SubspaceParams {
    tolerance: 2e-6,
    calibrated_tolerance: 1e-9,
    max_iterations: 40,
    seed: 0x5EED_FAC7_0812_3456,
    min_oversampling: 16,
    small_dense: 512,
    blocks_per_side: 8,
    gpu_blocks_per_side: 4,
};

impl SubspaceParams {
    /// The block size of the subspace iteration for `rank` eigenpairs of an `s × s` matrix.
    pub(crate) const fn block_size(&self, rank: usize, s: usize) -> usize {
        let over = if rank / 2 > self.min_oversampling {
            rank / 2
        } else {
            self.min_oversampling
        };
        let b = rank + over;
        if b < s {
            b
        } else {
            s
        }
    }

    /// Whether the CPU should iterate for a block `b` of a side `s` at `tolerance`.
    pub(crate) const fn cpu_iterates(&self, b: usize, s: usize, tolerance: f64) -> bool {
        let blocks = if tolerance < self.tolerance {
            2 * self.blocks_per_side
        } else {
            self.blocks_per_side
        };
        s > self.small_dense && blocks * b <= s
    }

    /// Whether the GPU should iterate for a block `b` of a side `s`.
    #[cfg_attr(not(feature = "cuda-engine"), allow(dead_code))]
    pub(crate) const fn gpu_iterates(&self, b: usize, s: usize) -> bool {
        self.gpu_blocks_per_side * b <= s
    }
}

#[cfg(test)]
mod tests {
    use super::SUBSPACE;

    #[test]
    fn blocks_oversample_and_fit_the_side() {
        assert_eq!(SUBSPACE.block_size(8, 1000), 24);
        assert_eq!(SUBSPACE.block_size(64, 1000), 96);
        assert_eq!(SUBSPACE.block_size(64, 80), 80);
        // 4096-wide at rank 128: a block of 192, 21 to the side; not at 384 wide.
        assert!(SUBSPACE.cpu_iterates(192, 4096, SUBSPACE.tolerance));
        assert!(!SUBSPACE.cpu_iterates(48, 384, SUBSPACE.tolerance));
        assert!(!SUBSPACE.cpu_iterates(300, 4096, 1e-9));
        assert!(SUBSPACE.gpu_iterates(96, 384) && !SUBSPACE.gpu_iterates(97, 384));
    }
}
