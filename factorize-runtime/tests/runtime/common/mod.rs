//! Shared helpers of the tests on real data (the root suite's tests include this file too).
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// The real all-MiniLM-L6-v2 data (`../shared/data/minilm`, or `$FACTORIZE_MINILM_DIR`).
///
/// `None` with a printed skip line when it is absent on a user's machine; under CI (`CI=true`)
/// its absence fails the test, so a broken checkout cannot pass silently.
pub fn minilm_dir(test: &str) -> Option<PathBuf> {
    // The checkout's sibling `shared/`, from whichever of the workspace's crates this runs in.
    let beside = |up: &str| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(up);
    let dir = std::env::var_os("FACTORIZE_MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            ["../shared/data/minilm", "../../shared/data/minilm"]
                .map(beside)
                .into_iter()
                .find(|d| d.is_dir())
        })
        .unwrap_or_else(|| beside("../shared/data/minilm"));
    if dir.join("weights.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: MiniLM data missing at {} under CI", dir.display());
    }
    // Straight to stderr: libtest captures `println!`, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: MiniLM data not found at {} (set FACTORIZE_MINILM_DIR)",
        dir.display()
    );
    None
}

/// Singular values of a row-major `[rows, cols]` matrix, in f64, by faer's full SVD.
pub fn singular_values(data: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let m = faer::MatRef::from_column_major_slice(data, cols, rows);
    let s = m.singular_values().expect("svd");
    let mut s: Vec<f64> = s.into_iter().collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}
