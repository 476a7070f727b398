use super::*;
use proptest::prelude::*;

/// Unix ms of an RFC 3339 instant.
fn at(text: &str) -> u64 {
    ms_of(text.parse::<Timestamp>().expect("timestamp"))
}

fn text(ms: u64) -> String {
    hotswap_common::timefmt::rfc3339_from_ms(ms)
}

fn entry(text: &str) -> Entry {
    Entry::parse(text).expect(text)
}

/// (entry, instant, inside?)
fn check(cases: &[(&str, &str, bool)]) {
    for (e, t, inside) in cases {
        assert_eq!(entry(e).contains(at(t)), *inside, "{e} at {t}");
    }
}

#[test]
fn daily_ranges_on_weekdays() {
    // 2026-12-07 is a Monday.
    check(&[
        ("Mon-Thu 09:00-16:00 UTC", "2026-12-07T09:00:00Z", true),
        ("Mon-Thu 09:00-16:00 UTC", "2026-12-07T08:59:59Z", false),
        ("Mon-Thu 09:00-16:00 UTC", "2026-12-07T15:59:59Z", true),
        ("Mon-Thu 09:00-16:00 UTC", "2026-12-07T16:00:00Z", false),
        ("Mon-Thu 09:00-16:00 UTC", "2026-12-10T12:00:00Z", true),
        ("Mon-Thu 09:00-16:00 UTC", "2026-12-11T12:00:00Z", false),
        ("Mon,Wed 09:00-10:00 UTC", "2026-12-09T09:30:00Z", true),
        ("Mon,Wed 09:00-10:00 UTC", "2026-12-08T09:30:00Z", false),
        ("09:00-10:00 UTC", "2026-12-13T09:30:00Z", true),
        ("mon-fri 00:00-24:00 UTC", "2026-12-11T23:59:00Z", true),
        ("mon-fri 00:00-24:00 UTC", "2026-12-12T00:00:00Z", false),
        // Past midnight: Friday 22:00 to Saturday 02:00.
        ("Fri 22:00-02:00 UTC", "2026-12-12T01:59:00Z", true),
        ("Fri 22:00-02:00 UTC", "2026-12-12T02:00:00Z", false),
        ("Fri 22:00-02:00 UTC", "2026-12-11T21:59:00Z", false),
        // Sunday night runs into Monday over the week end.
        ("Sun 23:00-01:00 UTC", "2026-12-07T00:30:00Z", true),
        // Days across the week end.
        ("Sat-Mon 12:00-13:00 UTC", "2026-12-13T12:30:00Z", true),
        ("Sat-Mon 12:00-13:00 UTC", "2026-12-07T12:30:00Z", true),
        ("Sat-Mon 12:00-13:00 UTC", "2026-12-08T12:30:00Z", false),
    ]);
}

#[test]
fn spans_across_days_and_the_week_end_in_a_zone() {
    // Berlin is UTC+1 in December: Fri 16:00 local is 15:00Z.
    let freeze = "Fri 16:00 - Mon 08:00 Europe/Berlin";
    check(&[
        (freeze, "2026-12-11T14:59:00Z", false),
        (freeze, "2026-12-11T15:00:00Z", true),
        (freeze, "2026-12-13T12:00:00Z", true),
        (freeze, "2026-12-14T06:59:00Z", true),
        (freeze, "2026-12-14T07:00:00Z", false),
        (freeze, "2026-12-16T12:00:00Z", false),
        // The same in summer time (UTC+2).
        (freeze, "2026-07-10T13:59:00Z", false),
        (freeze, "2026-07-10T14:00:00Z", true),
        ("Fri 16:00-Mon 08:00 UTC", "2026-12-12T00:00:00Z", true),
        ("Wed 12:00 - Wed 11:00 UTC", "2026-12-09T11:30:00Z", false),
        ("Wed 12:00 - Wed 11:00 UTC", "2026-12-10T11:30:00Z", true),
    ]);
    let schedule = Schedule::parse(&[], &[freeze.to_string()]).expect("parse");
    let frozen = schedule
        .frozen_by(at("2026-12-12T10:00:00Z"))
        .expect("frozen");
    assert_eq!(frozen.entry, freeze);
    assert_eq!(
        frozen.until_ms.map(text).as_deref(),
        Some("2026-12-14T07:00:00Z")
    );
    assert_eq!(schedule.frozen_by(at("2026-12-10T10:00:00Z")), None);
    assert!(schedule.is_open(at("2026-12-12T10:00:00Z")), "no windows");
}

#[test]
fn next_open_and_the_closed_reason() {
    let schedule = Schedule::parse(&["Mon-Thu 09:00-16:00 UTC".to_string()], &[]).expect("parse");
    // Friday afternoon: next Monday 09:00.
    let friday = at("2026-12-04T17:00:00Z");
    assert_eq!(
        schedule.next_open(friday).map(text).as_deref(),
        Some("2026-12-07T09:00:00Z")
    );
    assert_eq!(
        schedule.closed_reason(friday).as_deref(),
        Some("outside deployment window Mon-Thu 09:00-16:00 UTC; next opens 2026-12-07T09:00:00Z")
    );
    let inside = at("2026-12-08T10:00:00Z");
    assert_eq!(schedule.next_open(inside), Some(inside));
    assert_eq!(schedule.closed_reason(inside), None);
    // Tuesday early: the same day.
    assert_eq!(
        schedule
            .next_open(at("2026-12-08T03:00:00Z"))
            .map(text)
            .as_deref(),
        Some("2026-12-08T09:00:00Z")
    );
    // Several windows: the earliest, and the reason names them all.
    let two = Schedule::parse(
        &[
            "Mon 09:00-10:00 UTC".to_string(),
            "Sat 06:00-07:00 America/New_York".to_string(),
        ],
        &[],
    )
    .expect("parse");
    assert_eq!(
        two.next_open(friday).map(text).as_deref(),
        Some("2026-12-05T11:00:00Z")
    );
    assert!(two.closed_reason(friday).expect("closed").starts_with(
        "outside deployment window Mon 09:00-10:00 UTC or Sat 06:00-07:00 America/New_York; "
    ));
}

#[test]
fn dst_transitions_follow_local_wall_time() {
    // Europe/Berlin springs forward on 2026-03-29 at 02:00 (to 03:00) and
    // falls back on 2026-10-25 at 03:00 (to 02:00).
    let e = entry("Sun 02:30-04:00 Europe/Berlin");
    // 02:30 does not exist on 2026-03-29: the window opens at 03:00 local
    // (01:00Z), when the clock jumps into it.
    assert_eq!(
        e.next_change(at("2026-03-28T12:00:00Z"), true)
            .map(text)
            .as_deref(),
        Some("2026-03-29T01:00:00Z")
    );
    assert!(e.contains(at("2026-03-29T01:00:00Z")));
    assert!(!e.contains(at("2026-03-29T00:59:00Z")));
    // On 2026-10-25 02:30 happens twice: the window opens at the first
    // (00:30Z, still UTC+2) and holds through 04:00 UTC+1 (03:00Z).
    assert_eq!(
        e.next_change(at("2026-10-24T12:00:00Z"), true)
            .map(text)
            .as_deref(),
        Some("2026-10-25T00:30:00Z")
    );
    assert!(
        e.contains(at("2026-10-25T01:45:00Z")),
        "02:45 local, the second time"
    );
    assert!(
        !e.contains(at("2026-10-25T01:15:00Z")),
        "02:15 local, the second time"
    );
    assert!(e.contains(at("2026-10-25T02:59:00Z")));
    assert!(!e.contains(at("2026-10-25T03:00:00Z")));
    // Nine-to-five keeps its local hours across the change: 08:00Z in
    // winter, 07:00Z in summer.
    let office =
        Schedule::parse(&["Mon-Fri 09:00-17:00 Europe/Berlin".to_string()], &[]).expect("parse");
    assert_eq!(
        office
            .next_open(at("2026-03-28T12:00:00Z"))
            .map(text)
            .as_deref(),
        Some("2026-03-30T07:00:00Z")
    );
    assert_eq!(
        office
            .next_open(at("2026-10-24T12:00:00Z"))
            .map(text)
            .as_deref(),
        Some("2026-10-26T08:00:00Z")
    );
    // A freeze ending in the skipped hour ends when the clock jumps.
    let f = entry("Sat 12:00 - Sun 02:30 Europe/Berlin");
    assert_eq!(
        f.next_change(at("2026-03-28T13:00:00Z"), false)
            .map(text)
            .as_deref(),
        Some("2026-03-29T01:00:00Z")
    );
}

#[test]
fn bad_entries_are_named_with_the_reason() {
    for (bad, says) in [
        ("", "expected DAYS"),
        ("Mon-Thu 09:00-16:00", "unknown time zone \"09:00-16:00\""),
        (
            "Mon-Thu 09:00-16:00 Mars/Olympus",
            "unknown time zone \"Mars/Olympus\"",
        ),
        ("Mon-Thx 09:00-16:00 UTC", "\"Thx\" is not a weekday"),
        ("Mo 09:00-16:00 UTC", "\"Mo\" is not a weekday"),
        ("Mon 25:00-16:00 UTC", "\"25:00\" is out of range"),
        ("Mon 09:60-16:00 UTC", "\"09:60\" is out of range"),
        ("Mon 24:00-16:00 UTC", "\"24:00\" is out of range"),
        ("Mon 9-16 UTC", "\"9\" is not a time of day"),
        ("Mon 0900-1600 UTC", "\"0900\" is not a time of day"),
        ("Mon 09:00-09:00 UTC", "starts where it ends"),
        ("Fri 16:00 - Fri 16:00 UTC", "starts where it ends"),
        ("Fri 16:00 Mon 08:00 UTC", "expected DAYS"),
        ("Fri 16:00 Mon-08:00 UTC", "span across days"),
        ("a b c d UTC", "expected DAYS"),
    ] {
        let err = Entry::parse(bad).expect_err(bad);
        assert_eq!(err.entry, bad.trim());
        assert!(err.to_string().contains(says), "{bad}: {err}");
        assert!(
            err.to_string().starts_with(&format!("{:?}", bad.trim())),
            "{err}"
        );
    }
    let problems = Schedule::parse(
        &["Mon 09:00-10:00 UTC".into(), "Mon 09:00 UTC".into()],
        &["Fri 16:00 - Mon 08:00 Nowhere".into()],
    )
    .expect_err("two problems");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].starts_with("windows[1] \"Mon 09:00 UTC\""),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("freeze[0] \"Fri 16:00 - Mon 08:00 Nowhere\""),
        "{problems:?}"
    );
}

#[test]
fn the_bundled_time_zone_database_answers() {
    // Where the host has no zoneinfo (a slim container), jiff falls back to
    // the copy built into the binary (feature tzdb-bundle-always): it must
    // be there and know the zones. (`TZDIR=/nonexistent cargo test
    // schedule` runs this whole module on it.)
    let bundled = jiff::tz::TimeZoneDatabase::bundled();
    assert!(bundled.get("Europe/Berlin").is_ok());
    assert!(bundled.get("America/Sao_Paulo").is_ok());
    assert!(jiff::tz::db().get("Europe/Berlin").is_ok());
}

fn zones() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "America/Santiago",
    ])
}

fn entries() -> impl Strategy<Value = String> {
    let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    (
        0usize..7,
        0usize..7,
        0u32..24,
        0u32..4,
        0u32..24,
        0u32..4,
        any::<bool>(),
        zones(),
    )
        .prop_filter_map("empty", move |(d1, d2, h1, q1, h2, q2, span, zone)| {
            let (t1, t2) = (
                format!("{h1:02}:{:02}", q1 * 15),
                format!("{h2:02}:{:02}", q2 * 15),
            );
            if span {
                ((d1, &t1) != (d2, &t2))
                    .then(|| format!("{} {t1} - {} {t2} {zone}", days[d1], days[d2]))
            } else {
                (t1 != t2).then(|| format!("{}-{} {t1}-{t2} {zone}", days[d1], days[d2]))
            }
        })
}

// 2020-01-01 to 2035-01-01.
const FROM: u64 = 1_577_836_800_000;
const TO: u64 = 2_051_222_400_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// `next_open` is the first open instant: open itself, and nothing
    /// before it (checked at every minute boundary between) is open.
    #[test]
    fn next_open_is_the_first_open_instant(text in entries(), now in FROM..TO) {
        let schedule = Schedule::parse(std::slice::from_ref(&text), &[]).expect("generated entries parse");
        let next = schedule.next_open(now).expect("a weekly window opens within two weeks");
        prop_assert!(next >= now);
        prop_assert!(schedule.is_open(next), "{text}: {} is not open", hotswap_common::timefmt::rfc3339_from_ms(next));
        let mut t = now;
        while t < next {
            prop_assert!(!schedule.is_open(t), "{text}: open at {} before {}", t, next);
            t = (t / 60_000 + 1) * 60_000;
        }
    }

    /// A freeze's end is the first instant outside it.
    #[test]
    fn a_freeze_ends_at_its_first_instant_outside(text in entries(), now in FROM..TO) {
        let schedule = Schedule::parse(&[], std::slice::from_ref(&text)).expect("parse");
        match schedule.frozen_by(now) {
            None => prop_assert!(!entry(&text).contains(now)),
            Some(frozen) => {
                let until = frozen.until_ms.expect("a weekly freeze ends within two weeks");
                prop_assert!(until > now);
                prop_assert!(schedule.frozen_by(until).is_none());
                prop_assert!(schedule.frozen_by(until - 1).is_some());
            }
        }
    }

    /// In UTC, membership repeats every week, and a span and its
    /// complement ("A - B" and "B - A") split the week.
    #[test]
    fn utc_spans_are_weekly_and_complements_partition(
        d1 in 0usize..7, d2 in 0usize..7, m1 in 0u32..1440, m2 in 0u32..1440, now in FROM..TO,
    ) {
        prop_assume!((d1, m1) != (d2, m2));
        let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        let t = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        let a = entry(&format!("{} {} - {} {} UTC", days[d1], t(m1), days[d2], t(m2)));
        let b = entry(&format!("{} {} - {} {} UTC", days[d2], t(m2), days[d1], t(m1)));
        prop_assert_ne!(a.contains(now), b.contains(now));
        prop_assert_eq!(a.contains(now), a.contains(now + 7 * 86_400_000));
    }
}
