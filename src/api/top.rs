//! `disco top --api PATH`: the monitor live in the terminal (ratatui on
//! crossterm), a client of the API like `disco ctl`. Every second it reads
//! `GET /v1/vms` and `GET /v1/stats` and shows per VM its state, vCPU
//! nodes, memory per node, shared MiB, local-access % (the NUMA runner's
//! locality samples of its last epochs), copy-on-write breaks and migrated
//! frames per second and progress, per node the pool's use, and
//! monitor-wide merges and migrations per second. `q` (or Esc, or Ctrl-C) quits.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::{DefaultTerminal, Frame};
use serde_json::Value;

use super::client::request;

/// How often the figures are read again.
const REFRESH: Duration = Duration::from_secs(1);

const MIB: f64 = (1 << 20) as f64;
const PAGE: f64 = crate::PAGE_SIZE as f64;

/// What one refresh read, and the rates since the one before.
#[derive(Default)]
struct View {
    vms: Vec<Value>,
    stats: Value,
    error: Option<String>,
    /// Per VM: copy-on-write breaks and migrated frames per second.
    cow_rate: HashMap<String, f64>,
    migrated_rate: HashMap<String, f64>,
    merges_rate: f64,
    migrations_rate: f64,
}

/// The counters rates are computed from.
#[derive(Default)]
struct Last {
    at: Option<Instant>,
    cow: HashMap<String, u64>,
    migrated: HashMap<String, u64>,
    merges: u64,
    migrations: u64,
}

fn read(socket: &Path, last: &mut Last) -> View {
    let get = |uri: &str| -> Result<Value> {
        let a = request(socket, "GET", uri, None, Duration::from_secs(5))?;
        anyhow::ensure!(a.status == 200, "GET {uri}: HTTP {}: {}", a.status, a.body);
        Ok(a.json())
    };
    let (vms, stats) = match (get("/v1/vms"), get("/v1/stats")) {
        (Ok(v), Ok(s)) => (v, s),
        (Err(e), _) | (_, Err(e)) => {
            return View {
                error: Some(format!("{e:#}")),
                ..View::default()
            }
        }
    };
    let now = Instant::now();
    let secs = last
        .at
        .map(|t| now.duration_since(t).as_secs_f64())
        .filter(|&s| s > 0.0);
    let rate = |now: u64, before: Option<u64>| match (secs, before) {
        (Some(s), Some(b)) => now.saturating_sub(b) as f64 / s,
        _ => 0.0,
    };
    let vms: Vec<Value> = vms["vms"].as_array().cloned().unwrap_or_default();
    let mut view = View::default();
    let (mut cow, mut migrated) = (HashMap::new(), HashMap::new());
    for v in &vms {
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let breaks = v["cow_breaks"].as_u64().unwrap_or(0);
        view.cow_rate
            .insert(name.clone(), rate(breaks, last.cow.get(&name).copied()));
        cow.insert(name.clone(), breaks);
        let moved = v["frames_migrated"].as_u64().unwrap_or(0);
        view.migrated_rate
            .insert(name.clone(), rate(moved, last.migrated.get(&name).copied()));
        migrated.insert(name, moved);
    }
    let merges = stats["sharing"]["merges"].as_u64().unwrap_or(0);
    let migrations = stats["numa"]["migrations"].as_u64().unwrap_or(0);
    view.merges_rate = rate(merges, last.at.map(|_| last.merges));
    view.migrations_rate = rate(migrations, last.at.map(|_| last.migrations));
    *last = Last {
        at: Some(now),
        cow,
        migrated,
        merges,
        migrations,
    };
    view.vms = vms;
    view.stats = stats;
    view
}

fn draw(frame: &mut Frame, socket: &Path, view: &View) {
    let [head, vms, pools] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(4),
        Constraint::Length(view.stats["pools"].as_array().map_or(0, Vec::len) as u16 + 3),
    ])
    .areas(frame.area());
    let s = &view.stats;
    let title = match &view.error {
        Some(e) => format!("disco top {}: {e}", socket.display()),
        None => format!(
            "disco top {} | up {:.0} s | policy {} | {} VMs | verify {} | saved by sharing {:.1} MiB | \
             merges {:.0}/s | migrations {:.0}/s | q quits",
            socket.display(),
            s["uptime_ms"].as_f64().unwrap_or(0.0) / 1e3,
            s["policy"].as_str().unwrap_or("?"),
            view.vms.len(),
            if s["verify"]["ok"] == true { "ok" } else { "FAILED" },
            s["sharing"]["saved_bytes"].as_f64().unwrap_or(0.0) / MIB,
            view.merges_rate,
            view.migrations_rate,
        ),
    };
    frame.render_widget(
        Paragraph::new(Line::from(title)).block(Block::default().borders(Borders::ALL)),
        head,
    );

    let rows = view.vms.iter().map(|v| {
        let name = v["name"].as_str().unwrap_or("?");
        let nodes: Vec<String> = v["vcpu_nodes"]
            .as_array()
            .map(|a| a.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default();
        let per_node: Vec<String> = v["pages_per_node"]
            .as_array()
            .map(|a| {
                a.iter()
                    .enumerate()
                    .filter(|(_, p)| p.as_u64().unwrap_or(0) > 0)
                    .map(|(n, p)| format!("n{n}:{:.1}", p.as_f64().unwrap_or(0.0) * PAGE / MIB))
                    .collect()
            })
            .unwrap_or_default();
        let progress = match (v["progress"][0].as_f64(), v["progress"][1].as_f64()) {
            (Some(d), Some(t)) if t > 0.0 => format!("{:.0} %", 100.0 * d / t),
            _ => "-".into(),
        };
        let state = match v["result"]["status"].as_str() {
            Some(st) if v["state"] == "finished" => format!("finished ({st})"),
            _ => v["state"].as_str().unwrap_or("?").to_string(),
        };
        // The last epochs' locality; before any, the whole run's; without
        // NUMA sampling, none.
        let local = match v["recent_local_percent"]
            .as_f64()
            .or(v["local_percent"].as_f64())
        {
            Some(p) => format!("{p:.0} %"),
            None => "-".into(),
        };
        Row::new(vec![
            name.to_string(),
            state,
            nodes.join(","),
            per_node.join(" "),
            format!("{:.1}", v["shared_mib"].as_f64().unwrap_or(0.0)),
            local,
            format!("{:.0}", view.cow_rate.get(name).copied().unwrap_or(0.0)),
            format!(
                "{:.0}",
                view.migrated_rate.get(name).copied().unwrap_or(0.0)
            ),
            progress,
        ])
    });
    let header = Row::new(vec![
        "VM",
        "state",
        "vCPU nodes",
        "MiB per node",
        "shared MiB",
        "local",
        "COW breaks/s",
        "migr./s",
        "progress",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(16),
                Constraint::Length(18),
                Constraint::Length(12),
                Constraint::Min(20),
                Constraint::Length(11),
                Constraint::Length(6),
                Constraint::Length(13),
                Constraint::Length(8),
                Constraint::Length(9),
            ],
        )
        .header(header)
        .block(Block::default().borders(Borders::ALL).title("VMs")),
        vms,
    );

    let pool_rows = s["pools"].as_array().cloned().unwrap_or_default();
    let rows = pool_rows.iter().map(|p| {
        let pages = |k: &str| p[k].as_f64().unwrap_or(0.0);
        let used = pages("used_pages");
        let cap = pages("capacity_pages").max(1.0);
        Row::new(vec![
            format!("node {}", p["node"]),
            format!("{:.1}", used * PAGE / MIB),
            format!("{:.1}", pages("free_pages") * PAGE / MIB),
            format!("{:.1}", pages("resident_bytes") / MIB),
            format!("{:.3} %", 100.0 * used / cap),
        ])
    });
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(8),
                Constraint::Length(12),
                Constraint::Length(12),
                Constraint::Length(14),
                Constraint::Length(10),
            ],
        )
        .header(
            Row::new(vec!["pool", "used MiB", "free MiB", "resident MiB", "use"])
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title("machine memory"),
        ),
        pools,
    );
}

fn run_loop(terminal: &mut DefaultTerminal, socket: &Path) -> Result<()> {
    let mut last = Last::default();
    loop {
        let view = read(socket, &mut last);
        terminal.draw(|f| draw(f, socket, &view))?;
        let next = Instant::now() + REFRESH;
        while let Some(wait) = next.checked_duration_since(Instant::now()) {
            if !event::poll(wait)? {
                break;
            }
            if let Event::Key(k) = event::read()? {
                let quit = k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                        || (k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL)));
                if quit {
                    return Ok(());
                }
            }
        }
    }
}

/// Runs `disco top` until `q`; the terminal is restored also on an error.
pub fn run(socket: &Path) -> Result<()> {
    // Fail before taking the terminal when nothing answers there.
    request(socket, "GET", "/v1/policy", None, Duration::from_secs(5))
        .with_context(|| format!("no monitor API at {}", socket.display()))?;
    let mut terminal = ratatui::init();
    let result = run_loop(&mut terminal, socket);
    ratatui::restore();
    result
}
