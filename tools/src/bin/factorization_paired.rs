//! Our truncated engine against faer's thin SVD, interleaved pair by pair in one process, for
//! a machine whose speed drifts between criterion's separate measurement phases: the median of
//! the per-pair ratios compares the two under the same conditions.
//!
//! `cargo run --release -p factorize-tools --bin factorization_paired [-- PAIRS]`

use std::time::Instant;

use factorize_runtime::engine::{low_rank, WeightMatrix};
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::Precision;

const RANK: usize = 128;

fn millis(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let pairs: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: factorization_paired [PAIRS > 0]");
            std::process::exit(2);
        }
        None => 15,
    };
    for (out_dim, in_dim) in [(1024usize, 1024usize), (4096, 1024)] {
        let w = matrix_with_spectrum(out_dim, in_dim, &power_law(out_dim.min(in_dim), 0.6), 1);
        let m = WeightMatrix::new("bench", &w, out_dim, in_dim).expect("finite weights");
        let w32 = faer::Mat::<f32>::from_fn(out_dim, in_dim, |i, j| w[i * in_dim + j] as f32);
        let w64 = faer::Mat::<f64>::from_fn(out_dim, in_dim, |i, j| w[i * in_dim + j]);
        for precision in [Precision::F32, Precision::F64] {
            let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..pairs {
                let a = millis(|| {
                    std::hint::black_box(low_rank(&m, RANK, precision).expect("factorizes"));
                });
                let b = millis(|| match precision {
                    Precision::F32 => {
                        std::hint::black_box(w32.thin_svd().expect("svd"));
                    }
                    Precision::F64 => {
                        std::hint::black_box(w64.thin_svd().expect("svd"));
                    }
                });
                ours.push(a);
                theirs.push(b);
                ratios.push(b / a);
            }
            println!(
                "{out_dim}x{in_dim} power law, rank {RANK}, {precision:?}: ours {:.1} ms, faer thin SVD {:.1} ms (medians of {pairs}); median pair ratio {:.2}x",
                median(ours),
                median(theirs),
                median(ratios)
            );
        }
    }
}
