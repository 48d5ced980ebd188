//! A run's files: `history.jsonl`, `finals.json`, `results.json`, `timeline.html` and
//! `latency.svg`; and re-checking a stored run (`flotilla-jepsen check DIR`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

use crate::history::{Nemesis, Op, OpKind, Phase};
use crate::workload::Workload;

/// valid, invalid, or unknown (a checker ran out of budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid,
    Unknown,
}

/// Writes the history, the final reads and the pictures; `check_dir` then writes results.
pub fn write_all(
    dir: &Path,
    workload: Workload,
    ops: &[Op],
    faults: &[Nemesis],
    finals: &Value,
    crashed: &[(usize, String)],
) -> anyhow::Result<()> {
    let mut jsonl = String::new();
    for op in ops {
        jsonl.push_str(&serde_json::to_string(op)?);
        jsonl.push('\n');
    }
    std::fs::write(dir.join("history.jsonl"), jsonl)?;
    let meta = json!({
        "workload": workload.name(),
        "nemesis": faults,
        "finals": finals,
        "crashed": crashed.iter().map(|(n, s)| json!({"node": n, "status": s})).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(&meta)?)?;
    std::fs::write(dir.join("timeline.html"), timeline(ops, faults))?;
    std::fs::write(dir.join("latency.svg"), latency_plot(ops, faults))?;
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<(Workload, Vec<Op>, Vec<Nemesis>, Value, Value)> {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run.json")).context("reading run.json")?,
    )?;
    let workload: Workload = meta["workload"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(anyhow::Error::msg)?;
    let mut ops = Vec::new();
    for line in std::fs::read_to_string(dir.join("history.jsonl"))
        .context("reading history.jsonl")?
        .lines()
    {
        if !line.trim().is_empty() {
            ops.push(serde_json::from_str(line)?);
        }
    }
    let faults: Vec<Nemesis> = serde_json::from_value(meta["nemesis"].clone())?;
    Ok((
        workload,
        ops,
        faults,
        meta["finals"].clone(),
        meta["crashed"].clone(),
    ))
}

/// Checks a stored run and writes `results.json`.
pub fn check_dir(dir: &Path) -> anyhow::Result<Verdict> {
    let (workload, ops, _faults, finals, crashed) = load(dir)?;
    let mut results = crate::check::check(workload, &ops, &finals);
    if crashed.as_array().is_some_and(|a| !a.is_empty()) {
        results["valid"] = json!(false);
        results["crashed"] = crashed;
    }
    let verdict = match &results["valid"] {
        Value::Bool(true) => Verdict::Valid,
        Value::Bool(false) => Verdict::Invalid,
        _ => Verdict::Unknown,
    };
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(verdict)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Operations per process over time, as bars coloured by outcome; fault windows shaded.
fn timeline(ops: &[Op], faults: &[Nemesis]) -> String {
    let end_ns = ops.iter().map(|o| o.time_ns).max().unwrap_or(1).max(1);
    let px_per_s = 40.0;
    let width = (end_ns as f64 / 1e9 * px_per_s).ceil() as usize + 200;
    let mut procs: Vec<u64> = ops.iter().map(|o| o.process).collect();
    procs.sort();
    procs.dedup();
    let row = |p: u64| procs.iter().position(|&q| q == p).unwrap_or(0);
    let x = |ns: u64| 150.0 + ns as f64 / 1e9 * px_per_s;
    let height = procs.len() * 14 + 60;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">"#
    );
    for w in fault_windows(faults, end_ns) {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="20" width="{:.1}" height="{}" fill="#f3c4c4" opacity="0.6"><title>{}</title></rect><text x="{:.1}" y="14">{}</text>"##,
            x(w.0),
            (x(w.1) - x(w.0)).max(1.0),
            height - 30,
            html_escape(&w.2),
            x(w.0),
            html_escape(&w.2)
        );
    }
    for (i, p) in procs.iter().enumerate() {
        let _ = write!(svg, r#"<text x="4" y="{}">process {p}</text>"#, 32 + i * 14);
    }
    let mut open: std::collections::HashMap<u64, &Op> = std::collections::HashMap::new();
    for op in ops {
        if op.kind == OpKind::Invoke {
            open.insert(op.process, op);
            continue;
        }
        let Some(inv) = open.remove(&op.process) else {
            continue;
        };
        let colour = match op.kind {
            OpKind::Ok => "#6cbf6c",
            OpKind::Fail => "#e0a040",
            _ => "#8888ee",
        };
        let title = format!(
            "{} {} {} -> {:?} {} ({:.1} ms){}",
            op.f,
            op.key.clone().unwrap_or_default(),
            inv.value,
            op.kind,
            op.value,
            (op.time_ns - inv.time_ns) as f64 / 1e6,
            op.error
                .as_ref()
                .map(|e| format!(" {e}"))
                .unwrap_or_default()
        );
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{}" width="{:.1}" height="10" fill="{colour}"><title>{}</title></rect>"#,
            x(inv.time_ns),
            24 + row(op.process) * 14,
            (x(op.time_ns) - x(inv.time_ns)).max(0.5),
            html_escape(&title)
        );
    }
    svg.push_str("</svg>");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>timeline</title></head><body>\
         <p>Operations per process over time (green ok, orange failed, blue unknown; hover for details). \
         Shaded: fault windows.</p>{svg}</body></html>"
    )
}

/// (start, end, label) of each fault, closing open ones at `end_ns`.
fn fault_windows(faults: &[Nemesis], end_ns: u64) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    let mut started: Vec<&Nemesis> = Vec::new();
    for f in faults {
        match f.phase {
            Phase::Start => started.push(f),
            Phase::Stop => {
                if let Some(pos) = started.iter().position(|s| s.fault == f.fault) {
                    let s = started.remove(pos);
                    out.push((s.time_ns, f.time_ns, format!("{} {:?}", s.fault, s.targets)));
                }
            }
        }
    }
    for s in started {
        out.push((s.time_ns, end_ns, format!("{} {:?}", s.fault, s.targets)));
    }
    out
}

/// Latency of every completed operation over time (log scale), and throughput per second.
fn latency_plot(ops: &[Op], faults: &[Nemesis]) -> String {
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 20.0, 360.0);
    let end_s = (ops.iter().map(|o| o.time_ns).max().unwrap_or(1) as f64 / 1e9).max(1.0);
    let x = |s: f64| left + s / end_s * (w - left - 20.0);
    // Latency axis: 0.1 ms .. 10 s, logarithmic.
    let y = |ms: f64| {
        let l = ms.clamp(0.1, 10_000.0).log10();
        bottom - (l + 1.0) / 5.0 * (bottom - top)
    };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="monospace" font-size="10">"#
    );
    for (s, e, label) in fault_windows(faults, (end_s * 1e9) as u64) {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{}" fill="#f3c4c4" opacity="0.6"><title>{}</title></rect>"##,
            x(s as f64 / 1e9),
            (x(e as f64 / 1e9) - x(s as f64 / 1e9)).max(1.0),
            bottom - top,
            html_escape(&label)
        );
    }
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="4" y="{:.1}">{ms} ms</text>"##,
            w - 20.0,
            y(ms),
            y(ms),
            y(ms) + 3.0
        );
    }
    let mut open: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut per_second = vec![0u32; end_s.ceil() as usize + 1];
    for op in ops {
        if op.kind == OpKind::Invoke {
            open.insert(op.process, op.time_ns);
            continue;
        }
        let Some(t0) = open.remove(&op.process) else {
            continue;
        };
        let colour = match op.kind {
            OpKind::Ok => "#2a8a2a",
            OpKind::Fail => "#d08000",
            _ => "#4040d0",
        };
        let s = t0 as f64 / 1e9;
        let ms = (op.time_ns - t0) as f64 / 1e6;
        let _ = write!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.5" fill="{colour}"/>"#,
            x(s),
            y(ms)
        );
        if op.kind == OpKind::Ok {
            per_second[(op.time_ns / 1_000_000_000) as usize] += 1;
        }
    }
    let max = per_second.iter().copied().max().unwrap_or(1).max(1) as f64;
    let points: Vec<String> = per_second
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "{:.1},{:.1}",
                x(i as f64 + 0.5),
                410.0 - *n as f64 / max * 40.0
            )
        })
        .collect();
    let _ = write!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="#333"/><text x="4" y="400">ok/s (max {max})</text><text x="{:.1}" y="{}">time (s) 0 .. {end_s:.0}</text></svg>"##,
        points.join(" "),
        left,
        bottom + 14.0
    );
    svg
}
