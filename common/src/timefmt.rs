//! Time helpers: wall-clock milliseconds for storage, RFC 3339 for humans and
//! JSON, protobuf `Timestamp` for the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wire timestamp for a millisecond time.
pub fn ts_from_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Millisecond time of a wire timestamp; negative times clamp to zero.
pub fn ms_from_ts(ts: &prost_types::Timestamp) -> u64 {
    let seconds = ts.seconds.max(0) as u64;
    let millis = (ts.nanos.max(0) as u64) / 1_000_000;
    seconds.saturating_mul(1000).saturating_add(millis)
}

/// RFC 3339 text of a millisecond time, in UTC. A time past the year 9999
/// has no RFC 3339 form: it is said as it is (`out of range: N ms since
/// 1970`), never shown as some other date.
pub fn rfc3339_from_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("out of range: {ms} ms since 1970"))
}

/// Milliseconds since 1970 of an RFC 3339 time (`2026-12-03T07:00:00Z`,
/// any offset); before 1970 is refused.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let time = OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|e| {
        format!("invalid time {text:?}: {e} (give RFC 3339, e.g. 2026-12-03T07:00:00Z)")
    })?;
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("invalid time {text:?}: before 1970"))
}

/// Parse a human duration such as `30s`, `5m`, `1h 30m` or `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 500ms, 30s, 5m, 1h)"))
}

/// Short human text of a duration, e.g. `3m 2s`, for tables.
pub fn human_age(ms_ago: u64) -> String {
    let secs = ms_ago / 1000;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc_millis() {
        assert_eq!(rfc3339_from_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_from_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            rfc3339_from_ms(u64::MAX),
            "out of range: 18446744073709551615 ms since 1970"
        );
        assert_eq!(
            rfc3339_from_ms(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn rfc3339_parses_and_fails_clearly() {
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123Z"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.123+01:00"),
            Ok(1_700_000_000_123)
        );
        let err = parse_rfc3339("yesterday").expect_err("bad");
        assert!(err.starts_with("invalid time \"yesterday\""), "{err}");
        assert!(parse_rfc3339("1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn timestamp_round_trip() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123] {
            assert_eq!(ms_from_ts(&ts_from_ms(ms)), ms);
        }
    }

    #[test]
    fn durations_parse_and_fail_clearly() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        let err = parse_duration("ten seconds").expect_err("bad");
        assert!(err.contains("invalid duration \"ten seconds\""), "{err}");
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(human_age(5_000), "5s");
        assert_eq!(human_age(125_000), "2m5s");
        assert_eq!(human_age(7_260_000), "2h1m");
        assert_eq!(human_age(90_000_000), "1d1h");
    }
}

/// Serde helpers for durations written as human text (`"30s"`) in config files.
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// [`duration_text`] for optional durations: absent or null is `None`.
pub mod optional_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::duration_text::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            Some(text) => super::parse_duration(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}
