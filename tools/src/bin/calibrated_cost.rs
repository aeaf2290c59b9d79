//! Cost of the data-aware fit against the weight-space fit, and against Composer's reported
//! timings for its 3-iteration ALS (`factorize_matrix`: about 60 ms for 384×384 and 220 ms for
//! 1536×384 on this 2-core CPU, 768 calibration rows, ranks 32–128, PyTorch).
//!
//! `cargo run --release -p factorize-tools --bin calibrated_cost [-- OUT IN ROWS RANK]`

use std::time::Instant;

use factorize_runtime::engine::calibrated::{fit_linear, Calibration};
use factorize_runtime::engine::{low_rank, WeightMatrix};
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::Fit;
use factorize_runtime::Precision;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

fn case(out_dim: usize, in_dim: usize, rows: usize, rank: usize, runs: usize) {
    let w = matrix_with_spectrum(out_dim, in_dim, &power_law(out_dim.min(in_dim), 0.5), 1);
    // Inputs with a decaying spectrum, as activations have.
    let mix = matrix_with_spectrum(in_dim, in_dim, &power_law(in_dim, 1.0), 2);
    let z = matrix_with_spectrum(rows, in_dim, &vec![1.0; in_dim.min(rows)], 3);
    let zm = faer::MatRef::from_row_major_slice(&z, rows, in_dim);
    let mm = faer::MatRef::from_row_major_slice(&mix, in_dim, in_dim);
    let xm = zm * mm;
    let x: Vec<f64> = (0..rows)
        .flat_map(|i| (0..in_dim).map(move |j| (i, j)))
        .map(|(i, j)| xm[(i, j)])
        .collect();
    let bias = vec![0.0; out_dim];
    let m = WeightMatrix::new("w", &w, out_dim, in_dim).unwrap();
    let c = Calibration::new("w", &x, rows, in_dim).unwrap();
    let weight = best_of(runs, || low_rank(&m, rank, Precision::F64).unwrap());
    let exact = best_of(runs, || {
        fit_linear(&m, &bias, &c, rank, Fit::exact()).unwrap()
    });
    let als = best_of(runs, || {
        fit_linear(&m, &bias, &c, rank, Fit::als()).unwrap()
    });
    println!(
        "{out_dim}x{in_dim}, {rows} rows, rank {rank}: weight-space {weight:.1} ms, exact {exact:.1} ms ({:.2}x), ALS {als:.1} ms",
        exact / weight
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("integer"))
        .collect();
    match args.as_slice() {
        [o, i, n, r] => case(*o, *i, *n, *r, 1),
        _ => {
            for rank in [32, 64, 128] {
                case(384, 384, 768, rank, 15);
                case(1536, 384, 768, rank, 15);
            }
        }
    }
}
