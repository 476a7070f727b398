//! Deployment windows and config freezes (SPEC §9): weekly ranges of local
//! wall time in an IANA time zone, parsed once from the config and asked
//! about instants. Pure: no clock is read here; times are Unix
//! milliseconds of the wall clock the caller read.
//!
//! An entry is either a range on some days, `Mon-Thu 09:00-16:00 UTC`
//! (days `Mon`, `Mon-Thu`, `Fri-Mon` across the week end, `Mon,Wed,Fri`, or
//! none for every day; an end at or before the start runs past midnight),
//! or one span across days, `Fri 16:00 - Mon 08:00 Europe/Berlin` (wrapping
//! over the week end when the end day comes first). Membership is by local
//! wall time, so DST changes nothing about which hours are inside; an
//! instant in a skipped hour does not exist, and a repeated hour counts
//! both times. Starts are inclusive, ends exclusive, to the minute.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

const DAY_MIN: u32 = 24 * 60;
const WEEK_MIN: u32 = 7 * DAY_MIN;
/// How far ahead `next_open` and `closes_at` look: two weeks cover any
/// weekly entry, also one whose only week-time falls in a skipped hour once.
const HORIZON_DAYS: i64 = 16;

/// One entry of `windows` or `freeze`, as written and as understood.
#[derive(Clone, Debug)]
pub struct Entry {
    text: String,
    zone: TimeZone,
    /// Week-minute spans (Monday 00:00 is 0), `start != end`; a span with
    /// `end < start` wraps over the week end.
    spans: Vec<(u32, u32)>,
}

/// Why an entry does not parse; the message names the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?}: {reason}")]
pub struct ScheduleError {
    pub entry: String,
    pub reason: String,
}

fn day_of(text: &str) -> Option<u32> {
    let lower = text.to_ascii_lowercase();
    let days = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    days.iter()
        .position(|d| lower.len() >= 3 && d.starts_with(&lower))
        .map(|i| i as u32)
}

fn parse_day(text: &str) -> Result<u32, String> {
    day_of(text).ok_or_else(|| format!("{text:?} is not a weekday (Mon, Tue, ... Sun)"))
}

/// `Mon`, `Mon-Thu`, `Fri-Mon`, `Mon,Wed-Fri`: the days, Monday = 0.
fn parse_days(text: &str) -> Result<Vec<u32>, String> {
    let mut days = Vec::new();
    for item in text.split(',') {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (parse_day(from)?, parse_day(to)?);
                let mut day = from;
                loop {
                    days.push(day);
                    if day == to {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => days.push(parse_day(item)?),
        }
    }
    days.sort_unstable();
    days.dedup();
    Ok(days)
}

/// `HH:MM` as minutes of the day; `24:00` only where `end` allows it.
fn parse_time(text: &str, end: bool) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time of day HH:MM");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && (m != 0 || !end)) {
        return Err(format!(
            "{text:?} is out of range (00:00 to 23:59, or 24:00 as an end)"
        ));
    }
    Ok(h * 60 + m)
}

impl Entry {
    /// Parse one entry; the error names it and says what is wrong.
    pub fn parse(text: &str) -> Result<Entry, ScheduleError> {
        let entry = text.trim().to_string();
        let fail = |reason: String| ScheduleError {
            entry: entry.clone(),
            reason,
        };
        let (body, zone_name) = entry.rsplit_once(char::is_whitespace).ok_or_else(|| {
            fail(
                "expected DAYS HH:MM-HH:MM ZONE or DAY HH:MM - DAY HH:MM ZONE (e.g. \"Mon-Thu 09:00-16:00 UTC\")"
                    .into(),
            )
        })?;
        let zone = TimeZone::get(zone_name).map_err(|_| {
            fail(format!(
                "unknown time zone {zone_name:?} (use an IANA name such as UTC or Europe/Berlin)"
            ))
        })?;
        // "Fri 16:00 - Mon 08:00" and "Fri 16:00-Mon 08:00" alike.
        let mut normal = String::new();
        for part in body.split('-') {
            if !normal.is_empty() {
                normal.push('-');
            }
            normal.push_str(part.trim());
        }
        let tokens: Vec<&str> = normal.split_whitespace().collect();
        let spans = match tokens.as_slice() {
            [from_day, middle, to_time] => {
                let (from_time, to_day) = middle.split_once('-').ok_or_else(|| {
                    fail("expected DAY HH:MM - DAY HH:MM for a span across days".into())
                })?;
                let start = parse_day(from_day).map_err(&fail)? * DAY_MIN
                    + parse_time(from_time, false).map_err(&fail)?;
                let end = (parse_day(to_day).map_err(&fail)? * DAY_MIN
                    + parse_time(to_time, true).map_err(&fail)?)
                    % WEEK_MIN;
                if start == end {
                    return Err(fail("the span starts where it ends".into()));
                }
                vec![(start, end)]
            }
            [days, times] => daily(&parse_days(days).map_err(&fail)?, times).map_err(&fail)?,
            [times] => daily(&[0, 1, 2, 3, 4, 5, 6], times).map_err(&fail)?,
            _ => {
                return Err(fail(
                    "expected DAYS HH:MM-HH:MM ZONE or DAY HH:MM - DAY HH:MM ZONE".into(),
                ));
            }
        };
        Ok(Entry {
            text: entry,
            zone,
            spans,
        })
    }

    /// The entry as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the local wall time at `ms` is inside the entry.
    pub fn contains(&self, ms: u64) -> bool {
        let minute = self.week_minute(timestamp(ms));
        self.spans.iter().any(|&(start, end)| {
            if start < end {
                start <= minute && minute < end
            } else {
                minute >= start || minute < end
            }
        })
    }

    fn week_minute(&self, at: Timestamp) -> u32 {
        let local = self.zone.to_datetime(at);
        local.weekday().to_monday_zero_offset() as u32 * DAY_MIN
            + local.hour() as u32 * 60
            + local.minute() as u32
    }

    /// The first instant at or after `ms` whose membership is `inside`,
    /// within the horizon. Membership changes only where a span starts or
    /// ends in local time, or where the zone's offset changes (a skipped
    /// hour may jump into or out of a span), so those are the candidates.
    fn next_change(&self, ms: u64, inside: bool) -> Option<u64> {
        if self.contains(ms) == inside {
            return Some(ms);
        }
        let at = timestamp(ms);
        let today: Date = self.zone.to_datetime(at).date();
        let mut candidates: Vec<Timestamp> = Vec::new();
        for &(start, end) in &self.spans {
            let boundary = if inside { start } else { end };
            let (day, minute) = (boundary / DAY_MIN, boundary % DAY_MIN);
            for k in 0..=HORIZON_DAYS {
                let Ok(date) = today.checked_add(jiff::Span::new().days(k)) else {
                    continue;
                };
                if date.weekday().to_monday_zero_offset() as u32 != day {
                    continue;
                }
                let local = date.at((minute / 60) as i8, (minute % 60) as i8, 0, 0);
                if let Ok(t) = self.zone.to_ambiguous_timestamp(local).compatible() {
                    candidates.push(t);
                }
            }
        }
        let horizon = at
            .checked_add(jiff::SignedDuration::from_hours(24 * HORIZON_DAYS))
            .unwrap_or(Timestamp::MAX);
        candidates.extend(
            self.zone
                .following(at)
                .map(|t| t.timestamp())
                .take_while(|t| *t <= horizon),
        );
        candidates
            .into_iter()
            .filter(|t| *t >= at)
            .map(ms_of)
            .filter(|&t| self.contains(t) == inside)
            .min()
    }
}

fn daily(days: &[u32], times: &str) -> Result<Vec<(u32, u32)>, String> {
    let (from, to) = times
        .split_once('-')
        .ok_or_else(|| format!("{times:?} is not a range of times HH:MM-HH:MM"))?;
    let (from, to) = (parse_time(from, false)?, parse_time(to, true)?);
    if from == to {
        return Err(format!("{times:?} is empty: it starts where it ends"));
    }
    // An end at or before the start runs past midnight into the next day.
    let length = if to > from {
        to - from
    } else {
        DAY_MIN - from + to
    };
    Ok(days
        .iter()
        .map(|day| {
            let start = day * DAY_MIN + from;
            (start, (start + length) % WEEK_MIN)
        })
        .collect())
}

fn timestamp(ms: u64) -> Timestamp {
    Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or(Timestamp::MAX)
}

fn ms_of(t: Timestamp) -> u64 {
    u64::try_from(t.as_millisecond()).unwrap_or(0)
}

/// An environment's windows and config freezes.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    pub windows: Vec<Entry>,
    pub freezes: Vec<Entry>,
}

/// A config freeze covering an instant, and when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frozen {
    pub entry: String,
    pub until_ms: Option<u64>,
}

impl Schedule {
    /// Parse an environment's `windows` and `freeze` lists; every bad entry
    /// is reported, each with its list and index.
    pub fn parse(windows: &[String], freezes: &[String]) -> Result<Schedule, Vec<String>> {
        let mut problems = Vec::new();
        let mut parse_all = |list: &str, texts: &[String]| -> Vec<Entry> {
            texts
                .iter()
                .enumerate()
                .filter_map(|(i, text)| match Entry::parse(text) {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        problems.push(format!("{list}[{i}] {e}"));
                        None
                    }
                })
                .collect()
        };
        let windows = parse_all("windows", windows);
        let freezes = parse_all("freeze", freezes);
        if problems.is_empty() {
            Ok(Schedule { windows, freezes })
        } else {
            Err(problems)
        }
    }

    /// Whether waves may begin at `ms`: no windows means always.
    pub fn is_open(&self, ms: u64) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.contains(ms))
    }

    /// The first instant at or after `ms` inside a window (`ms` itself when
    /// open); `None` when no window opens within two weeks.
    pub fn next_open(&self, ms: u64) -> Option<u64> {
        if self.is_open(ms) {
            return Some(ms);
        }
        self.windows
            .iter()
            .filter_map(|w| w.next_change(ms, true))
            .min()
    }

    /// The config freeze covering `ms`, if any, with when it ends.
    pub fn frozen_by(&self, ms: u64) -> Option<Frozen> {
        self.freezes
            .iter()
            .find(|f| f.contains(ms))
            .map(|f| Frozen {
                entry: f.text.clone(),
                until_ms: f.next_change(ms, false),
            })
    }

    /// Why waves may not begin at `ms`, or `None` when they may: "outside
    /// deployment window Mon-Thu 09:00-16:00 UTC; next opens
    /// 2026-12-07T09:00:00Z".
    pub fn closed_reason(&self, ms: u64) -> Option<String> {
        if self.is_open(ms) {
            return None;
        }
        let names: Vec<&str> = self.windows.iter().map(Entry::text).collect();
        let next = match self.next_open(ms) {
            Some(at) => format!(
                "next opens {}",
                hotswap_common::timefmt::rfc3339_from_ms(at)
            ),
            None => "no window opens in the next two weeks".to_string(),
        };
        Some(format!(
            "outside deployment window {}; {next}",
            names.join(" or ")
        ))
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
