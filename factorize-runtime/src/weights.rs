//! Dense weight matrices from safetensors files, and their factorization by the cost rule when
//! the dims are only known at run time.
//!
//! The typed path ([`crate::FactorizedLinear`], `#[derive(Factorizable)]`) fixes the dims at
//! compile time. Checkpoints inspected before a model type exists (the quickstart's file mode,
//! a sweep over ranks) use this module instead: [`read_file`] loads every floating-point tensor
//! of a rank (`f64`, `f32`, `f16`, `bf16`) and says which others it left out and why,
//! [`factorize_matrix`] applies the same cost rule and engine.
//!
//! ```
//! use factorize_runtime::weights::{factorize_matrix, NamedMatrix};
//! use factorize_runtime::{FactorizeConfig, FactorizeParams, Status};
//! let m = NamedMatrix { name: "fc".into(), out_dim: 300, in_dim: 300, data: vec![0.5; 90_000] };
//! let (row, factors) = factorize_matrix(&m, &FactorizeParams::DEFAULT, &FactorizeConfig::default()).unwrap();
//! assert_eq!(row.status, Status::Replaced);
//! assert!(row.relative_error.unwrap() < 1e-6); // a rank-1 matrix
//! assert_eq!(factors.unwrap().rank, 128);
//! ```

use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use crate::config::FactorizeConfig;
use crate::cost::{linear_decision, Decision, FactorizeParams, LayerKind};
use crate::engine::{self, LowRank, WeightMatrix};
use crate::error::FactorizeError;
use crate::report::LayerReport;

/// A named `[out, in]` row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedMatrix {
    /// The tensor's name in the file.
    pub name: String,
    /// Rows.
    pub out_dim: usize,
    /// Columns.
    pub in_dim: usize,
    /// Row-major values.
    pub data: Vec<f64>,
}

fn load_error(path: &Path, reason: impl ToString) -> FactorizeError {
    FactorizeError::Load {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// A tensor [`read_file`] left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The tensor's name in the file.
    pub name: String,
    /// Why, e.g. `rank 1, not 2` or `dtype I64 is not floating point`.
    pub reason: String,
}

/// What [`read_file`] found: the tensors it read, in name order, and those it left out.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorFile {
    /// The tensors of the rank asked for, flattened to `[first dim, rest]`.
    pub tensors: Vec<NamedMatrix>,
    /// Every other tensor, with the reason, in name order.
    pub skipped: Vec<Skipped>,
}

/// Every tensor of rank `rank` and a floating-point dtype (`f64`, `f32`, `f16`, `bf16`) of the
/// safetensors file at `path`, flattened to `[first dim, product of the rest]`, and the others
/// with the reason each was left out.
///
/// Errors name the file: it cannot be read, it is not a safetensors file, or a tensor holds
/// NaN or ±Inf (named, with the index).
pub fn read_file(path: impl AsRef<Path>, rank: usize) -> Result<TensorFile, FactorizeError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| load_error(path, e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        load_error(
            path,
            format!("not a safetensors file (its header does not parse: {e:?})"),
        )
    })?;
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    for (name, view) in file.tensors() {
        let shape = view.shape();
        if shape.len() != rank {
            let reason = format!("rank {}, not {rank}", shape.len());
            skipped.push(Skipped { name, reason });
            continue;
        }
        let raw = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            other => {
                let reason = format!("dtype {other:?} is not floating point");
                skipped.push(Skipped { name, reason });
                continue;
            }
        };
        if let Some((index, value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(load_error(
                path,
                format!("tensor `{name}` holds a non-finite value ({value}) at index {index}"),
            ));
        }
        let (out_dim, in_dim) = match shape {
            [] => (1, 1),
            [n] => (1, *n),
            [o, rest @ ..] => (*o, rest.iter().product()),
        };
        tensors.push(NamedMatrix {
            name,
            out_dim,
            in_dim,
            data,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    skipped.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(TensorFile { tensors, skipped })
}

/// Every rank-2 floating-point tensor of the file, in name order; see [`read_file`], which also
/// says what it left out.
pub fn read_matrices(path: impl AsRef<Path>) -> Result<Vec<NamedMatrix>, FactorizeError> {
    read_tensors(path, 2)
}

/// Every floating-point tensor of rank `rank` of the file, flattened, in name order; see
/// [`read_file`], which also says what it left out.
pub fn read_tensors(
    path: impl AsRef<Path>,
    rank: usize,
) -> Result<Vec<NamedMatrix>, FactorizeError> {
    Ok(read_file(path, rank)?.tensors)
}

/// Applies the linear cost rule to `m` (as the weight of a `Linear(in → out)`) and, when it
/// says so, factorizes it. Returns the report row and the factors of a replaced layer.
pub fn factorize_matrix(
    m: &NamedMatrix,
    params: &FactorizeParams,
    cfg: &FactorizeConfig,
) -> Result<(LayerReport, Option<LowRank>), FactorizeError> {
    if let Err((parameter, e)) = params.validate() {
        return Err(FactorizeError::Parameter {
            layer: m.name.clone(),
            parameter,
            reason: e.to_string(),
        });
    }
    let w = WeightMatrix::new(&m.name, &m.data, m.out_dim, m.in_dim)?;
    let decision = linear_decision(params, m.in_dim, m.out_dim);
    let mut row = LayerReport::new(
        m.name.clone(),
        LayerKind::Linear,
        m.in_dim,
        m.out_dim,
        1,
        decision.into(),
    );
    let Decision::Replace { latent } = decision else {
        return Ok((row, None));
    };
    let solved = engine::solve(&w, latent, cfg)?;
    row.set_replaced(
        latent,
        solved.value.relative_error,
        solved.backend,
        solved.time,
    );
    row.note = solved.note;
    Ok((row, Some(solved.value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A file with a scalar, a vector, a matrix and a rank-3 tensor, and the path it was
    /// written to.
    fn file(dir: &str) -> std::path::PathBuf {
        let scalar = 2.5f32.to_le_bytes().to_vec();
        let vector: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let matrix: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let cube: Vec<u8> = (0..12).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let views = [
            ("s", TensorView::new(Dtype::F32, vec![], &scalar).unwrap()),
            ("v", TensorView::new(Dtype::F64, vec![2], &vector).unwrap()),
            (
                "m",
                TensorView::new(Dtype::F32, vec![2, 3], &matrix).unwrap(),
            ),
            (
                "c",
                TensorView::new(Dtype::F32, vec![2, 3, 2], &cube).unwrap(),
            ),
        ];
        write(dir, views.into())
    }

    #[test]
    fn tensors_of_every_rank_are_read_without_panicking() {
        let path = file(&format!("factorize-weights-{}", std::process::id()));
        let dims = |rank| -> Vec<(String, usize, usize, usize)> {
            read_tensors(&path, rank)
                .unwrap()
                .into_iter()
                .map(|m| (m.name, m.out_dim, m.in_dim, m.data.len()))
                .collect()
        };
        assert_eq!(dims(0), [("s".to_string(), 1, 1, 1)]);
        assert_eq!(dims(1), [("v".to_string(), 1, 2, 2)]);
        assert_eq!(dims(2), [("m".to_string(), 2, 3, 6)]);
        assert_eq!(dims(3), [("c".to_string(), 2, 6, 12)]);
        assert_eq!(
            read_matrices(&path).unwrap()[0].data,
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        let skipped: Vec<(String, String)> = read_file(&path, 2)
            .unwrap()
            .skipped
            .into_iter()
            .map(|s| (s.name, s.reason))
            .collect();
        assert_eq!(
            skipped,
            [
                ("c".to_string(), "rank 3, not 2".to_string()),
                ("s".to_string(), "rank 0, not 2".to_string()),
                ("v".to_string(), "rank 1, not 2".to_string()),
            ]
        );
        // Not a safetensors file: an error naming it, saying so.
        std::fs::write(&path, b"not safetensors").unwrap();
        let e = read_matrices(&path).unwrap_err().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("not a safetensors file"),
            "{e}"
        );
    }

    fn write(dir: &str, views: Vec<(&str, TensorView<'_>)>) -> std::path::PathBuf {
        let bytes = safetensors::serialize(views, &None).unwrap();
        let dir = std::env::temp_dir().join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn half_precision_is_read_and_integers_are_named_as_skipped() {
        let values = [0.5f32, -1.25, 3.0, 0.0];
        let f16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let ints: Vec<u8> = [1i64, 2, 3, 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let path = write(
            &format!("factorize-half-{}", std::process::id()),
            vec![
                ("a", TensorView::new(Dtype::F16, vec![2, 2], &f16).unwrap()),
                (
                    "b",
                    TensorView::new(Dtype::BF16, vec![2, 2], &bf16).unwrap(),
                ),
                (
                    "ids",
                    TensorView::new(Dtype::I64, vec![2, 2], &ints).unwrap(),
                ),
            ],
        );
        let file = read_file(&path, 2).unwrap();
        let expected: Vec<f64> = values.iter().map(|v| *v as f64).collect();
        assert_eq!(file.tensors.len(), 2);
        assert!(file.tensors.iter().all(|t| t.data == expected));
        assert_eq!(
            file.skipped,
            [Skipped {
                name: "ids".into(),
                reason: "dtype I64 is not floating point".into()
            }]
        );
    }

    #[test]
    fn a_non_finite_value_is_an_error_naming_the_tensor() {
        let data: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let path = write(
            &format!("factorize-nan-{}", std::process::id()),
            vec![(
                "x.heldout",
                TensorView::new(Dtype::F32, vec![1, 2], &data).unwrap(),
            )],
        );
        let e = read_file(&path, 2).unwrap_err().to_string();
        assert!(
            e.contains("`x.heldout`") && e.contains("NaN") && e.contains("index 1"),
            "{e}"
        );
    }
}
