//! `disco bench compare OLD NEW`: what got better or worse between two
//! results folders, with each figure's noise taken into account.
//!
//! Every figure present in both folders (same scenario, same figure name)
//! is compared by its median. A change is **flagged** only when both hold:
//!
//! * it is outside the noise: the new median lies outside the old run's
//!   min-max spread *and* the old median outside the new run's (with one
//!   sample per side the spread is the point itself, so this alone never
//!   rules a change out);
//! * it is larger than the threshold (default 5 % of the old median).
//!
//! A flagged change is *better* or *worse* according to the figure's
//! declared direction ([`Better`]); figures declared `Neither` (reference
//! figures such as KSM's own time) are shown as *changed*. Everything else
//! is *within noise*.

use std::path::Path;

use anyhow::{bail, Result};
use serde::Serialize;

use super::markdown_table_aligned;
use super::suite::{decimals, read_records, Better, Figure, ScenarioRecord};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Better,
    Worse,
    /// A flagged change of a figure without a better direction.
    Changed,
    WithinNoise,
    /// In one folder only, or not measured in one.
    Missing,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "WORSE",
            Verdict::Changed => "changed",
            Verdict::WithinNoise => "within noise",
            Verdict::Missing => "missing",
        }
    }
}

/// One figure in both folders.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FigureChange {
    pub scenario: String,
    pub figure: String,
    pub unit: String,
    pub better: Better,
    pub old: Option<(f64, f64, f64)>,
    pub new: Option<(f64, f64, f64)>,
    /// (new - old) / |old|, percent.
    pub change_percent: Option<f64>,
    pub verdict: Verdict,
    /// Why (noise, threshold, missing).
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub threshold_percent: f64,
    pub changes: Vec<FigureChange>,
    /// Differences between the machines the two folders ran on.
    pub machine_differences: Vec<String>,
    pub old_commit: String,
    pub new_commit: String,
}

impl Comparison {
    pub fn regressions(&self) -> impl Iterator<Item = &FigureChange> {
        self.changes.iter().filter(|c| c.verdict == Verdict::Worse)
    }
}

fn triple(f: &Figure) -> Option<(f64, f64, f64)> {
    f.stats.as_ref().map(|s| (s.median, s.min, s.max))
}

/// Compares one figure.
pub fn compare_figure(
    scenario: &str,
    old: &Figure,
    new: &Figure,
    threshold_percent: f64,
) -> FigureChange {
    let mut c = FigureChange {
        scenario: scenario.to_string(),
        figure: new.name.clone(),
        unit: new.unit.clone(),
        better: new.better,
        old: triple(old),
        new: triple(new),
        change_percent: None,
        verdict: Verdict::Missing,
        why: String::new(),
    };
    let (Some((om, omin, omax)), Some((nm, nmin, nmax))) = (c.old, c.new) else {
        c.why = "not measured in one of the folders".into();
        return c;
    };
    let delta = nm - om;
    let rel = if om != 0.0 {
        Some(delta / om.abs() * 100.0)
    } else if delta == 0.0 {
        Some(0.0)
    } else {
        None // from zero: any change is infinitely large
    };
    c.change_percent = rel;
    let outside_spreads = (nm < omin || nm > omax) && (om < nmin || om > nmax);
    let beyond_threshold = rel.is_none_or(|r| r.abs() > threshold_percent);
    if !outside_spreads {
        c.verdict = Verdict::WithinNoise;
        c.why = "medians inside each other's min-max spread".into();
        return c;
    }
    if !beyond_threshold {
        c.verdict = Verdict::WithinNoise;
        c.why = format!("change below the {threshold_percent}% threshold");
        return c;
    }
    c.verdict = match new.better {
        Better::Neither => Verdict::Changed,
        Better::Lower if delta < 0.0 => Verdict::Better,
        Better::Higher if delta > 0.0 => Verdict::Better,
        _ => Verdict::Worse,
    };
    c.why = format!(
        "outside both spreads and the {threshold_percent}% threshold ({} is better)",
        new.better.word()
    );
    c
}

/// Compares two lists of scenario records.
pub fn compare_records(
    old: &[ScenarioRecord],
    new: &[ScenarioRecord],
    threshold_percent: f64,
) -> Comparison {
    let mut changes = Vec::new();
    for n in new {
        let Some(o) = old.iter().find(|o| o.scenario == n.scenario) else {
            changes.push(FigureChange {
                scenario: n.scenario.clone(),
                figure: "(whole scenario)".into(),
                unit: String::new(),
                better: Better::Neither,
                old: None,
                new: None,
                change_percent: None,
                verdict: Verdict::Missing,
                why: "only in the new folder".into(),
            });
            continue;
        };
        for nf in &n.figures {
            match o.figure(&nf.name) {
                Some(of) => changes.push(compare_figure(&n.scenario, of, nf, threshold_percent)),
                None => changes.push(FigureChange {
                    why: "only in the new folder".into(),
                    ..compare_figure(
                        &n.scenario,
                        &Figure {
                            stats: None,
                            ..nf.clone()
                        },
                        nf,
                        threshold_percent,
                    )
                }),
            }
        }
        for of in o.figures.iter().filter(|f| n.figure(&f.name).is_none()) {
            changes.push(FigureChange {
                why: "only in the old folder".into(),
                ..compare_figure(
                    &n.scenario,
                    of,
                    &Figure {
                        stats: None,
                        ..of.clone()
                    },
                    threshold_percent,
                )
            });
        }
    }
    for o in old
        .iter()
        .filter(|o| !new.iter().any(|n| n.scenario == o.scenario))
    {
        changes.push(FigureChange {
            scenario: o.scenario.clone(),
            figure: "(whole scenario)".into(),
            unit: String::new(),
            better: Better::Neither,
            old: None,
            new: None,
            change_percent: None,
            verdict: Verdict::Missing,
            why: "only in the old folder".into(),
        });
    }
    let machine_differences = match (old.first(), new.first()) {
        (Some(o), Some(n)) => o.machine.differences(&n.machine),
        _ => Vec::new(),
    };
    let commit = |r: &[ScenarioRecord]| r.first().map_or(String::new(), |r| r.git_commit.clone());
    Comparison {
        threshold_percent,
        changes,
        machine_differences,
        old_commit: commit(old),
        new_commit: commit(new),
    }
}

/// Compares two results folders.
pub fn compare_dirs(old: &Path, new: &Path, threshold_percent: f64) -> Result<Comparison> {
    let (o, n) = (read_records(old)?, read_records(new)?);
    if o.is_empty() {
        bail!(
            "{}: no scenario results (*.json) in this folder",
            old.display()
        );
    }
    if n.is_empty() {
        bail!(
            "{}: no scenario results (*.json) in this folder",
            new.display()
        );
    }
    Ok(compare_records(&o, &n, threshold_percent))
}

fn show(t: Option<(f64, f64, f64)>) -> String {
    match t {
        None => "-".into(),
        Some((m, lo, hi)) if lo == hi => format!("{m:.d$}", d = decimals(m)),
        Some((m, lo, hi)) => format!("{m:.d$} ({lo:.d$}-{hi:.d$})", d = decimals(m)),
    }
}

impl Comparison {
    /// A Markdown table (one row per figure), then a summary line.
    pub fn render(&self) -> String {
        let mut out = format!(
            "Comparing `{}` (old) with `{}` (new); a change counts only outside both runs' \
             min-max spread and beyond {}%.\n\n",
            self.old_commit, self.new_commit, self.threshold_percent
        );
        if !self.machine_differences.is_empty() {
            out += &format!(
                "**Different machines**: {}.\n\n",
                self.machine_differences.join("; ")
            );
        }
        let rows: Vec<Vec<String>> = self
            .changes
            .iter()
            .map(|c| {
                vec![
                    c.scenario.clone(),
                    c.figure.clone(),
                    show(c.old),
                    show(c.new),
                    c.unit.clone(),
                    c.change_percent.map_or("-".into(), |p| format!("{p:+.1}%")),
                    c.better.word().to_string(),
                    c.verdict.word().to_string(),
                ]
            })
            .collect();
        out += &markdown_table_aligned(
            &[
                "scenario", "figure", "old", "new", "unit", "change", "better", "verdict",
            ],
            2,
            &rows,
        );
        let count = |v: Verdict| self.changes.iter().filter(|c| c.verdict == v).count();
        out += &format!(
            "\n{} worse, {} better, {} changed (no direction), {} within noise, {} missing.\n",
            count(Verdict::Worse),
            count(Verdict::Better),
            count(Verdict::Changed),
            count(Verdict::WithinNoise),
            count(Verdict::Missing)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Stats;

    fn fig(better: Better, samples: &[f64]) -> Figure {
        Figure::new("t", "ms", better, Stats::of(samples))
    }

    #[test]
    fn noise_threshold_and_direction() {
        let old = fig(Better::Lower, &[10.0, 11.0, 12.0]);
        // Inside the old spread: noise.
        let c = compare_figure("s", &old, &fig(Better::Lower, &[11.5, 11.8, 12.5]), 5.0);
        assert_eq!(c.verdict, Verdict::WithinNoise);
        // Far outside both spreads, slower: worse.
        let c = compare_figure("s", &old, &fig(Better::Lower, &[20.0, 21.0, 22.0]), 5.0);
        assert_eq!(c.verdict, Verdict::Worse);
        assert!((c.change_percent.unwrap() - 90.909).abs() < 0.01);
        // Faster: better; the same for a higher-is-better figure going up.
        let c = compare_figure("s", &old, &fig(Better::Lower, &[5.0, 5.5, 6.0]), 5.0);
        assert_eq!(c.verdict, Verdict::Better);
        let up = compare_figure(
            "s",
            &fig(Better::Higher, &[10.0]),
            &fig(Better::Higher, &[20.0]),
            5.0,
        );
        assert_eq!(up.verdict, Verdict::Better);
        // Outside the spreads but below the threshold.
        let c = compare_figure(
            "s",
            &fig(Better::Lower, &[100.0]),
            &fig(Better::Lower, &[102.0]),
            5.0,
        );
        assert_eq!(c.verdict, Verdict::WithinNoise);
        // The new median outside the old spread but the old median inside
        // the new (wide) spread: noise.
        let c = compare_figure("s", &old, &fig(Better::Lower, &[9.0, 15.0, 30.0]), 5.0);
        assert_eq!(c.verdict, Verdict::WithinNoise);
        // No direction.
        let c = compare_figure(
            "s",
            &fig(Better::Neither, &[1.0]),
            &fig(Better::Neither, &[2.0]),
            5.0,
        );
        assert_eq!(c.verdict, Verdict::Changed);
    }
}
