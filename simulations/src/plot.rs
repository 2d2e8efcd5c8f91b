//! Small SVG line charts: axes with ticks, labels, a legend, polylines and
//! dashed vertical markers. Numbers are printed with fixed precision, so the
//! same data gives the same bytes.

use std::fmt::Write as _;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
    /// Dashed vertical lines with a label, at x positions.
    pub markers: Vec<(f64, String)>,
    /// Fixed x range (points outside are left out); from the data when
    /// `None`.
    pub x_range: Option<(f64, f64)>,
    /// Fixed y range; computed from the data when `None`.
    pub y_range: Option<(f64, f64)>,
    /// Draw points as steps (a CDF of arrivals) rather than straight lines.
    pub steps: bool,
}

/// A "nice" tick step for a range, so that there are about `target` ticks.
fn tick_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    /// Renders the chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let visible = |x: f64| self.x_range.is_none_or(|(a, b)| x >= a && x <= b);
        let points = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, _)| visible(*x));
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        for (x, _) in self.markers.iter().filter(|(x, _)| visible(*x)) {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
        }
        if let Some((a, b)) = self.x_range {
            (x0, x1) = (a, b);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        if y0 > y1 {
            (y0, y1) = (0.0, 1.0);
        }
        if let Some((a, b)) = self.y_range {
            (y0, y1) = (a, b);
        } else {
            y0 = y0.min(0.0);
        }
        if x1 - x0 < 1e-9 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-9 {
            y1 = y0 + 1.0;
        }
        let xs = tick_step(x1 - x0, 8.0);
        let ys = tick_step(y1 - y0, 6.0);
        // Widen to whole ticks.
        x0 = (x0 / xs).floor() * xs;
        x1 = (x1 / xs).ceil() * xs;
        if self.y_range.is_none() {
            y1 = (y1 / ys).ceil() * ys;
        }
        let pw = WIDTH - LEFT - RIGHT;
        let ph = HEIGHT - TOP - BOTTOM;
        let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let py = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            LEFT + pw / 2.0,
            escape(&self.title)
        );
        // Grid and ticks.
        let mut t = x0;
        while t <= x1 + xs * 1e-6 {
            let x = px(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/>"##,
                TOP + ph
            );
            let _ = writeln!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph + 16.0,
                fmt_tick(t, xs)
            );
            t += xs;
        }
        let mut t = (y0 / ys).ceil() * ys;
        while t <= y1 + ys * 1e-6 {
            let y = py(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                fmt_tick(t, ys)
            );
            t += ys;
        }
        let _ = writeln!(
            svg,
            r#"<rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            HEIGHT - 14.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        // Markers.
        let shown = self.markers.iter().filter(|(x, _)| visible(*x));
        for (i, (x, label)) in shown.enumerate() {
            let xp = px(*x);
            let _ = writeln!(
                svg,
                r##"<line x1="{xp:.1}" y1="{TOP:.1}" x2="{xp:.1}" y2="{:.1}" stroke="#555" stroke-dasharray="5,4"/>"##,
                TOP + ph
            );
            // Labels in the right half go to the left of their line.
            let (lx, anchor) = if xp > LEFT + pw / 2.0 {
                (xp - 4.0, "end")
            } else {
                (xp + 4.0, "start")
            };
            let _ = writeln!(
                svg,
                r##"<text x="{lx:.1}" y="{:.1}" fill="#555" text-anchor="{anchor}">{}</text>"##,
                TOP + ph - 10.0 - 14.0 * (i % 3) as f64,
                escape(label)
            );
        }
        // Lines.
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut pts = String::new();
            let mut prev: Option<(f64, f64)> = None;
            for &(x, y) in s.points.iter().filter(|(x, _)| visible(*x)) {
                if self.steps
                    && let Some((_, py_prev)) = prev
                {
                    let _ = write!(pts, "{:.1},{:.1} ", px(x), py(py_prev));
                }
                let _ = write!(pts, "{:.1},{:.1} ", px(x), py(y.clamp(y0, y1)));
                prev = Some((x, y.clamp(y0, y1)));
            }
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                pts.trim_end()
            );
            let ly = TOP + 10.0 + 18.0 * i as f64;
            if ly < TOP + ph {
                let lx = LEFT + pw + 12.0;
                let _ = writeln!(
                    svg,
                    r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/>"#,
                    lx + 18.0
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                    lx + 24.0,
                    ly + 4.0,
                    escape(&s.name)
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(tick_step(100.0, 8.0), 10.0);
        assert_eq!(tick_step(1.0, 6.0), 0.2);
        assert_eq!(fmt_tick(0.4, 0.2), "0.4");
        assert_eq!(fmt_tick(20.0, 10.0), "20");
    }

    #[test]
    fn renders_lines_legend_and_markers() {
        let c = Chart {
            title: "a <b>".into(),
            x_label: "time (s)".into(),
            y_label: "%".into(),
            series: vec![Series {
                name: "views".into(),
                points: vec![(0.0, 0.0), (1.0, 50.0), (2.0, 100.0)],
            }],
            markers: vec![(1.5, "heal".into())],
            x_range: None,
            y_range: Some((0.0, 100.0)),
            steps: false,
        };
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert!(svg.contains(">heal<"));
        assert!(svg.contains(">views<"));
        assert_eq!(svg, c.to_svg(), "deterministic");
    }

    #[test]
    fn empty_chart_still_renders() {
        let c = Chart {
            title: "empty".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: Vec::new(),
            markers: Vec::new(),
            x_range: Some((0.0, 1.0)),
            y_range: None,
            steps: true,
        };
        assert!(c.to_svg().ends_with("</svg>\n"));
    }
}
