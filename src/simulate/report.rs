//! What a run found, per strategy, and its two renderings: a table for the terminal and a
//! self-contained HTML page with inline SVG line charts (no script, no external asset).

use std::fmt::Write;

use crate::affinity::verdict::{Verdict, VERDICTS};

/// A whole run: every strategy over the same workload and timeline.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    pub file: String,
    pub seed: u64,
    pub clients: u32,
    /// The access log replayed instead of synthetic clients, as the scenario names it.
    pub replay: Option<String>,
    pub duration_ms: u64,
    pub strategies: Vec<StrategyReport>,
}

/// One strategy's numbers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StrategyReport {
    pub name: String,
    /// The key chain (and mapping) as the config writes it; `none` without affinity.
    pub keys: String,
    pub algorithm: String,
    /// What this run could not simulate of the pool's config.
    pub notes: Vec<String>,
    pub duration_ms: u64,
    /// Requests a backend served.
    pub requests: u64,
    /// Sessions started by clients.
    pub sessions: u64,
    /// Requests whose backend refused the connection and that could not move (retries or
    /// the retry budget spent): the client got an error.
    pub failed: u64,
    /// Requests Tether answered itself with a 503 (`no-backend`, or a strict pool's
    /// `session-unavailable`).
    pub refused: u64,
    /// Requests by the verdict `decide` (or `failover`) gave, by [`Verdict::index`].
    pub verdicts: [u64; VERDICTS],
    /// Requests that took a session in progress to another backend than its last one, by
    /// the verdict they carried.
    pub moves: [u64; VERDICTS],
    /// Sessions moved at least once while in progress.
    pub broken: u64,
    /// Of those, sessions whose first move carried no re-pin verdict: the application was
    /// not told (a hashed key moving back, a table entry gone).
    pub broken_silently: u64,
    /// Requests of a session in progress served by a backend the session had not used.
    pub unfamiliar: u64,
    pub drains: Vec<DrainReport>,
    /// The timeline's events as they happened: (simulated ms, label).
    pub events: Vec<(u64, String)>,
    pub samples: Vec<Sample>,
    /// What a replayed log gave, and how this strategy compares with the logged run.
    pub replay: Option<ReplayReport>,
    /// A split strategy's pools: what the split sent to each.
    pub split: Option<SplitReport>,
}

/// What a traffic split did: requests and new sessions per pool, overall and between
/// events, and the sessions that changed pool (Tether's split never moves one: 0 unless a
/// session's pool left the split, or its token or pin expired while it was in progress).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SplitReport {
    /// The split's pools, in its order: the index of every per-pool count.
    pub pools: Vec<String>,
    pub requests: Vec<u64>,
    /// Sessions whose first request went to each pool.
    pub sessions: Vec<u64>,
    /// The counts from each event to the next (the first from the start).
    pub segments: Vec<SplitSegment>,
    /// Requests of a session in progress sent to another pool than its last request's.
    pub pool_changes: u64,
    /// Sessions that changed pool at least once while in progress.
    pub sessions_changed_pool: u64,
}

/// A split's counts from `from_ms` to the next event (or the end).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SplitSegment {
    pub from_ms: u64,
    pub requests: Vec<u64>,
    pub sessions: Vec<u64>,
}

/// A strategy's replay of an access log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplayReport {
    /// What became of the log's lines (the same for every strategy).
    pub counts: super::replay::Counts,
    /// Sessions that were already open when the log began (their first line is a `hit`):
    /// pinned where the log says before their first request, when this strategy's key
    /// chain has Tether's cookie or the workload's application cookie.
    pub seeded: u64,
    /// Whether this strategy is the logged run's: its name is the logged pool's.
    pub matches_log: bool,
    /// Of the requests of the logged pool that the log shows served by a backend: how
    /// many this strategy replayed, and how many it sent to the same backend.
    pub compared: u64,
    pub same_backend: u64,
    /// The same, for the requests the log shows hitting an existing session (`hit`).
    pub hits_compared: u64,
    pub hits_same_backend: u64,
}

/// A drain and how long it took to empty.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DrainReport {
    pub backend: String,
    pub at_ms: u64,
    /// Until no session in progress had its last request there (the clients' view).
    pub empty_after_ms: Option<u64>,
    /// Until Tether's own count of sessions there (tables and live tokens, what the
    /// admin API and dashboard show) reached 0: when removal looks safe to an operator.
    pub counted_empty_after_ms: Option<u64>,
}

/// The state at the end of one sample interval.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    pub t_ms: u64,
    /// Max over mean of the requests per serving backend in the interval (0: none).
    pub requests_imbalance: f64,
    /// Max over mean of the sessions in progress per serving backend (0: none).
    pub sessions_imbalance: f64,
    /// Sessions broken so far.
    pub broken: u64,
    /// Sessions in progress per backend of the pool (`pool/backend` in a split).
    pub sessions_per_backend: Vec<(String, u32)>,
    /// A split's requests and new sessions per pool in the interval (empty otherwise).
    pub pool_requests: Vec<u64>,
    pub pool_sessions: Vec<u64>,
}

// === impl StrategyReport ===

impl StrategyReport {
    /// Peak and mean of a series, over the samples that had any traffic.
    fn stats(&self, f: impl Fn(&Sample) -> f64) -> (f64, f64) {
        let values: Vec<f64> = self.samples.iter().map(f).filter(|v| *v > 0.0).collect();
        if values.is_empty() {
            return (0.0, 0.0);
        }
        let peak = values.iter().copied().fold(0.0, f64::max);
        (peak, values.iter().sum::<f64>() / values.len() as f64)
    }

    pub fn requests_imbalance(&self) -> (f64, f64) {
        self.stats(|s| s.requests_imbalance)
    }

    pub fn sessions_imbalance(&self) -> (f64, f64) {
        self.stats(|s| s.sessions_imbalance)
    }

    /// Sessions moved in progress, by verdict label, largest first.
    pub fn moves_by_verdict(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> =
            Verdict::ALL.iter().map(|(v, l)| (*l, self.moves[v.index()])).filter(|(_, n)| *n > 0).collect();
        v.sort_by_key(|m| std::cmp::Reverse(m.1));
        v
    }

    pub fn moved(&self) -> u64 {
        self.moves.iter().sum()
    }
}

/// `4m12s`, `950ms`, `2h`.
pub fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if m > 0 {
        let _ = write!(out, "{m}m");
    }
    if s > 0 || out.is_empty() {
        let _ = write!(out, "{s}s");
    }
    out
}

// === the terminal table ===

impl Report {
    /// The report as text for a terminal.
    pub fn table(&self) -> String {
        let mut o = String::new();
        match &self.replay {
            Some(log) => {
                let _ = writeln!(
                    o,
                    "{}: seed {}, replay of {log}, {} simulated",
                    self.file,
                    self.seed,
                    fmt_ms(self.duration_ms)
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "{}: seed {}, {} clients, {} simulated",
                    self.file,
                    self.seed,
                    self.clients,
                    fmt_ms(self.duration_ms)
                );
            }
        }
        if let Some(first) = self.strategies.first() {
            if !first.events.is_empty() {
                let events: Vec<String> = first.events.iter().map(|(t, l)| format!("{} {l}", fmt_ms(*t))).collect();
                let _ = writeln!(o, "events: {}", events.join(", "));
            }
        }
        let _ = writeln!(o);
        let w = self.strategies.iter().map(|s| s.name.len()).max().unwrap_or(0).max(8);
        let kw = self.strategies.iter().map(|s| s.keys.len()).max().unwrap_or(0).max(4);
        let _ = writeln!(
            o,
            "{:w$}  {:kw$}  {:>11}  {:>10}  {:>9}  {:>9}  {:>9}  {:>9}  {:>8}  {:>8}  {:>8}  {:>10}  {:>7}  {:>7}",
            "strategy",
            "keys",
            "algorithm",
            "requests",
            "req max/",
            "mean",
            "sess max/",
            "mean",
            "moved",
            "broken",
            "silently",
            "unfamiliar",
            "failed",
            "refused",
        );
        let _ = writeln!(
            o,
            "{:w$}  {:kw$}  {:>11}  {:>10}  {:>9}  {:>9}  {:>9}  {:>9}",
            "", "", "", "", "mean peak", "avg", "mean peak", "avg"
        );
        for s in &self.strategies {
            let (rp, ra) = s.requests_imbalance();
            let (sp, sa) = s.sessions_imbalance();
            let _ = writeln!(
                o,
                "{:w$}  {:kw$}  {:>11}  {:>10}  {:>9.2}  {:>9.2}  {:>9.2}  {:>9.2}  {:>8}  {:>8}  {:>8}  {:>10}  {:>7}  {:>7}",
                s.name,
                s.keys,
                s.algorithm,
                s.requests,
                rp,
                ra,
                sp,
                sa,
                s.moved(),
                s.broken,
                s.broken_silently,
                s.unfamiliar,
                s.failed,
                s.refused
            );
        }
        let _ = writeln!(o, "\nsessions moved while in progress, by verdict:");
        for s in &self.strategies {
            let moves: Vec<String> = s.moves_by_verdict().iter().map(|(l, n)| format!("{l} {n}")).collect();
            let moves = if moves.is_empty() { "none".to_string() } else { moves.join(", ") };
            let _ = writeln!(o, "  {:w$}  {moves}", s.name);
        }
        let _ = writeln!(o, "\nverdicts of all requests:");
        for s in &self.strategies {
            let v: Vec<String> = Verdict::ALL
                .iter()
                .filter(|(v, _)| s.verdicts[v.index()] > 0)
                .map(|(v, l)| format!("{l} {}", s.verdicts[v.index()]))
                .collect();
            let _ = writeln!(o, "  {:w$}  {}", s.name, v.join(", "));
        }
        if self.strategies.iter().any(|s| !s.drains.is_empty()) {
            let _ = writeln!(o, "\ndrains (time to empty: sessions in progress / Tether's session count):");
            for s in &self.strategies {
                for d in &s.drains {
                    let f = |x: Option<u64>| {
                        x.map_or_else(|| "not empty (by the end, or before its removal)".to_string(), fmt_ms)
                    };
                    let _ = writeln!(
                        o,
                        "  {:w$}  {} at {}: {} / {}",
                        s.name,
                        d.backend,
                        fmt_ms(d.at_ms),
                        f(d.empty_after_ms),
                        f(d.counted_empty_after_ms)
                    );
                }
            }
        }
        for s in &self.strategies {
            if let Some(split) = &s.split {
                split_table(&mut o, &s.name, split);
            }
        }
        if let Some(r) = self.strategies.first().and_then(|s| s.replay.as_ref()) {
            let c = &r.counts;
            let _ = writeln!(
                o,
                "\nthe log: {} lines; {} requests replayed ({} of no session); not replayed: {} unparsable, {} reaching no pool, {} of other pools, {} after the end; {} replayed late (logged more than {}s after requests that started later)",
                c.lines,
                c.requests,
                c.sessionless,
                c.unparsable,
                c.not_to_a_pool,
                c.other_pool,
                c.after_end,
                c.late,
                super::replay::WINDOW_MS / 1000
            );
            let seeded: Vec<String> = self
                .strategies
                .iter()
                .filter_map(|s| Some(format!("{} {}", s.name, s.replay.as_ref()?.seeded)))
                .collect();
            let _ = writeln!(o, "sessions open before the log began, pinned where it says: {}", seeded.join(", "));
            let pct = |n: u64, of: u64| if of == 0 { 0.0 } else { n as f64 * 100.0 / of as f64 };
            let mut any = false;
            for s in &self.strategies {
                let Some(r) = s.replay.as_ref().filter(|r| r.matches_log) else { continue };
                any = true;
                let _ = writeln!(
                    o,
                    "  {:w$}  is the logged run: same backend as logged for {} of {} requests ({:.1}%), and for {} of the {} that hit an existing session ({:.1}%)",
                    s.name,
                    r.same_backend,
                    r.compared,
                    pct(r.same_backend, r.compared),
                    r.hits_same_backend,
                    r.hits_compared,
                    pct(r.hits_same_backend, r.hits_compared)
                );
            }
            if !any {
                let _ = writeln!(o, "  no strategy is named like the logged pool: none compared with the logged run");
            }
        }
        // Each note once, with the strategies it concerns.
        let mut notes: Vec<(&str, Vec<&str>)> = Vec::new();
        for s in &self.strategies {
            for n in &s.notes {
                match notes.iter_mut().find(|(m, _)| m == n) {
                    Some((_, names)) => names.push(&s.name),
                    None => notes.push((n, vec![&s.name])),
                }
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(o);
        }
        for (n, names) in notes {
            let _ = writeln!(o, "note ({}): {n}", names.join(", "));
        }
        o
    }
}

/// A split strategy's table: per pool, new sessions (with their share) and requests from
/// each event to the next, then over the run; and the sessions that changed pool.
fn split_table(o: &mut String, name: &str, split: &SplitReport) {
    let _ = writeln!(
        o,
        "\ntraffic split {name}: {} sessions changed pool ({} requests sent to another pool than their session's last)",
        split.sessions_changed_pool, split.pool_changes
    );
    let width = split.pools.iter().map(|p| p.len()).max().unwrap_or(0).max(27);
    let _ = write!(o, "  {:>8}", "");
    for p in &split.pools {
        let _ = write!(o, "  {p:>width$}");
    }
    let _ = write!(o, "\n  {:>8}", "from");
    for _ in &split.pools {
        let _ = write!(o, "  {:>w$}  {:>10}", "new sessions", "requests", w = width - 12);
    }
    let _ = writeln!(o);
    let row = |o: &mut String, label: &str, sessions: &[u64], requests: &[u64]| {
        let total: u64 = sessions.iter().sum();
        let _ = write!(o, "  {label:>8}");
        for (n, r) in sessions.iter().zip(requests) {
            let pct = if total == 0 { 0.0 } else { *n as f64 * 100.0 / total as f64 };
            let _ = write!(o, "  {:>w$} {:>5.1}%  {:>10}", n, pct, r, w = width - 19);
        }
        let _ = writeln!(o);
    };
    if split.segments.len() > 1 {
        for seg in &split.segments {
            let from = if seg.from_ms == 0 { "0s".to_string() } else { fmt_ms(seg.from_ms) };
            row(o, &from, &seg.sessions, &seg.requests);
        }
    }
    row(o, "all", &split.sessions, &split.requests);
}

// === the HTML report ===

/// Line colours, one per strategy or backend (cycled).
const COLOURS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One line of a chart: a name and its points (simulated ms, value); a value of `None`
/// breaks the line.
struct Series {
    name: String,
    points: Vec<(u64, Option<f64>)>,
}

/// An SVG line chart over simulated time, with the timeline's events as dashed lines.
fn line_chart(id: &str, title: &str, series: &[Series], duration_ms: u64, events: &[(u64, String)]) -> String {
    const W: f64 = 720.0;
    const H: f64 = 240.0;
    const LEFT: f64 = 48.0;
    const RIGHT: f64 = 12.0;
    const TOP: f64 = 28.0;
    const BOTTOM: f64 = 28.0;
    let max = series.iter().flat_map(|s| s.points.iter().filter_map(|p| p.1)).fold(0.0f64, f64::max);
    let y_max = if max <= 0.0 { 1.0 } else { nice_ceiling(max) };
    let x = |t: u64| LEFT + (W - LEFT - RIGHT) * t as f64 / duration_ms.max(1) as f64;
    let y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / y_max);
    let mut o = String::new();
    let _ = write!(
        o,
        "<figure><svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    let _ = write!(o, "<text x=\"{LEFT}\" y=\"16\" class=\"title\">{}</text>", esc(title));
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text class=\"axis\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 4.0,
            y(v) + 4.0,
            fmt_axis(v),
            yy = y(v)
        );
    }
    for k in 0..=4 {
        let t = duration_ms * k / 4;
        let _ = write!(
            o,
            "<text class=\"axis\" x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x(t),
            H - 8.0,
            fmt_ms(t)
        );
    }
    for (t, label) in events {
        let _ = write!(
            o,
            "<line class=\"event\" x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{TOP}\" y2=\"{}\"><title>{}</title></line>",
            H - BOTTOM,
            esc(&format!("{}: {label}", fmt_ms(*t))),
            xx = x(*t)
        );
    }
    for (k, s) in series.iter().enumerate() {
        let mut d = String::new();
        let mut pen_down = false;
        for &(t, v) in &s.points {
            match v {
                Some(v) => {
                    let _ = write!(d, "{}{:.1} {:.1} ", if pen_down { "L" } else { "M" }, x(t), y(v));
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        let _ = write!(
            o,
            "<path class=\"line\" data-series=\"{}\" d=\"{}\" stroke=\"{}\"/>",
            esc(&s.name),
            d.trim_end(),
            COLOURS[k % COLOURS.len()]
        );
    }
    o.push_str("</svg><figcaption>");
    for (k, s) in series.iter().enumerate() {
        let _ = write!(
            o,
            "<span class=\"key\"><i style=\"background:{}\"></i>{}</span>",
            COLOURS[k % COLOURS.len()],
            esc(&s.name)
        );
    }
    o.push_str("</figcaption></figure>\n");
    o
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v).unwrap_or(10.0 * p)
}

fn fmt_axis(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// The report as one HTML page: the table, then SVG charts over simulated time.
    pub fn html(&self) -> String {
        let mut o = String::new();
        o.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
        let _ = write!(o, "<title>tether simulate: {}</title>", esc(&self.file));
        o.push_str(
            "<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}\
             pre{background:#f6f6f6;padding:12px;overflow-x:auto;font-size:12px}\
             figure{margin:16px 0}.chart{background:#fff;border:1px solid #ddd}\
             .title{font-weight:600;font-size:13px}.axis{font-size:11px;fill:#555}\
             .grid{stroke:#eee}.event{stroke:#999;stroke-dasharray:4 3}\
             .line{fill:none;stroke-width:1.6}.key{margin-right:14px;font-size:12px}\
             .key i{display:inline-block;width:12px;height:3px;margin:0 4px 3px 0}</style></head><body>\n",
        );
        let _ = writeln!(o, "<h1>tether simulate</h1><pre id=\"table\">{}</pre>", esc(&self.table()));
        let events = self.strategies.first().map_or(&[][..], |s| &s.events[..]);
        let per_strategy = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<Series> {
            self.strategies
                .iter()
                .map(|s| Series { name: s.name.clone(), points: s.samples.iter().map(|p| (p.t_ms, f(p))).collect() })
                .collect()
        };
        let positive = |v: f64| (v > 0.0).then_some(v);
        o.push_str(&line_chart(
            "requests-imbalance",
            "Requests: max / mean per serving backend",
            &per_strategy(&|p| positive(p.requests_imbalance)),
            self.duration_ms,
            events,
        ));
        o.push_str(&line_chart(
            "sessions-imbalance",
            "Sessions in progress: max / mean per serving backend",
            &per_strategy(&|p| positive(p.sessions_imbalance)),
            self.duration_ms,
            events,
        ));
        o.push_str(&line_chart(
            "broken",
            "Sessions broken while in progress (cumulative)",
            &per_strategy(&|p| Some(p.broken as f64)),
            self.duration_ms,
            events,
        ));
        for (k, s) in self.strategies.iter().enumerate() {
            let mut names: Vec<&str> = Vec::new();
            for p in &s.samples {
                for (n, _) in &p.sessions_per_backend {
                    if !names.contains(&n.as_str()) {
                        names.push(n);
                    }
                }
            }
            let series: Vec<Series> = names
                .iter()
                .map(|n| Series {
                    name: n.to_string(),
                    points: s
                        .samples
                        .iter()
                        .map(|p| {
                            let v = p.sessions_per_backend.iter().find(|(b, _)| b == n).map(|(_, c)| f64::from(*c));
                            (p.t_ms, v)
                        })
                        .collect(),
                })
                .collect();
            o.push_str(&line_chart(
                &format!("backends-{k}"),
                &format!("{}: sessions in progress per backend", s.name),
                &series,
                self.duration_ms,
                events,
            ));
        }
        for (k, s) in self.strategies.iter().enumerate() {
            let Some(split) = &s.split else { continue };
            let per_pool = |f: &dyn Fn(&Sample) -> &[u64]| -> Vec<Series> {
                let series = split.pools.iter().enumerate().map(|(p, name)| Series {
                    name: name.clone(),
                    points: s.samples.iter().map(|x| (x.t_ms, f(x).get(p).map(|v| *v as f64))).collect(),
                });
                series.collect()
            };
            o.push_str(&line_chart(
                &format!("split-sessions-{k}"),
                &format!("{}: new sessions per pool, per sample interval", s.name),
                &per_pool(&|x| &x.pool_sessions),
                self.duration_ms,
                events,
            ));
            o.push_str(&line_chart(
                &format!("split-requests-{k}"),
                &format!("{}: requests per pool, per sample interval", s.name),
                &per_pool(&|x| &x.pool_requests),
                self.duration_ms,
                events,
            ));
        }
        o.push_str("</body></html>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_ms(950), "950ms");
        assert_eq!(fmt_ms(1000), "1s");
        assert_eq!(fmt_ms(252_000), "4m12s");
        assert_eq!(fmt_ms(7_200_000), "2h");
    }

    #[test]
    fn chart_lines_break_on_missing_points() {
        let s = Series { name: "a<b".into(), points: vec![(0, Some(1.0)), (1, None), (2, Some(2.0)), (3, Some(1.0))] };
        let svg = line_chart("c", "t", &[s], 3, &[(1, "x fails".into())]);
        assert!(svg.contains("data-series=\"a&lt;b\""), "{svg}");
        let d = svg.split(" d=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('L').count(), 1, "{d}");
        assert!(svg.contains("class=\"event\""));
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(730.0), 1000.0);
    }
}
