//! What a factorization did, layer by layer.
//!
//! A [`FactorizeReport`] has one [`LayerReport`] per candidate layer, in field order, with its
//! full path (`encoder.fc1`). Its `Display` is an aligned table with a totals line and a legend
//! of the columns shown (columns no row fills are left out; `{report:#}` leaves the legend out):
//!
//! ```
//! use factorize_runtime::report::{FactorizeReport, LayerReport, Status};
//! use factorize_runtime::{cost::LayerKind, Backend};
//! let mut report = FactorizeReport::default();
//! report.push(LayerReport::new("head", LayerKind::Linear, 128, 10, 1, Status::TooNarrow { width: 10, min: 256 }));
//! let mut row = LayerReport::new("fc1", LayerKind::Linear, 1024, 4096, 1, Status::Replaced);
//! row.set_replaced(128, 0.12, Backend::Cpu, std::time::Duration::from_millis(30));
//! report.push(row);
//! let text = report.to_string();
//! assert!(text.contains("fc1") && text.contains("too narrow") && text.contains("total"));
//! assert_eq!(report.replaced().count(), 1);
//! ```

use std::fmt;
use std::time::Duration;

use crate::config::Backend;
use crate::cost::{dense_macs, factorized_macs, Decision, LayerKind};

/// The path of `child` under `parent` (`encoder` + `fc1` = `encoder.fc1`); `child` at the top.
pub fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Replaced by a factorized pair.
    Replaced,
    /// Its kind is disabled by the parameters.
    Disabled,
    /// `min(in, out)` is below the minimum width.
    TooNarrow {
        /// The smaller width.
        width: usize,
        /// The minimum.
        min: usize,
    },
    /// The rank would not save multiply-adds.
    NoSaving {
        /// The requested rank.
        latent: usize,
        /// The largest saving rank.
        max_rank: usize,
    },
    /// A grouped convolution.
    Grouped,
    /// Marked `#[factorize(skip)]`.
    Skipped,
}

impl From<Decision> for Status {
    fn from(d: Decision) -> Self {
        match d {
            Decision::Replace { .. } => Status::Replaced,
            Decision::Disabled => Status::Disabled,
            Decision::TooNarrow { width, min } => Status::TooNarrow { width, min },
            Decision::NoSaving { latent, max_rank } => Status::NoSaving { latent, max_rank },
            Decision::Grouped => Status::Grouped,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Replaced => write!(f, "replaced"),
            Status::Disabled => write!(f, "kept: disabled"),
            Status::TooNarrow { width, min } => write!(f, "kept: too narrow ({width} < {min})"),
            Status::NoSaving { latent, max_rank } => {
                write!(f, "kept: no saving (rank {latent} > {max_rank})")
            }
            Status::Grouped => write!(f, "kept: grouped"),
            Status::Skipped => write!(f, "kept: skipped"),
        }
    }
}

/// One layer's row.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LayerReport {
    /// The layer's path in the model, e.g. `encoder.fc1`.
    pub path: String,
    /// Linear or convolution.
    pub kind: LayerKind,
    /// Input features or channels.
    pub in_dim: usize,
    /// Output features or channels.
    pub out_dim: usize,
    /// Kernel size (1 for linears).
    pub kernel: usize,
    /// The rank of the replacement; 0 when kept.
    pub latent: usize,
    /// Replaced, or why not.
    pub status: Status,
    /// Multiply-adds per output position, before.
    pub macs_before: usize,
    /// Multiply-adds per output position, after.
    pub macs_after: usize,
    /// Parameters (weights and bias), before.
    pub params_before: usize,
    /// Parameters, after.
    pub params_after: usize,
    /// `‖W − B·A‖_F / ‖W‖_F` of the replacement; `None` when kept.
    pub relative_error: Option<f64>,
    /// Where the factorization ran; `None` when kept.
    pub backend: Option<Backend>,
    /// Time spent on this layer.
    pub time: Duration,
    /// Output nmse on the calibration rows, for data-aware fits.
    pub nmse: Option<f64>,
    /// Output nmse on held-out rows, when evaluated
    /// ([`crate::Factorizable::evaluate_heldout`]).
    pub nmse_heldout: Option<f64>,
    /// Anything worth knowing about this layer, e.g. a fallback from the GPU to the CPU.
    pub note: Option<String>,
}

impl LayerReport {
    /// A row for a layer with `status`; a replaced layer's rank, error and backend are set by
    /// [`Self::set_replaced`].
    pub fn new(
        path: impl Into<String>,
        kind: LayerKind,
        in_dim: usize,
        out_dim: usize,
        kernel: usize,
        status: Status,
    ) -> Self {
        let macs = dense_macs(in_dim, out_dim, kernel, kernel);
        let params = macs + out_dim;
        Self {
            path: path.into(),
            kind,
            in_dim,
            out_dim,
            kernel,
            latent: 0,
            status,
            macs_before: macs,
            macs_after: macs,
            params_before: params,
            params_after: params,
            relative_error: None,
            backend: None,
            time: Duration::ZERO,
            nmse: None,
            nmse_heldout: None,
            note: None,
        }
    }

    /// Marks the row replaced by a pair of rank `latent`.
    pub fn set_replaced(
        &mut self,
        latent: usize,
        relative_error: f64,
        backend: Backend,
        time: Duration,
    ) {
        let (i, o, k) = (self.in_dim, self.out_dim, self.kernel);
        self.latent = latent;
        self.status = Status::Replaced;
        self.macs_after = factorized_macs(i, latent, o, k, k);
        self.params_after = self.macs_after + o;
        self.relative_error = Some(relative_error);
        self.backend = Some(backend);
        self.time = time;
    }

    /// Prefixes the path with a parent's name: `fc1` under `encoder` becomes `encoder.fc1`.
    pub fn nest(mut self, parent: &str) -> Self {
        if !parent.is_empty() {
            self.path = format!("{parent}.{}", self.path);
        }
        self
    }
}

/// The rows of a whole model, in field order.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct FactorizeReport {
    /// One row per candidate layer.
    pub layers: Vec<LayerReport>,
}

impl FactorizeReport {
    /// Appends a row.
    pub fn push(&mut self, row: LayerReport) {
        self.layers.push(row);
    }

    /// Appends a nested model's rows under `parent`.
    pub fn extend_nested(&mut self, parent: &str, other: FactorizeReport) {
        self.layers
            .extend(other.layers.into_iter().map(|r| r.nest(parent)));
    }

    /// The rows of replaced layers.
    pub fn replaced(&self) -> impl Iterator<Item = &LayerReport> {
        self.layers.iter().filter(|r| r.status == Status::Replaced)
    }

    /// Total multiply-adds per output position of all rows, before and after.
    pub fn total_macs(&self) -> (usize, usize) {
        self.layers
            .iter()
            .fold((0, 0), |(b, a), r| (b + r.macs_before, a + r.macs_after))
    }

    /// Total parameters of all rows, before and after.
    pub fn total_params(&self) -> (usize, usize) {
        self.layers.iter().fold((0, 0), |(b, a), r| {
            (b + r.params_before, a + r.params_after)
        })
    }

    /// Total time.
    pub fn total_time(&self) -> Duration {
        self.layers.iter().map(|r| r.time).sum()
    }
}

fn shape(r: &LayerReport) -> String {
    if r.kind == LayerKind::Conv2D {
        format!("{}→{} {}×{}", r.in_dim, r.out_dim, r.kernel, r.kernel)
    } else {
        format!("{}→{}", r.in_dim, r.out_dim)
    }
}

fn ratio(before: usize, after: usize) -> String {
    if after == 0 {
        "-".to_string()
    } else {
        format!("{:.2}x", before as f64 / after as f64)
    }
}

/// One line per column that needs explaining, shown under the table when the column is.
const LEGEND: [(&str, &str); 5] = [
    (
        "MACs/pos",
        "multiply-adds per input row of a Linear (per output pixel of a convolution), before → after",
    ),
    ("params", "weights and biases, before → after"),
    (
        "rel err",
        "the weight's relative error ‖W − BA‖ / ‖W‖ (Frobenius); for an SVD fit, the least any pair of that rank reaches",
    ),
    (
        "nmse",
        "output error on calibration inputs: mean squared error / variance of the dense layer's outputs; \"held\": on inputs not used to fit",
    ),
    (
        "why they differ",
        "rel err weighs every input direction alike, while real inputs concentrate in a few, which the kept rank serves first; \
         compare nmse with rel err², both ratios of squares",
    ),
];

/// The table's columns, in order.
const HEADER: [&str; 11] = [
    "layer", "kind", "shape", "rank", "status", "MACs/pos", "params", "rel err", "nmse", "backend",
    "time",
];

/// One row's cells, in [`HEADER`]'s order.
fn cells(r: &LayerReport) -> [String; 11] {
    [
        r.path.clone(),
        r.kind.name().to_string(),
        shape(r),
        if r.latent == 0 {
            "-".into()
        } else {
            r.latent.to_string()
        },
        r.status.to_string(),
        format!("{} → {}", r.macs_before, r.macs_after),
        format!("{} → {}", r.params_before, r.params_after),
        r.relative_error.map_or("-".into(), |e| format!("{e:.4}")),
        match (r.nmse, r.nmse_heldout) {
            (None, None) => "-".into(),
            (Some(c), None) => format!("{c:.4}"),
            (None, Some(h)) => format!("held {h:.4}"),
            (Some(c), Some(h)) => format!("{c:.4} / held {h:.4}"),
        },
        r.backend
            .map_or("-".into(), |b| format!("{b:?}").to_lowercase()),
        format!("{:.1} ms", r.time.as_secs_f64() * 1e3),
    ]
}

impl FactorizeReport {
    /// The totals line's cells, in [`HEADER`]'s order.
    fn total_cells(&self) -> [String; 11] {
        let (mb, ma) = self.total_macs();
        let (pb, pa) = self.total_params();
        let replaced = format!(
            "{} of {} replaced",
            self.replaced().count(),
            self.layers.len()
        );
        let mut cells: [String; 11] = Default::default();
        cells[0] = "total".into();
        cells[4] = replaced;
        cells[5] = format!("{mb} → {ma} ({})", ratio(mb, ma));
        cells[6] = format!("{pb} → {pa} ({})", ratio(pb, pa));
        cells[10] = format!("{:.1} ms", self.total_time().as_secs_f64() * 1e3);
        cells
    }

    /// Whether a column or legend entry is shown: optional columns appear only when a row
    /// fills them.
    fn shows(&self, name: &str) -> bool {
        let any = |p: fn(&LayerReport) -> bool| self.layers.iter().any(p);
        let error = any(|r| r.relative_error.is_some());
        let nmse = any(|r| r.nmse.is_some() || r.nmse_heldout.is_some());
        match name {
            "rel err" => error,
            "nmse" => nmse,
            "backend" => any(|r| r.backend.is_some()),
            "why they differ" => error && nmse,
            _ => true,
        }
    }
}

/// Writes `rows` as aligned columns under `header`, with rules above the body and above the
/// last row (the totals).
fn table(f: &mut fmt::Formatter<'_>, header: &[String], rows: &[Vec<String>]) -> fmt::Result {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            text.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        writeln!(f, "{}", text.trim_end())
    };
    let rule = "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1));
    line(f, header)?;
    writeln!(f, "{rule}")?;
    let (body, totals) = rows.split_at(rows.len().saturating_sub(1));
    for row in body {
        line(f, row)?;
    }
    writeln!(f, "{rule}")?;
    totals.iter().try_for_each(|row| line(f, row))
}

impl fmt::Display for FactorizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = HEADER.map(|name| self.shows(name));
        let keep = |row: [String; 11]| -> Vec<String> {
            row.into_iter()
                .zip(shown)
                .filter(|&(_, shown)| shown)
                .map(|(cell, _)| cell)
                .collect()
        };
        let header = keep(HEADER.map(String::from));
        let mut rows: Vec<Vec<String>> = self.layers.iter().map(|r| keep(cells(r))).collect();
        rows.push(keep(self.total_cells()));
        table(f, &header, &rows)?;
        for r in &self.layers {
            if let Some(note) = &r.note {
                writeln!(f, "note: {}: {note}", r.path)?;
            }
        }
        if f.alternate() {
            return Ok(());
        }
        writeln!(f)?;
        for (name, text) in LEGEND {
            if self.shows(name) {
                writeln!(f, "{name}: {text}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(nmse: Option<f64>) -> FactorizeReport {
        let mut report = FactorizeReport::default();
        report.push(LayerReport::new(
            "head",
            LayerKind::Linear,
            128,
            10,
            1,
            Status::TooNarrow {
                width: 10,
                min: 256,
            },
        ));
        let mut row = LayerReport::new("fc", LayerKind::Linear, 1024, 4096, 1, Status::Replaced);
        row.set_replaced(128, 0.38, Backend::Cpu, Duration::from_millis(3));
        row.nmse_heldout = nmse;
        report.push(row);
        report
    }

    #[test]
    fn columns_no_row_fills_are_left_out_with_their_legend() {
        let text = report(None).to_string();
        let header = text.lines().next().unwrap();
        assert!(
            header.contains("rel err") && !header.contains("nmse"),
            "{text}"
        );
        assert!(
            text.contains("\nrel err: ") && !text.contains("\nnmse: "),
            "{text}"
        );
        assert!(!text.contains("why they differ"), "{text}");
    }

    #[test]
    fn filled_columns_are_shown_and_explained() {
        let text = report(Some(0.025)).to_string();
        assert!(text.lines().next().unwrap().contains("nmse"), "{text}");
        assert!(text.contains("held 0.0250"), "{text}");
        assert!(
            text.contains("\nnmse: ") && text.contains("\nwhy they differ: "),
            "{text}"
        );
        assert!(
            text.contains("\nMACs/pos: multiply-adds per input row"),
            "{text}"
        );
        // The alternate form is the table alone.
        let table = format!("{:#}", report(Some(0.025)));
        assert!(
            table.contains("total") && !table.contains("MACs/pos: "),
            "{table}"
        );
    }
}
