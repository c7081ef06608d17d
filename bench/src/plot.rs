//! PNG plots of a report (plotters): slowdown against the local fraction
//! per system and workload, and the distribution of fault-back latency.
//!
//! Text needs a TrueType font: DejaVu Sans from Debian's fonts-dejavu-core
//! (or `RMEM_BENCH_FONT=path.ttf`); without one, no plot is drawn and the
//! run says so.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::report::Report;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font for plotters' "sans-serif" once.
fn font() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("RMEM_BENCH_FONT")
                .map(PathBuf::from)
                .into_iter()
                .chain(FONT_PATHS.iter().map(PathBuf::from))
                .collect();
            let (path, bytes) = candidates
                .iter()
                .find_map(|p| std::fs::read(p).ok().map(|b| (p.clone(), b)))
                .ok_or_else(|| {
                    "no TrueType font for the plots' text (apt-get install fonts-dejavu-core, \
                     or set RMEM_BENCH_FONT)"
                        .to_string()
                })?;
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes `slowdown.png` and `fault-latency.png` into `dir` (those whose
/// sections were measured); returns their paths.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, String> {
    font()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    if let (Some(cells), Some(setup)) = (&report.workloads, &report.workload_setup) {
        let path = dir.join("slowdown.png");
        slowdown(cells, setup.working_set_bytes, &path)?;
        written.push(path);
    }
    if let Some(rmem) = &report.rmem {
        let path = dir.join("fault-latency.png");
        fault_latency(rmem, &path)?;
        written.push(path);
    }
    Ok(written)
}

fn slowdown(cells: &[crate::matrix::Cell], working_set: u64, path: &Path) -> Result<(), String> {
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!(
                "Slowdown against all-local, working set {} MiB",
                working_set >> 20
            ),
            ("sans-serif", 26),
        )
        .map_err(err)?;
    let systems: Vec<&str> = {
        let mut s: Vec<&str> = cells
            .iter()
            .map(|c| c.system.as_str())
            .filter(|s| *s != "local")
            .collect();
        s.dedup();
        s.sort_unstable();
        s.dedup();
        s
    };
    for (area, name) in root
        .split_evenly((2, 2))
        .iter()
        .zip(crate::workloads::ALL.map(|w| w.name()))
    {
        let cells: Vec<_> = cells.iter().filter(|c| c.name == name).collect();
        let top = cells
            .iter()
            .filter_map(|c| c.slowdown)
            .fold(2.0f64, f64::max)
            * 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.2f64..1.05f64, (0.8f64..top).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("fraction of the working set kept local")
            .y_desc("slowdown (x, log)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, system) in systems.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut points: Vec<(f64, f64)> = cells
                .iter()
                .filter(|c| c.system == *system)
                .filter_map(|c| Some((c.local_fraction, c.slowdown?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
                .map_err(err)?
                .label(*system)
                .legend(swatch(color, 3));
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present().map_err(err)
}

fn fault_latency(rmem: &crate::region::RegionFigures, path: &Path) -> Result<(), String> {
    let cdf = &rmem.fault_cdf_us;
    let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let lo = cdf.first().map_or(1.0, |p| p[0]).max(0.5) * 0.8;
    let hi = cdf.last().map_or(1000.0, |p| p[0]).max(lo * 2.0) * 1.25;
    let rtt = rmem.rtt_between_faults_us;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "rmem fault-back latency (userspace path), cumulative",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log)")
        .y_desc("fraction of faults")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let blue = Palette99::pick(0).to_rgba();
    chart
        .draw_series(LineSeries::new(
            cdf.iter().map(|p| (p[0], p[1])),
            blue.stroke_width(3),
        ))
        .map_err(err)?
        .label(format!(
            "fault p50 {:.1} µs, p99 {:.1} µs ({} faults)",
            rmem.fault_us.p50, rmem.fault_us.p99, rmem.fault_us.count
        ))
        .legend(swatch(blue, 3));
    let red = Palette99::pick(1).to_rgba();
    for (v, what) in [(rtt.p50, "p50"), (rtt.p99, "p99")] {
        if v > lo && v < hi {
            chart
                .draw_series(LineSeries::new(
                    vec![(v, 0.0), (v, 1.0)],
                    red.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("raw 4 KiB TCP round trip {what}: {v:.1} µs"))
                .legend(swatch(red, 2));
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)
}

/// A legend entry's sample: a short line in the series' colour and width.
fn swatch(color: RGBAColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(width))
}

/// Draws the legend box of `chart` at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 16))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)
}
