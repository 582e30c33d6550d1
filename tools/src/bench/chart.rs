//! The chart of `khala bench all`: events/s against events already held, one line per
//! path, as a hand-written SVG (no font or image dependencies; any browser renders it).

use std::fmt::Write;

/// One line of the chart: a name for the legend, a colour, and `(events held, events/s)`.
pub struct Series<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    pub points: &'a [(u64, f64)],
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 70.0;

/// A step of 1, 2 or 5 × 10^k that cuts `0..max` into at most `ticks` intervals.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude)
}

/// `1500000` as `1.5M`, `250000` as `250k`.
pub fn si(v: f64) -> String {
    let (n, suffix) = if v >= 1e6 { (v / 1e6, "M") } else if v >= 1e3 { (v / 1e3, "k") } else { (v, "") };
    let text = format!("{n:.1}");
    format!("{}{suffix}", text.strip_suffix(".0").unwrap_or(&text))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The chart, with `title` above and `note` (machine, commit) below it.
pub fn svg(title: &str, note: &str, series: &[Series]) -> String {
    let points = || series.iter().flat_map(|s| s.points.iter());
    let max_x = points().map(|p| p.0 as f64).fold(0.0, f64::max).max(1.0);
    let max_y = points().map(|p| p.1).fold(0.0, f64::max).max(1.0);
    let (x_step, y_step) = (nice_step(max_x, 8.0), nice_step(max_y * 1.05, 6.0));
    let (x_end, y_end) = ((max_x / x_step).ceil() * x_step, (max_y * 1.05 / y_step).ceil() * y_step);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |v: f64| LEFT + v / x_end * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_end * plot_h;

    let mut out = String::new();
    let _ = writeln!(out, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(out, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{}" y="28" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#, WIDTH / 2.0, escape(title));
    let _ = writeln!(out, r##"<text x="{}" y="48" fill="#555" text-anchor="middle">{}</text>"##, WIDTH / 2.0, escape(note));
    // Grid and ticks.
    let mut v = 0.0;
    while v <= y_end + y_step / 2.0 {
        let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#e4e4e4"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}</text>"##, y(v), LEFT + plot_w, LEFT - 8.0, y(v) + 4.0, si(v));
        v += y_step;
    }
    let mut v = 0.0;
    while v <= x_end + x_step / 2.0 {
        let _ = writeln!(out, r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#f0f0f0"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##, x(v), TOP + plot_h, TOP + plot_h + 18.0, si(v));
        v += x_step;
    }
    // Axes and their labels.
    let _ = writeln!(out, r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{0}" stroke="black"/><line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/>"#, TOP + plot_h, LEFT + plot_w);
    let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">events already held (retained) when the slice ended</text>"#, LEFT + plot_w / 2.0, HEIGHT - 22.0);
    let _ = writeln!(out, r#"<text transform="translate(24 {}) rotate(-90)" text-anchor="middle" font-size="13">events/s over the slice</text>"#, TOP + plot_h / 2.0);
    // Lines, points and the legend.
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s.points.iter().map(|&(px, py)| format!("{:.1},{:.1}", x(px as f64), y(py))).collect();
        let _ = writeln!(out, r#"<polyline fill="none" stroke="{}" stroke-width="2.5" points="{}"/>"#, s.colour, path.join(" "));
        for &(px, py) in s.points {
            let _ = writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{}: {} events/s at {} held</title></circle>"#, x(px as f64), y(py), s.colour, escape(s.name), si(py), si(px as f64));
        }
        let ly = TOP + 14.0 + i as f64 * 24.0;
        let lx = LEFT + plot_w + 18.0;
        let _ = writeln!(out, r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#, lx + 26.0, s.colour, lx + 32.0, ly + 4.0, escape(s.name));
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_labels() {
        assert_eq!(nice_step(1_000_000.0, 8.0), 200_000.0);
        assert_eq!(nice_step(330_000.0, 6.0), 100_000.0);
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(200_000.0), "200k");
        assert_eq!(si(0.0), "0");
    }

    #[test]
    fn the_chart_has_axes_a_legend_and_every_point() {
        let a = [(100_000, 300_000.0), (200_000, 310_000.0)];
        let b = [(100_000, 90_000.0), (200_000, 95_000.0), (300_000, 99_000.0)];
        let svg = svg("rate <by> held", "2 cores", &[Series { name: "bare", colour: "#333", points: &a }, Series { name: "Khala & co", colour: "#c00", points: &b }]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("events/s over the slice") && svg.contains("events already held"));
        assert!(svg.contains("rate &lt;by&gt; held") && svg.contains(">Khala &amp; co</text>"));
        assert_eq!(svg.matches("<circle").count(), 5);
        assert_eq!(svg.matches("<polyline").count(), 2);
        // The y axis reaches past the highest point, the x axis to the last one.
        assert!(svg.contains(">400k</text>") && svg.contains(">300k</text>"));
    }
}
