//! Per-second series recorded during a run, and `--report FILE.html`: one self-contained
//! HTML file with inline SVG line charts (no scripts, no network) and the summary tables.

use std::fmt::Write as _;

use serde_json::{json, Value};

/// One value a second over the run (index i covers second i to i+1 after the start).
#[derive(Debug, Default, Clone)]
pub struct Series {
    /// Seconds since the start at the end of each interval.
    pub t_s: Vec<f64>,
    pub sent_msgs_per_sec: Vec<f64>,
    /// Acknowledged (durable) messages a second: the publish rate.
    pub publish_msgs_per_sec: Vec<f64>,
    pub consume_msgs_per_sec: Vec<f64>,
    /// Percentiles of the acks and deliveries within each second, ms (`None`: none).
    pub ack_p50_ms: Vec<Option<f64>>,
    pub ack_p99_ms: Vec<Option<f64>>,
    pub e2e_p50_ms: Vec<Option<f64>>,
    pub e2e_p99_ms: Vec<Option<f64>>,
    /// Messages acknowledged but not yet received, summed over consumers.
    pub backlog_msgs: Vec<u64>,
    /// "warmup", "run", "build" (building the backlog) or "drain" (catching up).
    pub phase: Vec<&'static str>,
}

impl Series {
    pub fn to_json(&self, message_size: u64) -> Value {
        let mb = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .map(|x| round3(x * message_size as f64 / 1e6))
                .collect()
        };
        json!({
            "t_s": self.t_s.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
            "phase": self.phase,
            "sent_msgs_per_sec": self.sent_msgs_per_sec.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "publish_msgs_per_sec": self.publish_msgs_per_sec.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "publish_mb_per_sec": mb(&self.publish_msgs_per_sec),
            "consume_msgs_per_sec": self.consume_msgs_per_sec.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "consume_mb_per_sec": mb(&self.consume_msgs_per_sec),
            "ack_latency_ms": { "p50": self.ack_p50_ms, "p99": self.ack_p99_ms },
            "end_to_end_latency_ms": { "p50": self.e2e_p50_ms, "p99": self.e2e_p99_ms },
            "backlog_msgs": self.backlog_msgs,
        })
    }

    /// Time ranges (start, end, phase) where the phase is not "run".
    fn bands(&self) -> Vec<(f64, f64, &'static str)> {
        let mut out: Vec<(f64, f64, &'static str)> = Vec::new();
        let mut prev_t = 0.0;
        for (t, phase) in self.t_s.iter().zip(&self.phase) {
            if *phase != "run" {
                match out.last_mut() {
                    Some(last) if last.2 == *phase && (last.1 - prev_t).abs() < 1e-9 => last.1 = *t,
                    _ => out.push((prev_t, *t, phase)),
                }
            }
            prev_t = *t;
        }
        out
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What goes into the HTML page besides the series.
#[derive(Debug)]
pub struct Page<'a> {
    pub title: String,
    pub summary: Vec<(String, String)>,
    pub config: Vec<(String, String)>,
    pub notes: &'a [String],
    pub series: &'a Series,
}

pub fn html(page: &Page) -> String {
    let s = page.series;
    let some = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
    let publish = some(&s.publish_msgs_per_sec);
    let consume = some(&s.consume_msgs_per_sec);
    let backlog: Vec<Option<f64>> = s.backlog_msgs.iter().map(|x| Some(*x as f64)).collect();
    let bands = s.bands();
    let has_consume = s.consume_msgs_per_sec.iter().any(|x| *x > 0.0);
    let mut throughput = vec![Line {
        label: "publish (acked)",
        color: "#1f77b4",
        values: &publish,
    }];
    if has_consume {
        throughput.push(Line {
            label: "consume",
            color: "#2ca02c",
            values: &consume,
        });
    }
    let mut charts = String::new();
    charts += &chart(
        "Throughput",
        "msg/s",
        &s.t_s,
        &throughput,
        &bands,
        Format::Count,
    );
    charts += &chart(
        "Publish → ack latency (per second)",
        "ms",
        &s.t_s,
        &[
            Line {
                label: "p50",
                color: "#1f77b4",
                values: &s.ack_p50_ms,
            },
            Line {
                label: "p99",
                color: "#d62728",
                values: &s.ack_p99_ms,
            },
        ],
        &bands,
        Format::Ms,
    );
    if has_consume {
        charts += &chart(
            "End-to-end latency, publish → delivery (per second)",
            "ms",
            &s.t_s,
            &[
                Line {
                    label: "p50",
                    color: "#2ca02c",
                    values: &s.e2e_p50_ms,
                },
                Line {
                    label: "p99",
                    color: "#d62728",
                    values: &s.e2e_p99_ms,
                },
            ],
            &bands,
            Format::Ms,
        );
    }
    if s.phase.iter().any(|p| *p == "build" || *p == "drain") {
        charts += &chart(
            "Backlog (acknowledged, not yet consumed; all consumers)",
            "messages",
            &s.t_s,
            &[Line {
                label: "backlog",
                color: "#ff7f0e",
                values: &backlog,
            }],
            &bands,
            Format::Count,
        );
    }
    let table = |rows: &[(String, String)]| -> String {
        let mut out = String::from("<table>\n");
        for (k, v) in rows {
            let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
        }
        out + "</table>\n"
    };
    let mut notes = String::new();
    if !page.notes.is_empty() {
        notes += "<h2>Notes</h2>\n<ul>\n";
        for n in page.notes {
            let _ = writeln!(notes, "<li>{}</li>", esc(n));
        }
        notes += "</ul>\n";
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #e4e4e4; vertical-align: top; }}
th {{ font-weight: 600; white-space: nowrap; }}
td {{ font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; }}
svg {{ display: block; margin: 8px 0 18px 0; }}
.cols {{ display: flex; gap: 40px; flex-wrap: wrap; }}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="cols">
<div><h2>Result</h2>
{summary}</div>
<div><h2>Configuration</h2>
{config}</div>
</div>
{notes}<h2>Over time</h2>
{charts}<p style="font-size:12px;color:#777">Shaded: warm-up (grey; not counted in the results), building the backlog (blue), catching up (orange). Latency per second is over the acks or deliveries that happened in that second.</p>
</body>
</html>
"#,
        title = esc(&page.title),
        summary = table(&page.summary),
        config = table(&page.config),
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Line<'a> {
    label: &'a str,
    color: &'a str,
    values: &'a [Option<f64>],
}

#[derive(Clone, Copy)]
enum Format {
    Count,
    Ms,
}

fn label(v: f64, format: Format) -> String {
    match format {
        Format::Count => {
            let a = v.abs();
            if a >= 1e6 {
                trim(format!("{:.2}", v / 1e6)) + "M"
            } else if a >= 1e3 {
                trim(format!("{:.1}", v / 1e3)) + "k"
            } else {
                trim(format!("{v:.1}"))
            }
        }
        Format::Ms => {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else if v.abs() >= 10.0 {
                trim(format!("{v:.1}"))
            } else {
                trim(format!("{v:.2}"))
            }
        }
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// A "nice" tick step for a range of `span` with about `ticks` ticks.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

const W: f64 = 960.0;
const H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 40.0;

/// An SVG line chart; `None` values break the line.
fn chart(
    title: &str,
    unit: &str,
    x: &[f64],
    lines: &[Line],
    bands: &[(f64, f64, &str)],
    format: Format,
) -> String {
    let x_max = x.iter().copied().fold(1.0f64, f64::max);
    let y_data_max = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let y_step = nice_step(if y_data_max > 0.0 { y_data_max } else { 1.0 }, 5.0);
    let y_max = (y_data_max / y_step).ceil().max(1.0) * y_step;
    let x_step = nice_step(x_max, 10.0).max(1.0);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |v: f64| LEFT + v / x_max * pw;
    let sy = |v: f64| TOP + ph - v / y_max * ph;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="system-ui, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="20" font-size="14" font-weight="600" fill="#222">{}</text>"##,
        esc(title)
    );
    for (a, b, phase) in bands {
        let color = match *phase {
            "warmup" => "#e8e8e8",
            "build" => "#dceaf7",
            _ => "#fde5cc",
        };
        let _ = writeln!(
            svg,
            r#"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{ph}" fill="{color}"/>"#,
            sx(*a),
            (sx(*b) - sx(*a)).max(0.5)
        );
    }
    // Grid and y labels.
    let mut v = 0.0;
    for _ in 0..100 {
        if v > y_max + y_step * 1e-6 {
            break;
        }
        let y = sy(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            label(v, format)
        );
        v += y_step;
    }
    let mut t = 0.0;
    for _ in 0..1000 {
        if t > x_max + 1e-9 {
            break;
        }
        let xx = sx(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
            TOP + ph,
            TOP + ph + 4.0,
            TOP + ph + 17.0,
            trim(format!("{t:.1}"))
        );
        t += x_step;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">seconds since start</text>"##,
        LEFT + pw / 2.0,
        H - 6.0
    );
    let _ = writeln!(
        svg,
        r##"<text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle" fill="#444">{}</text>"##,
        TOP + ph / 2.0,
        esc(unit)
    );
    for line in lines {
        let mut d = String::new();
        let mut pen_down = false;
        let mut single = Vec::new();
        for (i, (tx, value)) in x.iter().zip(line.values).enumerate() {
            match value {
                Some(v) if v.is_finite() => {
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        sx(*tx),
                        sy(*v)
                    );
                    let next_missing = !matches!(line.values.get(i + 1), Some(Some(_)));
                    if !pen_down && next_missing {
                        single.push((sx(*tx), sy(*v)));
                    }
                    pen_down = true;
                }
                _ => pen_down = false,
            }
        }
        if !d.is_empty() {
            let _ = writeln!(
                svg,
                r#"<path d="{}" fill="none" stroke="{}" stroke-width="1.8" stroke-linejoin="round"/>"#,
                d.trim_end(),
                line.color
            );
        }
        for (cx, cy) in single {
            let _ = writeln!(
                svg,
                r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="2.5" fill="{}"/>"#,
                line.color
            );
        }
    }
    // Legend, top right.
    let mut lx = W - RIGHT - 10.0;
    for line in lines.iter().rev() {
        let width = 28.0 + 7.0 * line.label.chars().count() as f64;
        lx -= width;
        let _ = writeln!(
            svg,
            r##"<line x1="{lx:.1}" y1="16" x2="{:.1}" y2="16" stroke="{}" stroke-width="3"/><text x="{:.1}" y="20" fill="#222">{}</text>"##,
            lx + 18.0,
            line.color,
            lx + 22.0,
            esc(line.label)
        );
    }
    svg + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_page() {
        let series = Series {
            t_s: vec![1.0, 2.0, 3.0],
            sent_msgs_per_sec: vec![10.0, 20.0, 30.0],
            publish_msgs_per_sec: vec![10.0, 20.0, 30.0],
            consume_msgs_per_sec: vec![0.0, 5.0, 40.0],
            ack_p50_ms: vec![Some(1.0), None, Some(2.0)],
            ack_p99_ms: vec![Some(3.0), None, Some(4.0)],
            e2e_p50_ms: vec![None, Some(1.0), Some(1.5)],
            e2e_p99_ms: vec![None, Some(2.0), Some(9.0)],
            backlog_msgs: vec![10, 20, 0],
            phase: vec!["warmup", "build", "drain"],
        };
        let notes = vec!["a <note>".to_owned()];
        let page = Page {
            title: "t".into(),
            summary: vec![("publish".into(), "1 msg/s".into())],
            config: vec![],
            notes: &notes,
            series: &series,
        };
        let text = html(&page);
        assert!(text.contains("<svg"));
        assert!(text.contains("a &lt;note&gt;"));
        assert!(!text.contains("<script"));
        assert_eq!(text.matches("<svg").count(), 4);
        assert_eq!(series.bands().len(), 3);
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(310_000.0, 5.0), 100_000.0);
        assert_eq!(label(250_000.0, Format::Count), "250k");
        assert_eq!(label(1.5, Format::Ms), "1.5");
    }
}
