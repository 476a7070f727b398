//! Inline SVG charts rendered on the server: canary against baseline over
//! a canary's steps (with the threshold drawn in when known), and an
//! environment's version mix. No script and no library: a chart is markup.

use std::fmt::Write;

use super::html::esc;

/// One series point per analysis step; `None` where the side had no data.
pub struct StepSeries<'a> {
    pub title: &'a str,
    /// Unit suffix for the axis labels, e.g. "%" or "ms".
    pub unit: &'a str,
    pub steps: Vec<u32>,
    pub canary: Vec<Option<f64>>,
    pub baseline: Vec<Option<f64>>,
    /// A horizontal line: the absolute ceiling (error rate).
    pub threshold: Option<(f64, String)>,
    /// Per step: a ceiling relative to that step's baseline (latency).
    pub relative_threshold: Option<(f64, String)>,
}

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 28.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 34.0;

fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Canary and baseline as two lines over the steps.
pub fn steps_chart(s: &StepSeries) -> String {
    let n = s.steps.len();
    let mut svg = String::new();
    let label = format!(
        "{}: canary and baseline over {} step(s)",
        s.title,
        s.steps.len()
    );
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(&label),
        esc(&label)
    );
    if n == 0 {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" class="muted">no analysis yet</text></svg>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return svg;
    }
    let relative: Vec<Option<f64>> = match &s.relative_threshold {
        Some((factor, _)) => s.baseline.iter().map(|b| b.map(|b| b * factor)).collect(),
        None => vec![None; n],
    };
    let top_value = s
        .canary
        .iter()
        .chain(&s.baseline)
        .chain(&relative)
        .flatten()
        .copied()
        .chain(s.threshold.as_ref().map(|(t, _)| *t))
        .fold(0.0f64, f64::max);
    let top_value = if top_value <= 0.0 {
        1.0
    } else {
        top_value * 1.15
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |i: usize| {
        if n == 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: f64| TOP + plot_h * (1.0 - v / top_value);
    // Axes and grid: 0, half, top.
    for frac in [0.0, 0.5, 1.0] {
        let v = top_value * frac;
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 4.0,
            y(v) + 4.0,
            number(v),
            esc(s.unit),
            y = y(v)
        );
    }
    for (i, step) in s.steps.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text class="axis" x="{:.1}" y="{}" text-anchor="middle">step {step}</text>"#,
            x(i),
            HEIGHT - BOTTOM + 16.0
        );
    }
    if let Some((t, name)) = &s.threshold {
        let _ = write!(
            svg,
            r#"<line class="threshold" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"><title>{}</title></line><text class="threshold-label" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            esc(name),
            WIDTH - RIGHT,
            y(*t) - 4.0,
            esc(name),
            y = y(*t)
        );
    }
    // A limit relative to each step's baseline: a short dashed mark per step.
    if let Some((_, name)) = &s.relative_threshold {
        for (i, limit) in relative.iter().enumerate() {
            if let Some(limit) = limit {
                let _ = write!(
                    svg,
                    r#"<line class="threshold" x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"><title>{}: {}</title></line><text class="threshold-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    (x(i) - 24.0).max(LEFT),
                    (x(i) + 24.0).min(WIDTH - RIGHT),
                    esc(name),
                    number(*limit),
                    x(i).clamp(LEFT + 30.0, WIDTH - RIGHT - 30.0),
                    y(*limit) - 4.0,
                    esc(name),
                    y = y(*limit)
                );
            }
        }
    }
    line(&mut svg, "baseline", &s.baseline, &x, &y, "baseline");
    line(&mut svg, "canary", &s.canary, &x, &y, "canary");
    let _ = write!(
        svg,
        r#"<g class="legend"><rect class="canary-key" x="{LEFT}" y="{}" width="10" height="4"/><text x="{}" y="{}">canary</text><rect class="baseline-key" x="{}" y="{}" width="10" height="4"/><text x="{}" y="{}">baseline</text></g></svg>"#,
        HEIGHT - 9.0,
        LEFT + 14.0,
        HEIGHT - 4.0,
        LEFT + 74.0,
        HEIGHT - 9.0,
        LEFT + 88.0,
        HEIGHT - 4.0
    );
    svg
}

fn line(
    svg: &mut String,
    class: &str,
    values: &[Option<f64>],
    x: &dyn Fn(usize) -> f64,
    y: &dyn Fn(f64) -> f64,
    name: &str,
) {
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
        .collect();
    if points.is_empty() {
        return;
    }
    let _ = write!(
        svg,
        r#"<polyline class="{class}" points="{}"><title>{}</title></polyline>"#,
        points.join(" "),
        esc(name)
    );
    for (i, v) in values.iter().enumerate() {
        if let Some(v) = v {
            let _ = write!(
                svg,
                r#"<circle class="{class}" cx="{:.1}" cy="{:.1}" r="3"><title>{}: {}</title></circle>"#,
                x(i),
                y(*v),
                esc(name),
                number(*v)
            );
        }
    }
}

/// One module's versions in an environment as a stacked bar: `(version,
/// nodes)`, most nodes first.
pub fn version_mix(environment: &str, module: &str, versions: &[(String, u32)]) -> String {
    let total: u32 = versions.iter().map(|(_, n)| n).sum();
    let label = format!(
        "{module} in {environment}: {}",
        versions
            .iter()
            .map(|(v, n)| format!("{v} on {n} node(s)"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="mix" viewBox="0 0 300 22" preserveAspectRatio="none" role="img" aria-label="{}"><title>{}</title>"#,
        esc(&label),
        esc(&label)
    );
    let mut at = 0.0;
    for (i, (version, nodes)) in versions.iter().enumerate() {
        let w = if total == 0 {
            0.0
        } else {
            300.0 * f64::from(*nodes) / f64::from(total)
        };
        let _ = write!(
            svg,
            r#"<rect class="v{}" x="{at:.1}" y="0" width="{w:.1}" height="22"><title>{}@{}: {} node(s)</title></rect>"#,
            i % 6,
            esc(module),
            esc(version),
            nodes
        );
        at += w;
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_both_sides_and_the_threshold() {
        let svg = steps_chart(&StepSeries {
            title: "error rate",
            unit: "%",
            steps: vec![1, 2],
            canary: vec![Some(1.0), Some(2.0)],
            baseline: vec![Some(0.5), None],
            threshold: Some((5.0, "ceiling 5%".into())),
            relative_threshold: None,
        });
        assert!(svg.contains(r#"<polyline class="canary""#), "{svg}");
        assert!(svg.contains(r#"<polyline class="baseline""#), "{svg}");
        assert!(svg.contains(r#"class="threshold""#), "{svg}");
        assert!(svg.contains("step 2"), "{svg}");
        assert!(svg.contains(r#"role="img""#), "{svg}");
        let empty = steps_chart(&StepSeries {
            title: "p99",
            unit: "ms",
            steps: vec![],
            canary: vec![],
            baseline: vec![],
            threshold: None,
            relative_threshold: None,
        });
        assert!(empty.contains("no analysis yet"), "{empty}");
    }

    #[test]
    fn the_version_mix_is_proportional() {
        let svg = version_mix("dev", "hello", &[("1.1.0".into(), 3), ("1.0.0".into(), 1)]);
        assert!(svg.contains(r#"width="225.0""#), "{svg}");
        assert!(svg.contains(r#"width="75.0""#), "{svg}");
        assert!(svg.contains("hello in dev: 1.1.0 on 3 node(s), 1.0.0 on 1 node(s)"));
    }
}
