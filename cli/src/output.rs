//! Output: tables for people, JSON for scripts. With `-o json` stdout holds
//! exactly one JSON value (or JSON Lines for streams) and nothing else.
//!
//! Colour is for people only: it is used when stdout is a terminal, and never
//! with `--no-color` or a non-empty `NO_COLOR` (no-color.org). `main` decides
//! once with [`init_color`]; tables built while it is off carry no ANSI codes
//! whatever comfy-table would otherwise detect.

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use comfy_table::{Cell, Color, ContentArrangement, Table, presets};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// Whether this run may use colour; set once by [`init_color`].
static COLOR: AtomicBool = AtomicBool::new(false);

/// Decide once, before any output, whether to use colour.
pub fn init_color(no_color_flag: bool) {
    let wanted = color_wanted(
        no_color_flag,
        std::env::var_os("NO_COLOR").as_deref(),
        std::io::stdout().is_terminal(),
    );
    COLOR.store(wanted, Ordering::Relaxed);
}

/// Whether output is coloured in this run (false until [`init_color`]).
pub fn color_enabled() -> bool {
    COLOR.load(Ordering::Relaxed)
}

/// Colour only on a terminal, and neither `--no-color` nor `NO_COLOR` set.
/// Per no-color.org an empty `NO_COLOR` does not count as set.
fn color_wanted(no_color_flag: bool, no_color_env: Option<&OsStr>, stdout_is_tty: bool) -> bool {
    let env_says_no = no_color_env.is_some_and(|value| !value.is_empty());
    stdout_is_tty && !no_color_flag && !env_says_no
}

/// A borderless table like `kubectl get`, `$COLUMNS` wide (80 by default).
pub fn table(header: &[&str]) -> Table {
    let columns = std::env::var("COLUMNS").ok();
    build_table(header, color_enabled(), table_width(columns.as_deref()))
}

fn build_table(header: &[&str], color: bool, width: u16) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec())
        .set_width(width);
    // comfy-table would decide by itself whether stdout is a terminal; the
    // decision is ours, so that --no-color and NO_COLOR count too.
    if color {
        // Colour the words, not the padding around them.
        table.enforce_styling();
        table.style_text_only();
    } else {
        table.force_no_tty();
    }
    table
}

/// Fit 80 columns unless `$COLUMNS` names a usable width: shells do not
/// export `COLUMNS` by default, and pipes and CI logs have no width at all,
/// so 80 is the safe assumption rather than the terminal's size.
fn table_width(columns: Option<&str>) -> u16 {
    columns
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|w| *w >= MIN_TABLE_WIDTH)
        .unwrap_or(80)
}

/// Narrower than this, every column wraps to a few characters: not useful.
const MIN_TABLE_WIDTH: u16 = 20;

/// A status word as a table cell, green when all is well, red when it is
/// not, yellow while it changes; plain when colour is off (the table drops
/// the style) and for words it does not know.
pub fn status_cell(status: &str) -> Cell {
    let cell = Cell::new(status);
    match status_color(status) {
        Some(color) => cell.fg(color),
        None => cell,
    }
}

fn status_color(status: &str) -> Option<Color> {
    match status {
        "connected" | "healthy" | "running" | "succeeded" | "ok" | "active" | "trusted"
        | "ready" => Some(Color::Green),
        "disconnected" | "unhealthy" | "failed" | "rolled_back" | "aborted" | "denied"
        | "error" | "revoked" | "not_ready" => Some(Color::Red),
        "installing" | "staged" | "starting" | "stopping" | "pending" | "awaiting_approval"
        | "paused" | "rolling_back" => Some(Color::Yellow),
        _ => None,
    }
}

pub fn print_table(table: &Table) {
    let text = table.to_string();
    let mut out = std::io::stdout().lock();
    for line in text.lines() {
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// Pretty JSON, one value.
pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot encode output as JSON: {e}"),
    }
}

/// One JSON Lines record, flushed at once so pipes see it live.
pub fn print_json_line<T: Serialize>(value: &T) {
    if let Ok(text) = serde_json::to_string(value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// How a verdict reads in plain output and the live view: failures stand out.
pub fn verdict_word(v: &hotswap_common::model::VerdictView) -> &str {
    match v.outcome.as_str() {
        "failed" => "FAILED",
        "" if !v.passed => "FAILED",
        "" => "passed",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_opt_outs() {
        let set = Some(OsStr::new("1"));
        let empty = Some(OsStr::new(""));
        // (--no-color, NO_COLOR, stdout is a tty) -> colour
        let cases = [
            (false, None, true, true),
            (false, None, false, false),
            (true, None, true, false),
            (false, set, true, false),
            (false, empty, true, true),
            (true, set, false, false),
            (false, empty, false, false),
        ];
        for (flag, env, tty, expected) in cases {
            assert_eq!(
                color_wanted(flag, env, tty),
                expected,
                "--no-color={flag} NO_COLOR={env:?} tty={tty}"
            );
        }
    }

    #[test]
    fn width_is_columns_or_80() {
        let cases = [
            (None, 80),
            (Some("120"), 120),
            (Some(" 100 "), 100),
            (Some("0"), 80),
            (Some("5"), 80),
            (Some("wide"), 80),
            (Some(""), 80),
        ];
        for (columns, expected) in cases {
            assert_eq!(table_width(columns), expected, "COLUMNS={columns:?}");
        }
    }

    fn node_table(color: bool) -> Table {
        let mut table = build_table(
            &[
                "MODULE", "VERSION", "DESIRED", "PHASE", "HEALTH", "RESTARTS", "REQ/S", "ERR%",
                "P99",
            ],
            color,
            80,
        );
        for i in 0..3 {
            table.add_row(vec![
                Cell::new(format!("payments-gateway-with-a-long-name-{i}")),
                Cell::new("1.22.333-rc.4+build.5678"),
                Cell::new("1.23.0-rc.1+build.9999"),
                status_cell("running"),
                status_cell("unhealthy"),
                Cell::new("12"),
                Cell::new("12345.6"),
                Cell::new("0.1"),
                Cell::new("1234ms"),
            ]);
        }
        table
    }

    #[test]
    fn tables_fit_80_columns() {
        let text = node_table(false).to_string();
        for line in text.lines() {
            assert!(
                line.trim_end().chars().count() <= 80,
                "{} columns: {line:?}",
                line.trim_end().chars().count()
            );
        }
        assert!(text.contains("payments"), "{text}");
    }

    #[test]
    fn status_colours_only_when_colour_is_on() {
        let plain = node_table(false).to_string();
        assert!(
            !plain.contains('\x1b'),
            "ANSI codes with colour off: {plain:?}"
        );
        // With colour on (stdout is a terminal), status words carry colour.
        assert!(node_table(true).to_string().contains('\x1b'));
        assert_eq!(status_color("healthy"), Some(Color::Green));
        assert_eq!(status_color("rolled_back"), Some(Color::Red));
        assert_eq!(status_color("awaiting_approval"), Some(Color::Yellow));
        assert_eq!(status_color("unknown"), None);
    }
}
