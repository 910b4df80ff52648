//! The run report: `report.md` and `report.html` in the run folder, with SVG plots in
//! `plots/`. Per-domain perplexity of every model scored, the compute each consumed (training
//! FLOPs after the seed by the 6 · N_active · tokens rule), loss and validation-perplexity curves, a
//! per-domain bar chart of the arms, routing heatmaps of the
//! MoE models, and every artefact's lineage.
//!
//! The plots are plain SVG written here: no font files or image libraries needed.

use crate::plan::{JobKind, Plan};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// One model's scores.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    /// domain → perplexity
    pub ppl: BTreeMap<String, f64>,
    pub tokens_after_seed: u64,
    pub flops_after_seed: f64,
    /// domain → [layer][expert] routing shares (MoE models)
    pub routing: BTreeMap<String, Vec<Vec<f64>>>,
    /// Domains added later (`add_experts`): scored, but left out of the average, so that every
    /// model and arm is averaged over the same domains, the run's own.
    pub added_domains: BTreeSet<String>,
    /// Parameters that work on each token at inference (every member of an ensemble: each one
    /// scores the prefix for the posterior); 0 when unknown.
    pub active_params: usize,
}

impl Row {
    /// Mean perplexity over the run's own domains (the added ones left out).
    pub fn average(&self) -> f64 {
        let own: Vec<f64> = self.ppl.iter().filter(|(d, _)| !self.added_domains.contains(*d)).map(|(_, p)| *p).collect();
        own.iter().sum::<f64>() / own.len().max(1) as f64
    }
}

pub fn read_plan(run: &Path) -> Result<Plan> {
    let bytes = crate::executor::folder(run)?
        .read_capped("plan.json", crate::executor::PLAN_LIMIT)?
        .with_context(|| format!("{}: not a btm run (no plan.json)", run.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// A file of the run (the run folder may be an object store); `None` when it is not there.
fn read_in_run(plan: &Plan, file: &Path) -> Option<Vec<u8>> {
    crate::executor::folder(&plan.run_dir).ok()?.read(file).ok()?
}

/// Every scored model with its per-domain perplexity, in plan order.
pub fn rows(plan: &Plan) -> Vec<Row> {
    let mut rows: Vec<Row> = vec![];
    let added_domains: BTreeSet<String> = plan
        .jobs
        .iter()
        .filter(|j| j.kind == JobKind::TrainExpert)
        .filter_map(|j| j.name.strip_prefix("added/"))
        .map(String::from)
        .collect();
    // Job eval/<label> (or eval/averaged/<domain>) writes eval/<label>/<domain>.json per domain.
    let scores = plan.jobs.iter().filter(|j| j.kind == JobKind::Eval).flat_map(|j| j.outputs.iter().map(move |out| (j, out)));
    for (j, out) in scores {
        let Some(label) = j.name.split('/').nth(1) else { continue };
        let Some(domain) = out.file_stem().map(|d| d.to_string_lossy().into_owned()) else { continue };
        let Some(Ok(v)) = read_in_run(plan, out).map(|b| serde_json::from_slice::<Value>(&b)) else {
            continue;
        };
        let model = plan.jobs.iter().filter_map(|p| p.produces.as_ref()).find(|m| m.label == label);
        let row = match rows.iter_mut().position(|r| r.label == label) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(Row {
                    label: label.to_string(),
                    ppl: BTreeMap::new(),
                    tokens_after_seed: model.map_or(0, |m| m.tokens_after_seed),
                    flops_after_seed: model.map_or(0.0, |m| m.flops_after_seed),
                    routing: BTreeMap::new(),
                    added_domains: added_domains.clone(),
                    active_params: model.map_or(0, |m| m.active_params),
                });
                rows.last_mut().expect("pushed")
            }
        };
        if let Some(p) = v["ppl"].as_f64() {
            row.ppl.insert(domain.to_string(), p);
        }
        if let Ok(r) = serde_json::from_value::<Vec<Vec<f64>>>(v["routing"].clone()) {
            row.routing.insert(domain.to_string(), r);
        }
    }
    // The ensemble is no trained model of its own: its training cost is its members', the
    // ensemble arm's experts when the run has that arm, else the branch-train-merge arm's (and
    // the added ones, for the extended ensemble).
    let members = |prefixes: &[&str]| -> Vec<&crate::plan::ModelRef> {
        let jobs = plan.jobs.iter().filter(|j| j.kind == JobKind::TrainExpert && prefixes.iter().any(|p| j.name.starts_with(p)));
        jobs.filter_map(|j| j.produces.as_ref()).collect()
    };
    let base = if plan.jobs.iter().any(|j| j.name.starts_with("ensemble-expert/")) { "ensemble-expert" } else { "expert" };
    for r in rows.iter_mut() {
        let prefixes: Vec<String> = match r.label.as_str() {
            "ensemble" | "ensemble-top1" | "averaged" => vec![format!("{base}/")],
            "ensemble-extended" => vec![format!("{base}/"), "added/".into()],
            l if is_arm(l, "ensemble") => vec![format!("{base}{}/", &l["ensemble".len()..])],
            _ => continue,
        };
        let m = members(&prefixes.iter().map(String::as_str).collect::<Vec<_>>());
        r.tokens_after_seed = m.iter().map(|m| m.tokens_after_seed).sum();
        r.flops_after_seed = m.iter().map(|m| m.flops_after_seed).sum();
        // The ensemble runs every member on every token; the average is one dense model.
        r.active_params = match r.label.as_str() {
            "averaged" => m.first().map_or(0, |m| m.active_params),
            _ => m.iter().map(|m| m.active_params).sum(),
        };
    }
    rows
}

/// The perplexity table as Markdown.
pub fn table(rows: &[Row]) -> String {
    let domains: Vec<String> =
        rows.iter().flat_map(|r| r.ppl.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut s = String::from("| model |");
    for d in &domains {
        let _ = write!(s, " {d} |");
    }
    s.push_str(" average | tokens after seed | training FLOPs after seed |\n|---|");
    s.push_str(&"---:|".repeat(domains.len() + 3));
    s.push('\n');
    for r in rows {
        let _ = write!(s, "| {} |", r.label);
        for d in &domains {
            match r.ppl.get(d) {
                Some(p) => {
                    let _ = write!(s, " {p:.3} |");
                }
                None => s.push_str(" – |"),
            }
        }
        let _ = writeln!(s, " {:.3} | {} | {:.3e} |", r.average(), r.tokens_after_seed, r.flops_after_seed);
    }
    s
}

/// Domains above which the report's perplexity table is summarised ([`summary_table`]): a
/// column per domain stops being readable, and the whole table is in `perplexity.csv`.
pub const TABLE_DOMAINS: usize = 12;
/// Models of one family (`expert-<domain>`, …) above which the summary shows the family as one
/// row of means.
const FAMILY_ROWS: usize = 8;

/// All domains any row was scored on, sorted.
fn all_domains(rows: &[Row]) -> BTreeSet<String> {
    rows.iter().flat_map(|r| r.ppl.keys().cloned()).collect()
}

/// The family of a model named after a domain (`expert-code` → `expert-`, `code`), if it is.
fn family<'a>(label: &'a str, domains: &BTreeSet<String>) -> Option<(&'a str, &'a str)> {
    label.char_indices().filter(|&(_, c)| c == '-').map(|(i, _)| label.split_at(i + 1)).find(|(_, d)| domains.contains(*d))
}

/// The perplexity table of a wide run (more than [`TABLE_DOMAINS`] domains) as Markdown: per
/// model, how many domains it was scored on, its perplexity on its own domain (a domain's
/// expert), and its average; a family of more than [`FAMILY_ROWS`] domain-named models
/// (`expert-<domain>`) as one row of their means.
pub fn summary_table(rows: &[Row]) -> String {
    let domains = all_domains(rows);
    let mut s = String::from(
        "| model | domains scored | in-domain | average | tokens after seed | training FLOPs after seed |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let mut families: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        if let Some((prefix, _)) = family(&r.label, &domains) {
            families.entry(prefix).or_default().push(r);
        }
    }
    let in_domain = |r: &Row| family(&r.label, &domains).and_then(|(_, d)| r.ppl.get(d).copied());
    let mut shown_families = BTreeSet::new();
    for r in rows {
        let group = family(&r.label, &domains).map(|(p, _)| p).filter(|p| families[p].len() > FAMILY_ROWS);
        let Some(prefix) = group else {
            let own = in_domain(r).map_or("–".to_string(), |p| format!("{p:.3}"));
            let _ = writeln!(
                s,
                "| {} | {} | {own} | {:.3} | {} | {:.3e} |",
                r.label,
                r.ppl.len(),
                r.average(),
                r.tokens_after_seed,
                r.flops_after_seed
            );
            continue;
        };
        if !shown_families.insert(prefix) {
            continue;
        }
        let members = &families[prefix];
        let (lo, hi) = members.iter().fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r.ppl.len()), hi.max(r.ppl.len())));
        let scored = if lo == hi { lo.to_string() } else { format!("{lo}–{hi}") };
        let own: Vec<f64> = members.iter().filter_map(|r| in_domain(r)).collect();
        let own = if own.is_empty() { "–".to_string() } else { format!("{:.3}", mean(&own)) };
        let _ = writeln!(
            s,
            "| {prefix}<domain>: {} models, means | {scored} | {own} | {:.3} | {:.0} | {:.3e} |",
            members.len(),
            mean(&members.iter().map(|r| r.average()).collect::<Vec<_>>()),
            mean(&members.iter().map(|r| r.tokens_after_seed as f64).collect::<Vec<_>>()),
            mean(&members.iter().map(|r| r.flops_after_seed).collect::<Vec<_>>()),
        );
    }
    s
}

/// Every score of every model, one `model,domain,perplexity` line each: the whole table, however
/// wide (`perplexity.csv` beside the report).
pub fn perplexity_csv(rows: &[Row]) -> String {
    let mut s = String::from("model,domain,perplexity\n");
    for r in rows {
        for (d, p) in &r.ppl {
            let _ = writeln!(s, "{},{},{p}", csv_field(&r.label), csv_field(d));
        }
    }
    s
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Whether `label` is `base` or a repeat of it with another arm seed (`base-s<seed>`).
fn is_arm(label: &str, base: &str) -> bool {
    label == base
        || label
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix("-s"))
            .is_some_and(|s| s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty())
}

/// The scored runs of arm `base`: the model `base` and its repeats under other arm seeds.
fn arm_runs<'a>(rows: &'a [Row], base: &str) -> Vec<&'a Row> {
    rows.iter().filter(|r| is_arm(&r.label, base) && !r.ppl.is_empty()).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The arms of the BTM comparison (dense, btm-merge, upcycle, the ensembles, the average,
/// experts) as Markdown, when the run has a dense baseline to compare with: each arm's average
/// perplexity per run and their mean against dense, beside what it cost to train (FLOPs after
/// the seed) and what it costs to use (parameters active per token).
pub fn arms_table(rows: &[Row]) -> Option<String> {
    let runs = |base: &str| arm_runs(rows, base);
    let dense = runs("baseline");
    if dense.is_empty() {
        return None;
    }
    let dense_mean = mean(&dense.iter().map(|r| r.average()).collect::<Vec<_>>());
    // (arm, [(run label, average perplexity)], training FLOPs after seed, active parameters)
    type Arm = (String, Vec<(String, f64)>, f64, usize);
    let arm = |name: &str, rs: Vec<&Row>| -> Option<Arm> {
        let first = rs.first()?;
        let flops = mean(&rs.iter().map(|r| r.flops_after_seed).collect::<Vec<_>>());
        Some((name.to_string(), rs.iter().map(|r| (r.label.clone(), r.average())).collect(), flops, first.active_params))
    };
    let mut arms: Vec<Arm> = [
        ("dense", dense),
        ("btm-merge", runs("continued")),
        ("btm-merge before MoE training", runs("merged")),
        ("btm-merge, router_init: fit", runs("continued-fit")),
        ("btm-merge, router_init: fit, before MoE training", runs("merged-fit")),
        ("upcycle", runs("upcycled-continued")),
        ("ensemble (all experts, posterior-weighted)", runs("ensemble")),
        ("ensemble top-1", runs("ensemble-top1")),
        ("averaged (each domain's posterior-weighted parameter average)", runs("averaged")),
    ]
    .into_iter()
    .filter_map(|(name, rs)| arm(name, rs))
    .collect();
    // Each domain's expert on its own domain (first arm seed: experts of repeats are not scored):
    // trained at the cost of all of them, used one at a time. The ensemble arm's experts too.
    for (name, prefix) in [("experts (in-domain)", "expert-"), ("ensemble experts (in-domain)", "ensemble-expert-")] {
        let experts: Vec<(&Row, f64)> = rows
            .iter()
            .filter_map(|r| r.label.strip_prefix(prefix).filter(|d| !r.added_domains.contains(*d)).and_then(|d| Some((r, *r.ppl.get(d)?))))
            .collect();
        if let Some((first, _)) = experts.first() {
            let ppl = mean(&experts.iter().map(|(_, p)| *p).collect::<Vec<_>>());
            let flops = experts.iter().map(|(r, _)| r.flops_after_seed).sum();
            arms.push((name.into(), vec![(format!("{prefix}<domain> on <domain>"), ppl)], flops, first.active_params));
        }
    }
    let mut s = String::from(
        "| arm | runs (average perplexity) | mean | vs dense | training FLOPs after seed | active parameters per token |\n|---|---|---:|---:|---:|---:|\n",
    );
    for (name, v, flops, active) in &arms {
        let m = mean(&v.iter().map(|(_, a)| *a).collect::<Vec<_>>());
        let runs: Vec<String> = v.iter().map(|(l, a)| format!("{l}: {a:.3}")).collect();
        let active = if *active == 0 { "–".to_string() } else { active.to_string() };
        let _ = writeln!(
            s,
            "| {name} | {} | {m:.3} | {:+.1} % | {flops:.3e} | {active} |",
            runs.join(", "),
            (m - dense_mean) / dense_mean * 100.0
        );
    }
    Some(s)
}

const PALETTE: [&str; 10] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A tick label people read: `0`, `750`, `40k`, `1.2M`, `3.5G` (no `0.00e0`).
pub fn human(x: f64) -> String {
    let a = x.abs();
    let (v, unit) = match a {
        _ if a >= 1e9 => (x / 1e9, "G"),
        _ if a >= 1e6 => (x / 1e6, "M"),
        _ if a >= 1e3 => (x / 1e3, "k"),
        _ => (x, ""),
    };
    // Whole numbers and values of two digits or more without decimals; small ones with one.
    let text = if v == v.round() || v.abs() >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") };
    format!("{text}{unit}")
}

/// Training loss against tokens seen, one line per training job.
pub fn loss_plot(series: &[(String, Vec<(f64, f64)>)]) -> String {
    line_plot(series, "loss")
}

/// `y_label` against training tokens, one line per series (training job).
pub fn line_plot(series: &[(String, Vec<(f64, f64)>)], y_label: &str) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 60.0, 180.0, 20.0, 40.0);
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + x / x_max * pw;
    let sy = |y: f64| top + (y_max - y) / (y_max - y_min) * ph;
    let mut s = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = write!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    for i in 0..=4 {
        let y = y_min + (y_max - y_min) * i as f64 / 4.0;
        // Three significant digits or so: 513, 29.4, 3.61.
        let label = match y.abs() {
            a if a >= 100.0 => format!("{y:.0}"),
            a if a >= 10.0 => format!("{y:.1}"),
            _ => format!("{y:.2}"),
        };
        let _ = write!(s, r##"<text x="{}" y="{}" text-anchor="end">{label}</text>"##, left - 4.0, sy(y) + 4.0);
        let x = x_max * i as f64 / 4.0;
        let _ = write!(s, r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##, sx(x), h - bottom + 16.0, human(x));
    }
    let _ = write!(s, r##"<text x="{}" y="{}" text-anchor="middle">training tokens</text>"##, left + pw / 2.0, h - 4.0);
    let _ = write!(
        s,
        r##"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"##,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // Past ten series the colours repeat, dashed.
        let dash = if i >= PALETTE.len() { r#" stroke-dasharray="6 3""# } else { "" };
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{}"/>"#, path.join(" "));
        // The legend keeps to the plot's height: past LEGEND_ENTRIES series, a count of the rest.
        if i >= LEGEND_ENTRIES {
            continue;
        }
        let ly = top + 14.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/>"#,
            w - right + 10.0,
            w - right + 30.0
        );
        let _ = write!(s, r#"<text x="{}" y="{}">{}</text>"#, w - right + 35.0, ly + 4.0, esc(name));
    }
    if series.len() > LEGEND_ENTRIES {
        let ly = top + 14.0 + 16.0 * LEGEND_ENTRIES as f64;
        let _ = write!(s, r#"<text x="{}" y="{}">… {} more</text>"#, w - right + 10.0, ly + 4.0, series.len() - LEGEND_ENTRIES);
    }
    s.push_str("</svg>");
    s
}

/// Series a plot's legend names (the height of the plot holds about 22).
const LEGEND_ENTRIES: usize = 20;

/// Rows or columns a heatmap draws at most: past it, neighbours are binned together.
const HEATMAP_CELLS: usize = 32;

/// `n` items in at most `most` bins of consecutive items: the ranges.
fn bins(n: usize, most: usize) -> Vec<std::ops::Range<usize>> {
    let size = n.div_ceil(most.max(1)).max(1);
    (0..n).step_by(size).map(|start| start..(start + size).min(n)).collect()
}

/// Share of each domain's tokens sent to each expert, one panel per MoE layer. Past
/// [`HEATMAP_CELLS`] domains or experts, consecutive ones are binned: a cell is then the mean
/// over its domains of the share sent to any of its experts (rows still sum to 100 %).
pub fn routing_heatmap(title: &str, routing: &BTreeMap<String, Vec<Vec<f64>>>) -> String {
    let names: Vec<&String> = routing.keys().collect();
    let layers = routing.values().map(|r| r.len()).max().unwrap_or(0);
    let n_experts = routing.values().flat_map(|r| r.iter().map(|l| l.len())).max().unwrap_or(0);
    let (domain_bins, expert_bins) = (bins(names.len(), HEATMAP_CELLS), bins(n_experts, HEATMAP_CELLS));
    let label = |r: &std::ops::Range<usize>, name: &dyn Fn(usize) -> String| {
        if r.len() == 1 {
            name(r.start)
        } else {
            format!("{}…{}", name(r.start), name(r.end - 1))
        }
    };
    let domains: Vec<String> = domain_bins.iter().map(|r| label(r, &|i| names[i].clone())).collect();
    let experts: Vec<String> = expert_bins.iter().map(|r| label(r, &|i| i.to_string())).collect();
    // [layer][domain bin][expert bin]
    let cells: Vec<Vec<Vec<f64>>> = (0..layers)
        .map(|l| {
            domain_bins
                .iter()
                .map(|dr| {
                    expert_bins
                        .iter()
                        .map(|er| {
                            let sum: f64 = dr
                                .clone()
                                .map(|d| routing[names[d]].get(l).map_or(0.0, |row| er.clone().filter_map(|e| row.get(e)).sum::<f64>()))
                                .sum();
                            sum / dr.len() as f64
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let binned = names.len() > domains.len() || n_experts > experts.len();
    let cell = if binned { 30.0 } else { 36.0 };
    let label_w = if binned { 150.0 } else { 110.0 };
    let panel_w = experts.len() as f64 * cell + 20.0;
    let w = (label_w + panel_w * layers as f64 + 10.0).max(8.0 + 7.0 * title.chars().count() as f64);
    let h = 50.0 + domains.len() as f64 * cell + if binned { 80.0 } else { 30.0 };
    let mut s = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#);
    let _ = write!(s, r#"<text x="4" y="14" font-size="13">{}</text>"#, esc(title));
    for (l, panel) in cells.iter().enumerate() {
        let x0 = label_w + l as f64 * panel_w;
        let _ = write!(s, r#"<text x="{}" y="34">layer {l}</text>"#, x0);
        for (di, d) in domains.iter().enumerate() {
            let y = 42.0 + di as f64 * cell;
            if l == 0 {
                let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, label_w - 6.0, y + cell / 2.0 + 4.0, esc(d));
            }
            for (e, share) in panel[di].iter().enumerate() {
                let shade = (255.0 * (1.0 - share.clamp(0.0, 1.0))) as u8;
                let x = x0 + e as f64 * cell;
                let _ = write!(
                    s,
                    r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},255)" stroke="#fff"><title>{} → expert {}: {:.1}%</title></rect>"##,
                    esc(d),
                    experts[e],
                    share * 100.0
                );
                let ink = if *share > 0.55 { "#fff" } else { "#000" };
                let _ = write!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle" font-size="10" fill="{ink}">{:.0}</text>"#,
                    x + cell / 2.0,
                    y + cell / 2.0 + 4.0,
                    share * 100.0
                );
            }
        }
        for (e, name) in experts.iter().enumerate() {
            // Binned expert labels (`0…31`) run down their column, not into the next one.
            let (x, bottom) = (x0 + e as f64 * cell + cell / 2.0, 42.0 + domains.len() as f64 * cell);
            if binned {
                let (x, y) = (x - 4.0, bottom + 4.0);
                let _ = write!(s, r#"<text x="{x}" y="{y}" transform="rotate(90 {x} {y})">{name}</text>"#);
            } else {
                let _ = write!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{name}</text>"#, bottom + 14.0);
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// (label, [(tokens seen, value of `key`)]) for every training job whose metrics have `key`
/// (`loss` on training lines, `val_ppl` on validation lines). Validation lines carry only the
/// step: their tokens are the step times the job's tokens per step.
fn metric_series(plan: &Plan, key: &str) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out = vec![];
    for j in &plan.jobs {
        let (Some(t), Some(m)) = (&j.train, &j.produces) else { continue };
        let Some(bytes) = read_in_run(plan, &t.metrics) else { continue };
        let per_step = if t.steps > 0 { t.tokens as f64 / t.steps as f64 } else { 1.0 };
        let text = String::from_utf8_lossy(&bytes);
        let points: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| {
                let x = v["tokens_seen"].as_f64().or_else(|| Some(v["step"].as_f64()? * per_step))?;
                Some((x, v[key].as_f64()?))
            })
            .collect();
        if !points.is_empty() {
            out.push((m.label.clone(), points));
        }
    }
    out
}

/// Each arm's perplexity per domain (its first run), bars grouped by domain: where the arms
/// win and lose, which the average hides.
pub fn arms_bar_chart(rows: &[Row]) -> Option<String> {
    let pick = |label: &str| rows.iter().find(|r| r.label == label && !r.ppl.is_empty());
    let arms: Vec<(&str, &Row)> = [
        ("dense", "baseline"),
        ("btm-merge", "continued"),
        ("btm-merge, fit", "continued-fit"),
        ("upcycle", "upcycled-continued"),
        ("ensemble", "ensemble"),
        ("averaged", "averaged"),
    ]
    .into_iter()
    .filter_map(|(name, label)| Some((name, pick(label)?)))
    .collect();
    let dense = arms.first().filter(|(name, _)| *name == "dense")?.1;
    let all: Vec<&String> = dense.ppl.keys().filter(|d| !dense.added_domains.contains(*d)).collect();
    if arms.len() < 2 || all.is_empty() {
        return None;
    }
    // Past HEATMAP_CELLS domains, consecutive ones share a group of bars: each arm's mean over them.
    let groups = bins(all.len(), HEATMAP_CELLS);
    let domains: Vec<String> =
        groups.iter().map(|g| if g.len() == 1 { all[g.start].clone() } else { format!("{}…{}", all[g.start], all[g.end - 1]) }).collect();
    let value = |r: &Row, g: usize| -> Option<f64> {
        let v: Vec<f64> = groups[g].clone().filter_map(|d| r.ppl.get(all[d]).copied()).collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    let y_max = arms.iter().flat_map(|(_, r)| (0..groups.len()).filter_map(|g| value(r, g))).fold(1.0f64, |m, p| m.max(p)) * 1.05;
    let (bar, gap, left, top, bottom, legend) = (18.0, 24.0, 60.0, 20.0, 40.0, 130.0);
    let group = bar * arms.len() as f64 + gap;
    let (ph, pw) = (300.0, group * domains.len() as f64);
    let (w, h) = (left + pw + legend, top + ph + bottom);
    let sy = |y: f64| top + ph - y / y_max * ph;
    let mut s = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = write!(s, r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#444"/>"##, top + ph, left + pw, top + ph);
    for i in 0..=4 {
        let y = y_max * i as f64 / 4.0;
        let _ = write!(s, r##"<text x="{}" y="{}" text-anchor="end">{}</text>"##, left - 4.0, sy(y) + 4.0, human(y));
    }
    let _ = write!(
        s,
        r##"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">test perplexity</text>"##,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (di, d) in domains.iter().enumerate() {
        let x0 = left + gap / 2.0 + di as f64 * group;
        for (ai, (name, r)) in arms.iter().enumerate() {
            let Some(p) = value(r, di) else { continue };
            let x = x0 + ai as f64 * bar;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{}" width="{}" height="{}" fill="{}"><title>{} on {}: {p:.3}</title></rect>"#,
                sy(p),
                bar - 2.0,
                top + ph - sy(p),
                PALETTE[ai % PALETTE.len()],
                esc(name),
                esc(d)
            );
        }
        let _ =
            write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + bar * arms.len() as f64 / 2.0, top + ph + 16.0, esc(d));
    }
    for (ai, (name, _)) in arms.iter().enumerate() {
        let ly = top + 14.0 + 16.0 * ai as f64;
        let _ =
            write!(s, r#"<rect x="{}" y="{}" width="14" height="10" fill="{}"/>"#, left + pw + 10.0, ly - 9.0, PALETTE[ai % PALETTE.len()]);
        let _ = write!(s, r#"<text x="{}" y="{ly}">{}</text>"#, left + pw + 30.0, esc(name));
    }
    s.push_str("</svg>");
    Some(s)
}

/// What [`write`] puts at the top of the report, for `btm run` and `btm report` to print.
pub struct Written {
    /// The perplexity table (Markdown).
    pub table: String,
    /// The Arms comparison (Markdown), when the run has a dense baseline.
    pub arms: Option<String>,
    /// The BTM-family arm with the lowest mean perplexity and its change against dense (%),
    /// when the run has both ([`best_btm_arm`]).
    pub best_btm_arm: Option<(String, f64)>,
}

/// The BTM-family arm (btm-merge under each router init, the ensemble, the average) whose mean
/// average perplexity over its runs is lowest, and its change against dense's mean in percent
/// (negative = better), as the Arms table computes them.
pub fn best_btm_arm(rows: &[Row]) -> Option<(String, f64)> {
    let mean_of = |base: &str| -> Option<f64> {
        let v: Vec<f64> = arm_runs(rows, base).into_iter().map(Row::average).collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    let dense = mean_of("baseline")?;
    [("btm-merge", "continued"), ("btm-merge (fit router)", "continued-fit"), ("ensemble", "ensemble"), ("averaged", "averaged")]
        .into_iter()
        .filter_map(|(name, base)| Some((name.to_string(), (mean_of(base)? - dense) / dense * 100.0)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// Write report.md, report.html and plots/ for the run; returns the tables it opens with.
pub fn write(run: &Path) -> Result<Written> {
    let plan = read_plan(run)?;
    let rows = rows(&plan);
    let wide = all_domains(&rows).len() > TABLE_DOMAINS;
    let table = if wide { summary_table(&rows) } else { table(&rows) };
    let folder = crate::executor::folder(run)?;
    folder.write("perplexity.csv", perplexity_csv(&rows).as_bytes())?;
    let figures = report_figures(&plan, &rows);
    for (_, file, svg) in &figures {
        folder.write(format!("plots/{file}"), svg.as_bytes())?;
    }

    let mut md = String::new();
    let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let _ = writeln!(md, "# btm run `{name}`\n");
    perplexity_section(&mut md, &rows, &table, wide);
    let arms = arms_table(&rows);
    if let Some(arms) = &arms {
        arms_section(&mut md, arms);
    }
    let _ = writeln!(md, "\n## Plots\n");
    for (caption, file, _) in &figures {
        let _ = writeln!(md, "![{caption}](plots/{file})\n");
    }
    let jobs_csv = jobs_section(&mut md, run, &plan);
    folder.write("jobs.csv", jobs_csv.as_bytes())?;
    folder.write("report.md", md.as_bytes())?;

    folder.write("report.html", report_html(&name, &md, &figures).as_bytes())?;
    Ok(Written { table, arms, best_btm_arm: best_btm_arm(&rows) })
}

/// The report's figures, as (caption, file under `plots/`, SVG): training loss, validation
/// perplexity, the arms' bars and each routed model's routing heatmap, those the run has.
fn report_figures(plan: &Plan, rows: &[Row]) -> Vec<(String, String, String)> {
    let mut figures: Vec<(String, String, String)> = vec![];
    let series = metric_series(plan, "loss");
    if !series.is_empty() {
        figures.push(("Training loss of every training job".into(), "loss.svg".into(), loss_plot(&series)));
    }
    let valid = metric_series(plan, "val_ppl");
    if !valid.is_empty() {
        figures.push((
            "Validation perplexity of every training job".into(),
            "valid.svg".into(),
            line_plot(&valid, "validation perplexity"),
        ));
    }
    if let Some(svg) = arms_bar_chart(rows) {
        figures.push(("Each arm's test perplexity per domain".into(), "arms.svg".into(), svg));
    }
    for r in rows.iter().filter(|r| !r.routing.is_empty()) {
        let title = format!("{}: % of each domain's tokens routed to each expert", r.label);
        figures.push((title.clone(), format!("routing-{}.svg", r.label), routing_heatmap(&title, &r.routing)));
    }
    figures
}

/// The report's Perplexity section: what it measures, `table`, and the best MoE against the
/// dense baseline when the run has both.
fn perplexity_section(md: &mut String, rows: &[Row], table: &str, wide: bool) {
    let _ = writeln!(md, "## Perplexity\n");
    let _ = writeln!(
        md,
        "Per-domain perplexity on the evaluation split (each document on its own, non-overlapping windows; \
         see docs/models.md, \"Perplexity convention\"). *Training FLOPs after seed* counts 6 · N_active · tokens for every training job on the \
         way from the seed to the model (the forward and backward pass of every active parameter for every \
         training token; the seed's own training and the merge's calibration passes are not counted).{}\n",
        if rows.iter().any(|r| !r.added_domains.is_empty()) {
            " *Average* is over the run's own domains: the domains added later are scored but not averaged, so every \
             model and arm is compared over the same text."
        } else {
            ""
        }
    );
    if wide {
        let _ = writeln!(
            md,
            "{} domains: each model's perplexity on its own domain (a domain's expert) and its average, a family of \
             domain-named models as one row of means. Every score is in [perplexity.csv](perplexity.csv).\n",
            all_domains(rows).len()
        );
    }
    md.push_str(table);
    if let (Some(best), Some(base)) = (
        rows.iter().filter(|r| r.label == "continued" || r.label == "merged").min_by(|a, b| a.average().total_cmp(&b.average())),
        rows.iter().find(|r| r.label == "baseline"),
    ) {
        // Same sign as the arms table below: negative = lower perplexity than dense.
        let rel = (best.average() - base.average()) / base.average() * 100.0;
        let _ = writeln!(
            md,
            "\n`{}` vs the compute-matched dense `baseline`: average perplexity {:.3} vs {:.3} ({rel:+.1} % relative to the baseline; negative = the MoE has the lower perplexity).",
            best.label,
            best.average(),
            base.average()
        );
    }
}

/// The report's Arms section: what the comparison means, then the `arms` table.
fn arms_section(md: &mut String, arms: &str) {
    let _ = writeln!(md, "\n## Arms\n");
    let _ = writeln!(
        md,
        "The compute-matched comparison: each arm's average perplexity over the domains, once per training \
         seed (`-s<seed>` models), their mean, and the mean relative to the dense baseline's (negative = \
         lower perplexity than dense). *experts* is each domain's expert on its own domain: the in-domain \
         ceiling, not a single model. Beside them, what each arm cost to train (FLOPs after the seed, the \
         mean over its runs) and what it costs to use: the parameters that work on each token (an MoE's \
         active ones; every member of an ensemble, since each scores the prefix for the domain posterior).\n"
    );
    md.push_str(arms);
}

/// Jobs up to which the report's Jobs section lists every job; past it, counts and run times
/// per stage (every job is in `jobs.csv`).
const REPORT_JOBS: usize = 60;

/// The report's Jobs and lineage section: every job's id, run time, and the model it produced
/// with that model's lineage (a wide run: per stage, its jobs, how many finished, their total
/// and longest run time). Returns the whole list as CSV (`jobs.csv`).
fn jobs_section(md: &mut String, run: &Path, plan: &Plan) -> String {
    let _ = writeln!(md, "## Jobs and lineage\n");
    let mut csv = String::from("job,id,seconds,produces,lineage\n");
    let mut lines = vec![];
    // stage → (jobs, finished, total seconds, longest)
    let mut stages: Vec<(&str, usize, usize, f64, f64)> = vec![];
    for j in &plan.jobs {
        let seconds = crate::executor::job_seconds(run, j);
        let secs = seconds.map_or("–".into(), |s| format!("{s:.1}"));
        let (produces, lineage) = match &j.produces {
            Some(m) => (m.label.clone(), lineage_cell(plan, &m.dir)),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            csv,
            "{},{},{},{},{}",
            csv_field(&j.name),
            csv_field(&j.id),
            seconds.map_or(String::new(), |s| format!("{s:.1}")),
            csv_field(j.produces.as_ref().map_or("", |m| m.label.as_str())),
            csv_field(if lineage == "–" { "" } else { &lineage })
        );
        lines.push(format!("| {} | `{}` | {secs} | {produces} | {lineage} |", j.name, j.id));
        let stage = j.name.split('/').next().unwrap_or(&j.name);
        let at = match stages.iter().position(|s| s.0 == stage) {
            Some(i) => i,
            None => {
                stages.push((stage, 0, 0, 0.0, 0.0));
                stages.len() - 1
            }
        };
        let s = &mut stages[at];
        s.1 += 1;
        if let Some(t) = seconds {
            s.2 += 1;
            s.3 += t;
            s.4 = s.4.max(t);
        }
    }
    if plan.jobs.len() <= REPORT_JOBS {
        let _ = writeln!(md, "| job | id | seconds | produces | lineage |\n|---|---|---:|---|---|");
        for l in lines {
            let _ = writeln!(md, "{l}");
        }
    } else {
        let _ =
            writeln!(md, "{} jobs, by stage. Every job's id, run time, model and lineage is in [jobs.csv](jobs.csv).\n", plan.jobs.len());
        let _ = writeln!(md, "| stage | jobs | finished | seconds, total | seconds, longest |\n|---|---:|---:|---:|---:|");
        for (stage, jobs, finished, total, longest) in stages {
            let _ = writeln!(md, "| {stage} | {jobs} | {finished} | {total:.1} | {longest:.1} |");
        }
    }
    csv
}

/// The lineage of the model in `dir` as one table cell: its kind, its parents (domain and
/// manifest hash prefix) and its steps; `–` when it has none.
fn lineage_cell(plan: &Plan, dir: &Path) -> String {
    let l = read_in_run(plan, &dir.join(btm_model::lineage::LINEAGE)).and_then(|b| serde_json::from_slice::<btm_model::Lineage>(&b).ok());
    l.map_or("–".into(), |l| {
        let parents: Vec<String> = l
            .parents
            .iter()
            .map(|p| {
                format!(
                    "{}{}",
                    p.domain.clone().map(|d| format!("{d}:")).unwrap_or_default(),
                    p.manifest_sha256.as_deref().map_or("?", |h| &h[..12.min(h.len())])
                )
            })
            .collect();
        format!("{} ← [{}]{}", l.kind, parents.join(", "), l.steps.map(|s| format!(", {s} steps")).unwrap_or_default())
    })
}

/// `report.html`: the Markdown report itself rendered (headings, paragraphs, tables), with the
/// plots inline, so the HTML carries every section, table and sentence the Markdown has.
fn report_html(name: &str, md: &str, figures: &[(String, String, String)]) -> String {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>btm run {}</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>",
        esc(name)
    );
    let lines: Vec<&str> = md.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with('|') {
            let start = i;
            while i < lines.len() && lines[i].starts_with('|') {
                i += 1;
            }
            html.push_str(&markdown_table_to_html(&lines[start..i].join("\n")));
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            let _ = write!(html, "<h2>{}</h2>", inline_html(h));
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = write!(html, "<h1>{}</h1>", inline_html(h));
        } else if let Some((caption, file)) = line.strip_prefix("![").and_then(|l| l.split_once("](plots/")) {
            let file = file.trim_end_matches(')');
            let svg = figures.iter().find(|f| f.1 == file).map_or("", |f| f.2.as_str());
            let _ = write!(html, "<figure>{svg}<figcaption>{}</figcaption></figure>", esc(caption));
        } else if !line.trim().is_empty() {
            let _ = write!(html, "<p>{}</p>", inline_html(line));
        }
        i += 1;
    }
    html.push_str("</body></html>");
    html
}

/// One line of the report's Markdown as HTML: escaped, `code` and *emphasis* marked up.
fn inline_html(text: &str) -> String {
    // A `[label](target)` link: the report's own files (perplexity.csv, jobs.csv).
    if let Some((before, rest)) = text.split_once('[') {
        if let Some((label, target, after)) = rest.split_once("](").and_then(|(l, r)| r.split_once(')').map(|(t, a)| (l, t, a))) {
            if !label.contains('[') && !target.is_empty() && !target.contains([' ', '"']) {
                return format!("{}<a href=\"{}\">{}</a>{}", inline_html(before), esc(target), inline_html(label), inline_html(after));
            }
        }
    }
    let mut out = String::new();
    let (mut code, mut em) = (false, false);
    for c in esc(text).chars() {
        match c {
            '`' => {
                out.push_str(if code { "</code>" } else { "<code>" });
                code = !code;
            }
            '*' if !code => {
                out.push_str(if em { "</em>" } else { "<em>" });
                em = !em;
            }
            c => out.push(c),
        }
    }
    out
}

fn markdown_table_to_html(md: &str) -> String {
    let mut out = String::from("<table>");
    for (i, line) in md.lines().filter(|l| l.starts_with('|')).enumerate() {
        if i == 1 {
            continue; // the |---| separator
        }
        let tag = if i == 0 { "th" } else { "td" };
        out.push_str("<tr>");
        for cell in line.trim_matches('|').split('|') {
            let _ = write!(out, "<{tag}>{}</{tag}>", esc(cell.trim()).replace('`', ""));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_average_and_compute() {
        let mut ppl = BTreeMap::new();
        ppl.insert("a".to_string(), 10.0);
        ppl.insert("b".to_string(), 20.0);
        let mut rows = vec![Row {
            label: "merged".into(),
            ppl,
            tokens_after_seed: 1000,
            flops_after_seed: 6.0e9,
            routing: BTreeMap::new(),
            added_domains: BTreeSet::new(),
            active_params: 0,
        }];
        let t = table(&rows);
        assert!(t.contains("| merged | 10.000 | 20.000 | 15.000 | 1000 | 6.000e9 |"), "{t}");
        // A domain added later is shown but not averaged.
        rows[0].ppl.insert("c".to_string(), 90.0);
        rows[0].added_domains.insert("c".to_string());
        let t = table(&rows);
        assert!(t.contains("| merged | 10.000 | 20.000 | 90.000 | 15.000 | 1000 | 6.000e9 |"), "{t}");
    }

    /// A scored model with perplexities `a` and `b` on domains a and b, 100 active parameters.
    fn row(label: &str, a: f64, b: f64) -> Row {
        Row {
            label: label.into(),
            ppl: [("a".to_string(), a), ("b".to_string(), b)].into_iter().collect(),
            tokens_after_seed: 0,
            flops_after_seed: 0.0,
            routing: BTreeMap::new(),
            added_domains: BTreeSet::new(),
            active_params: 100,
        }
    }

    #[test]
    fn arms_average_their_seeds_against_dense() {
        let rows = vec![
            row("expert-a", 5.0, 50.0),
            row("expert-b", 40.0, 7.0),
            row("baseline", 10.0, 10.0),
            row("baseline-s1", 12.0, 12.0),
            row("continued", 9.0, 9.0),
            row("continued-s1", 10.0, 10.0),
            row("continued-scratch", 1.0, 1.0),
        ];
        let t = arms_table(&rows).unwrap();
        assert!(t.contains("| dense | baseline: 10.000, baseline-s1: 12.000 | 11.000 | +0.0 % | 0.000e0 | 100 |"), "{t}");
        assert!(t.contains("| btm-merge | continued: 9.000, continued-s1: 10.000 | 9.500 | -13.6 % |"), "{t}");
        assert!(t.contains("| experts (in-domain) | expert-<domain> on <domain>: 6.000 | 6.000 | -45.5 % | 0.000e0 | 100 |"), "{t}");
        assert!(!t.contains("upcycle") && !t.contains("scratch"), "{t}");
        assert!(arms_table(&rows[4..]).is_none());
    }

    /// Every heading, table row and sentence of the Markdown report is in the HTML one.
    #[test]
    fn the_html_report_carries_everything_the_markdown_has() {
        let md = "# btm run `x`\n\n## Perplexity\n\nPer-domain *perplexity*.\n\n| model | a |\n|---|---:|\n| merged | 1.000 |\n\n\
                  `merged` vs the compute-matched dense `baseline`: better.\n\n## Arms\n\n| arm | mean |\n|---|---:|\n| dense | 2.0 |\n\n\
                  ## Plots\n\n![Training loss](plots/loss.svg)\n\n## Jobs and lineage\n\n| job | id |\n|---|---|\n| seed | `abc` |\n";
        let figures = vec![("Training loss".to_string(), "loss.svg".to_string(), "<svg>plot</svg>".to_string())];
        let html = report_html("x", md, &figures);
        let linked = report_html("x", "Every score is in [perplexity.csv](perplexity.csv).", &[]);
        assert!(linked.contains(r#"<p>Every score is in <a href="perplexity.csv">perplexity.csv</a>.</p>"#), "{linked}");
        for needle in [
            "<h1>btm run <code>x</code></h1>",
            "<h2>Perplexity</h2>",
            "<p>Per-domain <em>perplexity</em>.</p>",
            "<td>merged</td><td>1.000</td>",
            "<code>merged</code> vs the compute-matched dense <code>baseline</code>: better.",
            "<h2>Arms</h2>",
            "<td>dense</td><td>2.0</td>",
            "<figure><svg>plot</svg><figcaption>Training loss</figcaption></figure>",
            "<h2>Jobs and lineage</h2>",
            "<td>seed</td><td>abc</td>",
        ] {
            assert!(html.contains(needle), "`{needle}` missing from:\n{html}");
        }
    }

    /// A run of 1,024 domains: the table a model per line with its own-domain and average
    /// perplexity, the experts one line of means, every score in the CSV; the heatmap of a
    /// 1,024-expert MoE and the bar chart binned to at most 32 cells a side.
    #[test]
    fn a_wide_runs_table_and_plots_are_summarised() {
        let n = 1024;
        let domains: Vec<String> = (0..n).map(|i| format!("d{i:04}")).collect();
        let scored = |label: &str, on: &[usize], ppl: f64| Row {
            label: label.into(),
            ppl: on.iter().map(|&d| (domains[d].clone(), ppl + d as f64 / n as f64)).collect(),
            tokens_after_seed: 100,
            flops_after_seed: 1e9,
            routing: BTreeMap::new(),
            added_domains: BTreeSet::new(),
            active_params: 10,
        };
        let every: Vec<usize> = (0..n).collect();
        let mut rows = vec![scored("baseline", &every, 20.0), scored("merged", &every, 10.0), scored("continued", &every, 9.0)];
        // Each expert on its own domain (5) and the next eight (6).
        for (i, own) in domains.iter().enumerate() {
            let mut r = scored(&format!("expert-{own}"), &(0..9).map(|k| (i + k) % n).collect::<Vec<_>>(), 6.0);
            r.ppl.insert(own.clone(), 5.0);
            rows.push(r);
        }
        let t = summary_table(&rows);
        assert_eq!(t.lines().count(), 2 + 4, "{t}");
        assert!(t.contains("| merged | 1024 | – | 10.500 | 100 | 1.000e9 |"), "{t}");
        assert!(t.contains("| expert-<domain>: 1024 models, means | 9 | 5.000 |"), "{t}");
        let csv = perplexity_csv(&rows);
        assert_eq!(csv.lines().count(), 1 + 3 * n + 9 * n);
        assert!(csv.contains("\nexpert-d0007,d0007,5\n") && csv.contains("\nmerged,d1023,10.9990234375\n"), "{}", &csv[..300]);
        assert_eq!(csv_field("a,b \"c\""), "\"a,b \"\"c\"\"\"");

        let routing: BTreeMap<String, Vec<Vec<f64>>> = (0..n)
            .map(|d| {
                let mut row = vec![0.0; n];
                row[d] = 1.0;
                (domains[d].clone(), vec![row])
            })
            .collect();
        let svg = routing_heatmap("merged", &routing);
        assert_eq!(svg.matches("<rect").count(), 32 * 32, "one layer of 32 × 32 cells");
        // Each domain sends everything to its own expert: the diagonal bins hold it all.
        assert!(svg.contains("d0000…d0031 → expert 0…31: 100.0%") && svg.contains("d0000…d0031 → expert 32…63: 0.0%"), "binned cells");
        assert!(svg.len() < 400_000, "{} bytes", svg.len());
        let bars = arms_bar_chart(&rows).unwrap();
        assert_eq!(bars.matches("<rect x=").count(), 2 * 32 + 2, "two arms over 32 groups, two legend keys");
        assert!(bars.contains("<title>btm-merge on d0000…d0031:"), "{}", &bars[..600]);
        let series: Vec<(String, Vec<(f64, f64)>)> = (0..n).map(|i| (format!("expert-{i}"), vec![(0.0, 5.0), (10.0, 4.0)])).collect();
        let plot = loss_plot(&series);
        assert!(plot.matches("<line ").count() == LEGEND_ENTRIES && plot.contains(&format!("… {} more", n - LEGEND_ENTRIES)));
    }

    #[test]
    fn plots_are_svg() {
        let svg = loss_plot(&[("seed".into(), vec![(0.0, 5.0), (100.0, 3.0)])]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.ends_with("</svg>"));
        // Readable ticks: no scientific notation.
        let svg = line_plot(&[("seed".into(), vec![(0.0, 5.0), (1_200_000.0, 3.0)])], "validation perplexity");
        assert!(svg.contains(">0</text>") && svg.contains(">1.2M</text>") && !svg.contains("e0<") && svg.contains("validation perplexity"));
        assert_eq!([human(0.0), human(750.0), human(40_960.0), human(2.5e9)], ["0", "750", "41k", "2.5G"]);
        // One bar per arm and domain, dense first.
        let rows = [row("baseline", 10.0, 20.0), row("continued", 9.0, 21.0), row("ensemble", 8.0, 19.0)];
        let svg = arms_bar_chart(&rows).unwrap();
        assert_eq!(svg.matches("<rect x=").count(), 6 + 3, "six bars and three legend keys");
        assert!(svg.contains("<title>btm-merge on b: 21.000</title>"), "{svg}");
        assert!(arms_bar_chart(&rows[1..]).is_none(), "no dense baseline, no chart");
        let mut r = BTreeMap::new();
        r.insert("code".to_string(), vec![vec![0.9, 0.1]]);
        let svg = routing_heatmap("merged", &r);
        assert!(svg.contains("code → expert 0: 90.0%"));
    }
}
