//! The figures of `frontier`, as SVG (plotters): fidelity against multiply-adds for each
//! method, and each layer's measured damage against its rank.

use std::path::Path;

use factorize_runtime::sensitivity::Sensitivity;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::pipeline::Error;

/// Figure size in pixels.
const SIZE: (u32, u32) = (900, 560);

/// One method on the frontier: `(linear multiply-adds in % of dense, held-out mean cosine)`.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Joined by a line; `false` draws markers only (measured at a few budgets).
    pub line: bool,
}

/// A distinct colour per series, readable on white.
fn colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    PALETTE[i % PALETTE.len()]
}

fn drawing(e: impl std::fmt::Display) -> Error {
    format!("cannot draw the figure: {e}").into()
}

/// A white figure at `path`.
fn canvas(path: &Path) -> Result<DrawingArea<SVGBackend<'_>, Shift>, Error> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    Ok(root)
}

/// A chart on `root` in the figures' style, `y_labels` pixels left for the y axis's labels.
fn styled<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    y_labels: u32,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(y_labels);
    builder
}

/// Writes the frontier: every curve's mean cosine against its share of the dense model's
/// linear multiply-adds, with the goals as crosses.
pub fn frontier(path: &Path, title: &str, curves: &[Curve]) -> Result<(), Error> {
    let root = canvas(path)?;
    let mut chart = styled(&root, title, 56)
        .build_cartesian_2d(0.0..80.0f64, 0.0..1.0f64)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("linear multiply-adds, % of the dense model's")
        .y_desc("held-out mean cosine to the dense model")
        .draw()
        .map_err(drawing)?;
    for (i, c) in curves.iter().enumerate() {
        let style = colour(i).stroke_width(2);
        let series = chart
            .draw_series(c.points.iter().map(|&p| Circle::new(p, 4, style.filled())))
            .map_err(drawing)?;
        series
            .label(c.label.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, style.filled()));
        if c.line {
            chart
                .draw_series(LineSeries::new(c.points.iter().copied(), style))
                .map_err(drawing)?;
        }
    }
    // The goals: 0.90 at a quarter, 0.97 at half.
    let goal = BLACK.mix(0.6).stroke_width(1);
    for (macs, cosine) in [(25.0, 0.90), (50.0, 0.97)] {
        chart
            .draw_series(std::iter::once(Cross::new((macs, cosine), 6, goal)))
            .map_err(drawing)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(drawing)
}

/// Draws the legend of the labelled series at `position`.
fn legend<'a, C: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, C>,
    position: SeriesLabelPosition,
) -> Result<(), Error> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(drawing)
}

/// The role of a layer in its encoder layer, from its path's last segment.
fn role(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// Writes each group's damage (log scale) against its rank, one colour per role of its name's
/// last segment (for layers alone: query, key, value, output, up, down), lighter for groups
/// nearer the input.
pub fn sensitivity(path: &Path, title: &str, measured: &Sensitivity) -> Result<(), Error> {
    let floor = 1e-5;
    let top = (measured.groups.iter())
        .flat_map(|g| g.ranks.iter().copied())
        .max()
        .unwrap_or(1) as f64;
    let depth = measured.groups.len().max(1) as f64;
    let root = canvas(path)?;
    let mut chart = styled(&root, title, 64)
        .build_cartesian_2d(0.0..top + 16.0, (floor..1.0f64).log_scale())
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("rank of the layer's pair (all other layers dense)")
        .y_desc("damage: mean 1 − cos of the embeddings")
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()
        .map_err(drawing)?;
    let mut roles: Vec<&str> = Vec::new();
    for (i, group) in measured.groups.iter().enumerate() {
        let r = role(&group.name);
        let k = roles.iter().position(|&x| x == r).unwrap_or_else(|| {
            roles.push(r);
            roles.len() - 1
        });
        let fade = 0.35 + 0.65 * (i as f64 + 1.0) / depth;
        let style = colour(k).mix(fade).stroke_width(1);
        let points =
            (group.ranks.iter().zip(&group.damage)).map(|(&rank, &d)| (rank as f64, d.max(floor)));
        let series = chart
            .draw_series(LineSeries::new(points, style))
            .map_err(drawing)?;
        if group.name.starts_with("layers.5.") {
            series
                .label(r.to_string())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(drawing)
}
