//! Freezes (SPEC §9): whether an environment is frozen at an instant, by a
//! config freeze of its schedule or an ad hoc freeze record, and the
//! refusal that names the freeze, who made it and why. Pure: the caller
//! hands the records and the wall-clock time.

use hotswap_common::timefmt::rfc3339_from_ms;

use crate::schedule::Schedule;
use crate::store::FreezeRecord;

/// What freezes an environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrozenBy {
    /// An entry of the environment's `freeze` list in the config file.
    Config {
        entry: String,
        until_ms: Option<u64>,
    },
    /// `freeze create`.
    AdHoc(FreezeRecord),
}

/// Why nothing new may start in an environment now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(environment, by))]
pub struct Frozen {
    pub environment: String,
    pub by: FrozenBy,
}

fn describe(environment: &str, by: &FrozenBy) -> String {
    let what = match by {
        FrozenBy::AdHoc(f) => format!(
            "environment {environment} is frozen until {} by freeze {} (created by {}: {})",
            rfc3339_from_ms(f.until_ms),
            f.id,
            f.created_by,
            f.reason
        ),
        FrozenBy::Config { entry, until_ms } => format!(
            "environment {environment} is frozen by the config freeze {entry:?}{} (created by the control plane's config file)",
            until_ms
                .map(|u| format!(" until {}", rfc3339_from_ms(u)))
                .unwrap_or_default()
        ),
    };
    format!("{what}; an admin can pass --override-freeze")
}

impl Frozen {
    /// Which freeze, for the audit record of an override: "freeze fz-1 by
    /// alice: release party" or "config freeze \"Fri 16:00 - Mon 08:00 UTC\"".
    pub fn by_whom(&self) -> String {
        match &self.by {
            FrozenBy::AdHoc(f) => format!("freeze {} by {}: {}", f.id, f.created_by, f.reason),
            FrozenBy::Config { entry, .. } => format!("config freeze {entry:?}"),
        }
    }
}

/// Whether a freeze record covers `now_ms`: from its start, up to (not
/// including) its end.
pub fn in_force(record: &FreezeRecord, now_ms: u64) -> bool {
    record.from_ms <= now_ms && now_ms < record.until_ms
}

/// The freeze of `environment` at `now_ms`: the ad hoc one that lasts
/// longest first (the one to tell an operator about), then a config one.
pub fn frozen(
    environment: &str,
    schedule: Option<&Schedule>,
    records: &[FreezeRecord],
    now_ms: u64,
) -> Option<Frozen> {
    let ad_hoc = records
        .iter()
        .filter(|f| f.environment == environment && in_force(f, now_ms))
        .max_by_key(|f| (f.until_ms, f.id.clone()))
        .cloned()
        .map(FrozenBy::AdHoc);
    let config = || {
        schedule
            .and_then(|s| s.frozen_by(now_ms))
            .map(|f| FrozenBy::Config {
                entry: f.entry,
                until_ms: f.until_ms,
            })
    };
    ad_hoc.or_else(config).map(|by| Frozen {
        environment: environment.to_string(),
        by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, env: &str, from: u64, until: u64) -> FreezeRecord {
        FreezeRecord {
            id: id.into(),
            environment: env.into(),
            from_ms: from,
            until_ms: until,
            reason: "release party".into(),
            created_by: "alice".into(),
        }
    }

    #[test]
    fn ad_hoc_freezes_cover_their_environment_from_start_to_end() {
        let records = [record("fz-1", "qa", 1000, 2000)];
        assert_eq!(frozen("qa", None, &records, 999), None);
        assert_eq!(frozen("qa", None, &records, 2000), None);
        assert_eq!(frozen("dev", None, &records, 1500), None);
        let found = frozen("qa", None, &records, 1000).expect("frozen");
        assert_eq!(
            found.to_string(),
            "environment qa is frozen until 1970-01-01T00:00:02Z by freeze fz-1 (created by alice: release party); an admin can pass --override-freeze"
        );
    }

    #[test]
    fn the_longest_ad_hoc_freeze_is_named_before_a_config_one() {
        let records = [record("fz-1", "qa", 0, 5000), record("fz-2", "qa", 0, 9000)];
        // 1970-01-01 was a Thursday.
        let schedule = Schedule::parse(&[], &["Thu 00:00-01:00 UTC".into()]).expect("schedule");
        let found = frozen("qa", Some(&schedule), &records, 10).expect("frozen");
        assert!(
            matches!(&found.by, FrozenBy::AdHoc(f) if f.id == "fz-2"),
            "{found:?}"
        );
        let found = frozen("qa", Some(&schedule), &[], 10).expect("config freeze");
        assert_eq!(
            found.to_string(),
            "environment qa is frozen by the config freeze \"Thu 00:00-01:00 UTC\" until 1970-01-01T01:00:00Z (created by the control plane's config file); an admin can pass --override-freeze"
        );
        assert_eq!(frozen("qa", Some(&schedule), &[], 3_600_000), None);
    }
}
