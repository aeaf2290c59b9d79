//! A tiny deterministic source of standard normal numbers for randomized range finders.
//!
//! Factorizations must be reproducible bit for bit, run after run, so the start block is drawn
//! from a fixed-seed SplitMix64 stream (Box–Muller for the normal deviates) rather than from a
//! thread-local or OS-seeded generator.

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and good enough to start a subspace.
pub(crate) struct Gaussian {
    state: u64,
    spare: Option<f64>,
}

impl Gaussian {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in the open interval (0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `count` random signs (±1, a Rademacher sketch), 64 from each draw: as good a start block
    /// as Gaussian numbers for a range finder, and far cheaper for large blocks.
    pub(crate) fn signs(&mut self, count: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let bits = self.next_u64();
            let take = (count - out.len()).min(64);
            out.extend((0..take).map(|k| if bits >> k & 1 == 1 { 1.0 } else { -1.0 }));
        }
        out
    }

    /// A standard normal number.
    pub(crate) fn sample(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::Gaussian;

    #[test]
    fn deterministic_and_standard() {
        let a: Vec<f64> = {
            let mut g = Gaussian::new(7);
            (0..20_000).map(|_| g.sample()).collect()
        };
        let b: Vec<f64> = {
            let mut g = Gaussian::new(7);
            (0..20_000).map(|_| g.sample()).collect()
        };
        assert_eq!(a, b);
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64;
        // Five standard errors: 5/sqrt(20000) ≈ 0.035 for the mean, ≈ 0.05 for the variance.
        assert!(mean.abs() < 0.035, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn signs_are_balanced_and_reproducible() {
        let a = Gaussian::new(3).signs(10_001);
        assert_eq!(a, Gaussian::new(3).signs(10_001));
        assert_eq!(a.len(), 10_001);
        assert!(a.iter().all(|x| *x == 1.0 || *x == -1.0));
        // Five standard errors of a fair coin: 5·sqrt(10001) ≈ 500.
        assert!(a.iter().sum::<f64>().abs() < 500.0);
    }
}
