//! A small hand-written SVG line-plot writer for benchmark results (no
//! plotting crate): a title, two linear axes with "nice" ticks and grid
//! lines, axis labels, one polyline per named series, optional horizontal
//! reference lines, and a legend.
//!
//! ```
//! use disco::bench::svg::LinePlot;
//! let svg = LinePlot::new("savings over time", "seconds", "MiB saved")
//!     .series("disco", vec![(0.0, 0.0), (0.5, 90.0), (0.7, 100.0)])
//!     .series("KSM", vec![(0.0, 0.0), (2.0, 60.0), (4.0, 100.0)])
//!     .reference_line(100.0, "expected")
//!     .render();
//! assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);
//! ```

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// Colours of successive series (colour-blind friendly, Okabe-Ito).
const PALETTE: [&str; 7] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
];

/// One named line: points `(x, y)` in data units, drawn in the given order.
/// Non-finite points are left out.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// CSS colour; `None` takes the next palette colour.
    pub color: Option<String>,
}

/// A dashed horizontal line at `y` with a label at its right end.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceLine {
    pub y: f64,
    pub label: String,
}

/// A line plot; build it, then [`LinePlot::render`] or [`LinePlot::write`].
#[derive(Clone, Debug, PartialEq)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub reference_lines: Vec<ReferenceLine>,
    /// Pixels.
    pub width: u32,
    pub height: u32,
    /// Start both axes at 0 even when every value is larger (default true).
    pub include_zero: bool,
}

/// `text` with `&`, `<`, `>`, `"` and `'` escaped for XML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// About `target` evenly spaced round ticks (steps of 1, 2 or 5 times a
/// power of ten) covering `[lo, hi]`: the first tick is at or below `lo`,
/// the last at or above `hi`. A degenerate range is widened first.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (mut lo, mut hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if !lo.is_finite() || !hi.is_finite() {
        return vec![0.0, 1.0];
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
        lo -= pad;
        hi += pad;
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick label: as few decimals as the step needs.
fn tick_label(v: f64, step: f64) -> String {
    // Ticks a thousand or more apart get a unit suffix (1.5M, 250k), so
    // labels of large values stay narrow enough for the left margin.
    let magnitude = (step.abs() * 10.0).log10().floor() as i32 / 3;
    let (scale, suffix) = match magnitude {
        m if m >= 3 && step.abs() >= 1e3 => (1e9, "G"),
        2 if step.abs() >= 1e3 => (1e6, "M"),
        1 if step.abs() >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    let (v, step) = (v / scale, step / scale);
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let s = format!("{v:.decimals$}");
    let s = if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    };
    if suffix.is_empty() {
        s
    } else if v == 0.0 {
        "0".into()
    } else {
        format!("{s}{suffix}")
    }
}

impl LinePlot {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> LinePlot {
        LinePlot {
            title: title.to_string(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            series: Vec::new(),
            reference_lines: Vec::new(),
            width: 720,
            height: 420,
            include_zero: true,
        }
    }

    /// Adds a series in the next palette colour.
    pub fn series(mut self, name: &str, points: Vec<(f64, f64)>) -> LinePlot {
        self.series.push(Series {
            name: name.to_string(),
            points,
            color: None,
        });
        self
    }

    /// Adds a dashed horizontal reference line.
    pub fn reference_line(mut self, y: f64, label: &str) -> LinePlot {
        self.reference_lines.push(ReferenceLine {
            y,
            label: label.to_string(),
        });
        self
    }

    pub fn size(mut self, width: u32, height: u32) -> LinePlot {
        self.width = width.max(200);
        self.height = height.max(150);
        self
    }

    fn finite_points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    }

    /// The SVG document.
    pub fn render(&self) -> String {
        let (w, h) = (self.width as f64, self.height as f64);
        let (left, right, top, bottom) = (70.0, 30.0, 40.0, 55.0);
        let (pw, ph) = (w - left - right, h - top - bottom);

        let mut xs: Vec<f64> = self.finite_points().map(|p| p.0).collect();
        let mut ys: Vec<f64> = self.finite_points().map(|p| p.1).collect();
        ys.extend(
            self.reference_lines
                .iter()
                .map(|r| r.y)
                .filter(|y| y.is_finite()),
        );
        if self.include_zero {
            xs.push(0.0);
            ys.push(0.0);
        }
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if lo.is_finite() {
                (lo, hi)
            } else {
                (0.0, 1.0)
            }
        };
        let (x_ticks, y_ticks) = {
            let (x0, x1) = range(&xs);
            let (y0, y1) = range(&ys);
            (nice_ticks(x0, x1, 8), nice_ticks(y0, y1, 6))
        };
        let (x0, x1) = (x_ticks[0], *x_ticks.last().unwrap());
        let (y0, y1) = (y_ticks[0], *y_ticks.last().unwrap());
        let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
        let x_step = x_ticks.get(1).map_or(1.0, |t| t - x_ticks[0]);
        let y_step = y_ticks.get(1).map_or(1.0, |t| t - y_ticks[0]);

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            w / 2.0,
            escape(&self.title)
        );
        // Grid, ticks and tick labels.
        for &t in &x_ticks {
            let x = sx(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e0e0e0"/>"##,
                top + ph
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                top + ph + 18.0,
                tick_label(t, x_step)
            );
        }
        for &t in &y_ticks {
            let y = sy(t);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/>"##,
                left + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 4.0,
                tick_label(t, y_step)
            );
        }
        // Axes.
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
            top + ph,
            left + pw,
            top + ph
        );
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{:.1}" stroke="black"/>"#,
            top + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            h - 12.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            top + ph / 2.0,
            top + ph / 2.0,
            escape(&self.y_label)
        );
        // Reference lines.
        for r in self.reference_lines.iter().filter(|r| r.y.is_finite()) {
            let y = sy(r.y);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#777777" stroke-dasharray="5,4"/>"##,
                left + pw
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555555">{}</text>"##,
                left + pw - 4.0,
                y - 4.0,
                escape(&r.label)
            );
        }
        // Series.
        let colors: Vec<String> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, se)| {
                se.color
                    .clone()
                    .unwrap_or_else(|| PALETTE[i % PALETTE.len()].to_string())
            })
            .collect();
        for (se, color) in self.series.iter().zip(&colors) {
            let points: Vec<String> = se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
                escape(color),
                points.join(" "),
                escape(&se.name)
            );
        }
        // Legend, top left inside the plot area, on a white box.
        let lx = left + 12.0;
        if !self.series.is_empty() {
            let longest = self
                .series
                .iter()
                .map(|se| se.name.chars().count())
                .max()
                .unwrap_or(0);
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="white" fill-opacity="0.85" stroke="#cccccc"/>"##,
                lx - 6.0,
                top + 4.0,
                36.0 + longest as f64 * 7.0,
                self.series.len() as f64 * 18.0 + 4.0
            );
        }
        for (i, (se, color)) in self.series.iter().zip(&colors).enumerate() {
            let ly = top + 14.0 + i as f64 * 18.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/>"#,
                lx + 22.0,
                escape(color)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 28.0,
                ly + 4.0,
                escape(&se.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// Renders into `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.render()).with_context(|| format!("writing {}", path.display()))
    }
}

/// One series of a [`BarPlot`]: a name, one value per category, an
/// optional (min, max) whisker per category.
pub type BarSeries = (String, Vec<f64>, Vec<Option<(f64, f64)>>);

/// One group of bars per category, one bar per series in each group, with
/// optional min-max whiskers; for ratios and other per-case figures.
#[derive(Clone, Debug, PartialEq)]
pub struct BarPlot {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
    pub reference_lines: Vec<ReferenceLine>,
    /// Where bars start (0 unless [`BarPlot::base`] says otherwise).
    pub base: f64,
    pub width: u32,
    pub height: u32,
}

impl BarPlot {
    pub fn new(title: &str, y_label: &str, categories: Vec<String>) -> BarPlot {
        BarPlot {
            title: title.to_string(),
            y_label: y_label.to_string(),
            categories,
            series: Vec::new(),
            reference_lines: Vec::new(),
            base: 0.0,
            width: 720,
            height: 420,
        }
    }

    /// Bars start at `y` instead of 0 and go up or down from it: for
    /// ratios around 1, where a few percent would not show from 0.
    pub fn base(mut self, y: f64) -> BarPlot {
        self.base = y;
        self
    }

    /// A series: one value per category (missing ones are not drawn) and
    /// optional whiskers.
    pub fn series(
        mut self,
        name: &str,
        values: Vec<f64>,
        spread: Vec<Option<(f64, f64)>>,
    ) -> BarPlot {
        self.series.push((name.to_string(), values, spread));
        self
    }

    pub fn reference_line(mut self, y: f64, label: &str) -> BarPlot {
        self.reference_lines.push(ReferenceLine {
            y,
            label: label.to_string(),
        });
        self
    }

    /// The SVG document. Bars are `<rect class="bar">` with a `<title>`.
    pub fn render(&self) -> String {
        let (w, h) = (self.width as f64, self.height as f64);
        let (left, right, top, bottom) = (70.0, 30.0, 40.0, 80.0);
        let (pw, ph) = (w - left - right, h - top - bottom);
        let mut ys: Vec<f64> = vec![self.base];
        for (_, values, spread) in &self.series {
            ys.extend(values.iter().copied().filter(|v| v.is_finite()));
            ys.extend(
                spread
                    .iter()
                    .flatten()
                    .flat_map(|&(a, b)| [a, b])
                    .filter(|v| v.is_finite()),
            );
        }
        ys.extend(
            self.reference_lines
                .iter()
                .map(|r| r.y)
                .filter(|y| y.is_finite()),
        );
        let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ticks = nice_ticks(lo, hi, 6);
        let (y0, y1) = (ticks[0], *ticks.last().unwrap());
        let y_step = ticks.get(1).map_or(1.0, |t| t - ticks[0]);
        let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            w / 2.0,
            escape(&self.title)
        );
        for &t in &ticks {
            let y = sy(t);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/>"##,
                left + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + 4.0,
                tick_label(t, y_step)
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
            sy(y0),
            left + pw,
            sy(y0)
        );
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{:.1}" stroke="black"/>"#,
            top + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            top + ph / 2.0,
            top + ph / 2.0,
            escape(&self.y_label)
        );
        let groups = self.categories.len().max(1) as f64;
        let group_w = pw / groups;
        let nseries = self.series.len().max(1) as f64;
        let bar_w = group_w * 0.7 / nseries;
        for (ci, cat) in self.categories.iter().enumerate() {
            let gx = left + ci as f64 * group_w;
            for (si, (name, values, spread)) in self.series.iter().enumerate() {
                let Some(&v) = values.get(ci).filter(|v| v.is_finite()) else {
                    continue;
                };
                let color = PALETTE[si % PALETTE.len()];
                let x = gx + group_w * 0.15 + si as f64 * bar_w;
                let (ya, yb) = (sy(v), sy(self.base));
                let _ = writeln!(
                    s,
                    r#"<rect class="bar" x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}: {v}</title></rect>"#,
                    ya.min(yb),
                    bar_w * 0.9,
                    (yb - ya).abs(),
                    escape(cat),
                    escape(name)
                );
                if let Some(Some((a, b))) = spread.get(ci) {
                    if a.is_finite() && b.is_finite() {
                        let cx = x + bar_w * 0.45;
                        let _ = writeln!(
                            s,
                            r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black" stroke-width="1.5"/>"#,
                            sy(*a),
                            sy(*b)
                        );
                    }
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                gx + group_w / 2.0,
                top + ph + 16.0,
                escape(cat)
            );
        }
        for r in self.reference_lines.iter().filter(|r| r.y.is_finite()) {
            let y = sy(r.y);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#777777" stroke-dasharray="5,4"/>"##,
                left + pw
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555555">{}</text>"##,
                left + pw - 4.0,
                y - 4.0,
                escape(&r.label)
            );
        }
        // The legend in rows under the plot, each entry as wide as its name
        // (about 6.6 px per character at this font size).
        let mut placed = Vec::new();
        let (mut lx, mut row) = (left, 0.0);
        for (name, _, _) in &self.series {
            let entry = 20.0 + 6.6 * name.chars().count() as f64 + 18.0;
            if lx > left && lx + entry > w - right {
                lx = left;
                row += 1.0;
            }
            placed.push((lx, row));
            lx += entry;
        }
        for (si, (name, _, _)) in self.series.iter().enumerate() {
            let (lx, row) = placed[si];
            let ly = h - 22.0 - 16.0 * (placed.last().map_or(0.0, |p| p.1) - row);
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="10" fill="{}"/>"#,
                ly - 9.0,
                PALETTE[si % PALETTE.len()]
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#,
                lx + 20.0,
                escape(name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = nice_ticks(0.3, 7.1, 6);
        assert!(t[0] <= 0.3 && *t.last().unwrap() >= 7.1);
        assert_eq!(t, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        let t = nice_ticks(5.0, 5.0, 4);
        assert!(t[0] < 5.0 && *t.last().unwrap() > 5.0);
        assert_eq!(tick_label(0.5, 0.1), "0.5");
        assert_eq!(tick_label(20.0, 10.0), "20");
        assert_eq!(tick_label(1400.0, 200.0), "1400");
        assert_eq!(tick_label(40_000.0, 20_000.0), "40k");
        assert_eq!(tick_label(1_500_000.0, 500_000.0), "1.5M");
        assert_eq!(tick_label(3_000_000.0, 500_000.0), "3.0M");
        assert_eq!(tick_label(0.0, 500_000.0), "0");
        assert_eq!(tick_label(2e9, 1e9), "2G");
    }

    #[test]
    fn plot_has_axes_series_legend_and_escapes_text() {
        let svg = LinePlot::new("a < b", "x", "y & z")
            .series("one", vec![(0.0, 1.0), (1.0, 2.0), (f64::NAN, 3.0)])
            .series("two", vec![(0.0, 0.0), (2.0, 4.0)])
            .reference_line(3.0, "ref")
            .render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b") && svg.contains("y &amp; z"));
        assert!(svg.contains(">one<") && svg.contains(">two<") && svg.contains(">ref<"));
        assert!(!svg.contains("NaN"));
        // Every polyline has coordinates.
        for line in svg.lines().filter(|l| l.starts_with("<polyline")) {
            let pts = line.split("points=\"").nth(1).unwrap();
            let pts = &pts[..pts.find('"').unwrap()];
            assert!(pts.split(' ').all(|p| p.split(',').count() == 2));
        }
    }

    #[test]
    fn empty_plot_renders() {
        let svg = LinePlot::new("empty", "x", "y").render();
        assert!(svg.starts_with("<svg") && !svg.contains("<polyline"));
    }

    #[test]
    fn bar_plot_draws_one_bar_per_value() {
        let svg = BarPlot::new("ratios", "x", vec!["a".into(), "b & c".into()])
            .series("wall", vec![1.2, 0.9], vec![Some((1.1, 1.3)), None])
            .series("guest", vec![1.0, f64::NAN], vec![None, None])
            .reference_line(1.0, "bare")
            .render();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 3);
        assert!(svg.contains("b &amp; c") && !svg.contains("NaN"));
    }

    #[test]
    fn bars_from_a_base_go_up_and_down_from_it() {
        // Heights of the bars, in value units, from their <title> order.
        let heights = |svg: &str| -> Vec<f64> {
            svg.lines()
                .filter(|l| l.contains("class=\"bar\""))
                .map(|l| {
                    let h = l.split("height=\"").nth(1).unwrap();
                    h[..h.find('"').unwrap()].parse::<f64>().unwrap()
                })
                .collect()
        };
        let plot = BarPlot::new("r", "x", vec!["a".into(), "b".into()]).series(
            "s",
            vec![1.04, 0.98],
            vec![None, None],
        );
        let from_zero = heights(&plot.clone().render());
        let from_one = heights(&plot.base(1.0).render());
        // From 0 the two bars differ by 6 %; from 1 the first is twice the second.
        assert!((from_zero[0] / from_zero[1] - 1.04 / 0.98).abs() < 0.01);
        assert!(
            (from_one[0] / from_one[1] - 2.0).abs() < 0.05,
            "{from_one:?}"
        );
    }
}
