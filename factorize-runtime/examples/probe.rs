use factorize_runtime::engine::{low_rank, WeightMatrix};
use factorize_runtime::synthetic::*;
use factorize_runtime::Precision;
use std::time::Instant;
fn main() {
    for (o, i) in [(1024usize, 1024usize), (4096, 1024), (4096, 4096)] {
        for (label, sigma) in [
            ("flat", vec![1.0; o.min(i)]),
            ("power", power_law(o.min(i), 0.5)),
            (
                "gauss-like",
                (0..o.min(i))
                    .map(|k| (1.0 - k as f64 / o.min(i) as f64).sqrt())
                    .collect(),
            ),
        ] {
            let w = matrix_with_spectrum(o, i, &sigma, 3);
            let m = WeightMatrix::new("x", &w, o, i).unwrap();
            for p in [Precision::F32, Precision::F64] {
                let t = Instant::now();
                let f = low_rank(&m, 128, p).unwrap();
                let dt = t.elapsed();
                let opt = optimal_relative_error(&sigma, 128);
                println!(
                    "{o}x{i} {label} {p:?}: {:?} iters {} excess {:.2e}",
                    dt,
                    f.iterations,
                    f.relative_error / opt - 1.0
                );
            }
        }
        let w = matrix_with_spectrum(o, i, &power_law(o.min(i), 0.5), 3);
        let mm = faer::Mat::<f32>::from_fn(o, i, |a, b| w[a * i + b] as f32);
        let t = Instant::now();
        let _ = mm.thin_svd().unwrap();
        println!("{o}x{i} faer thin_svd f32 {:?}", t.elapsed());
    }
}
