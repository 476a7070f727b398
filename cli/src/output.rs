//! Output: tables for people, JSON for scripts. With `-o json` stdout holds
//! exactly one JSON value (or JSON Lines for streams) and nothing else.

use std::io::Write;

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// A borderless table like `kubectl get`, sized to the terminal.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    if let Some((width, _)) = terminal_width() {
        table.set_width(width);
    }
    table
}

fn terminal_width() -> Option<(u16, u16)> {
    // Fit 80 columns when not on a terminal or when the width is unknown.
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .map(|w| (w, 0))
        .or(Some((80, 0)))
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
