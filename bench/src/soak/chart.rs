//! The run as an SVG chart over time, drawn from the report's JSON series: operations per
//! second by outcome, OK latency (p50, p99), server and agents' memory, and a dashed line
//! at each injected fault. Plain SVG (polylines and text): nothing to install to view it.

use serde_json::Value;

const W: f64 = 900.0;
const PANEL: f64 = 170.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 46.0;
const GAP: f64 = 40.0;

/// One line of a panel: its label, colour and the value per point.
struct Line<'a> {
    label: &'a str,
    colour: &'a str,
    values: Vec<Option<f64>>,
}

/// The chart of a report's JSON (see `Report::json`).
pub fn svg(report: &Value, title: &str) -> String {
    let series = report["series"].as_array().cloned().unwrap_or_default();
    let t: Vec<f64> = series
        .iter()
        .map(|p| p["t"].as_f64().unwrap_or(0.0))
        .collect();
    let col = |key: &str, scale: f64| -> Vec<Option<f64>> {
        series
            .iter()
            .map(|p| p[key].as_f64().map(|v| v * scale))
            .collect()
    };
    let faults: Vec<f64> = report["faults"]
        .as_array()
        .map(|f| f.iter().filter_map(|x| x["t"].as_f64()).collect())
        .unwrap_or_default();
    let panels = [
        (
            "operations per second",
            vec![
                Line {
                    label: "ok",
                    colour: "#2a9d3c",
                    values: col("ok", 1.0),
                },
                Line {
                    label: "visible error",
                    colour: "#e08a00",
                    values: col("visible", 1.0),
                },
                Line {
                    label: "SILENT",
                    colour: "#d0021b",
                    values: col("silent", 1.0),
                },
            ],
        ),
        (
            "OK latency, ms",
            vec![
                Line {
                    label: "p50",
                    colour: "#1f6fd1",
                    values: col("p50_ms", 1.0),
                },
                Line {
                    label: "p99",
                    colour: "#8e44ad",
                    values: col("p99_ms", 1.0),
                },
            ],
        ),
        (
            "memory (RSS), MiB; server descriptors",
            vec![
                Line {
                    label: "server",
                    colour: "#1f6fd1",
                    values: col("server_rss_kib", 1.0 / 1024.0),
                },
                Line {
                    label: "agents",
                    colour: "#16a085",
                    values: col("agents_rss_kib", 1.0 / 1024.0),
                },
                Line {
                    label: "server fds",
                    colour: "#7f8c8d",
                    values: col("server_fds", 1.0),
                },
            ],
        ),
    ];
    let height = TOP + panels.len() as f64 * (PANEL + GAP) + 10.0;
    let t_max = t.iter().copied().fold(1.0, f64::max);
    let x = |tv: f64| LEFT + tv / t_max * (W - LEFT - RIGHT);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"18\" font-size=\"13\">{}</text>\n",
        escape(title)
    );
    for (i, (name, lines)) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        let bottom = top + PANEL;
        let y_max = lines
            .iter()
            .flat_map(|l| l.values.iter().flatten())
            .copied()
            .fold(1.0, f64::max)
            * 1.1;
        let y = |v: f64| bottom - v / y_max * PANEL;
        out += &format!(
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{}\" height=\"{PANEL}\" fill=\"none\" \
             stroke=\"#bbb\"/>\n<text x=\"{LEFT}\" y=\"{}\">{}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n\
             <text x=\"{}\" y=\"{bottom}\" text-anchor=\"end\">0</text>\n",
            W - LEFT - RIGHT,
            top - 5.0,
            escape(name),
            LEFT - 4.0,
            top + 10.0,
            y_max,
            LEFT - 4.0,
        );
        for f in &faults {
            out += &format!(
                "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#d0021b\" \
                 stroke-opacity=\"0.25\" stroke-dasharray=\"3,3\"/>\n",
                x(*f)
            );
        }
        for (k, line) in lines.iter().enumerate() {
            let points: Vec<String> = t
                .iter()
                .zip(&line.values)
                .filter_map(|(tv, v)| v.map(|v| format!("{:.1},{:.1}", x(*tv), y(v))))
                .collect();
            out += &format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.2\" points=\"{}\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"{}\">{}</text>\n",
                line.colour,
                points.join(" "),
                W - RIGHT - 110.0,
                top + 14.0 + k as f64 * 13.0,
                line.colour,
                escape(line.label)
            );
        }
    }
    out += &format!(
        "<text x=\"{LEFT}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">\
         {t_max:.0} s (dashed: injected faults)</text>\n</svg>\n",
        height - 2.0,
        W - RIGHT,
        height - 2.0
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_becomes_a_line_and_faults_dashed_marks() {
        let report = serde_json::json!({
            "series": [
                {"t": 0, "ok": 10, "visible": 0, "silent": 0, "p50_ms": 1.0, "p99_ms": 5.0,
                 "server_rss_kib": 9000, "agents_rss_kib": 18000, "server_fds": 20},
                {"t": 1, "ok": 12, "visible": 2, "silent": 0, "p50_ms": 1.5, "p99_ms": 9.0,
                 "server_rss_kib": 9100, "agents_rss_kib": 18100, "server_fds": 22},
            ],
            "faults": [{"t": 0.5, "fault": "agent killed"}],
        });
        let svg = svg(&report, "a <run>");
        assert_eq!(svg.matches("<polyline").count(), 8);
        assert_eq!(svg.matches("stroke-dasharray").count(), 3);
        assert!(svg.contains("a &lt;run&gt;"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
