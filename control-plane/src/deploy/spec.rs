//! What a deployment asks for ([`CreateRequest`]) and the validated
//! [`Spec`] built from it and the configuration. Pure: no I/O.
//!
//! Errors name the option by its domain [`Field`]; the API edge words them
//! with the flag a user typed (the error module's `flag_name`), so this module
//! knows no command-line spelling.

use std::fmt;
use std::time::Duration;

use hotswap_common::labels::Labels;
use hotswap_common::timefmt::human_age;

use super::machine::{BatchSize, Spec, Strategy, Thresholds};
use crate::config::Settings;

/// What `deploy create` asks for, already parsed.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub module: String,
    pub version: String,
    pub environment: String,
    pub selector: Labels,
    pub strategy: Option<String>,
    pub batch_size: Option<String>,
    pub max_failures: Option<u32>,
    pub steps: Vec<u32>,
    pub step_duration: Option<Duration>,
    pub manual_promote: bool,
    pub bake_time: Option<Duration>,
    pub min_healthy_time: Option<Duration>,
    pub health_deadline: Option<Duration>,
    pub progress_deadline: Option<Duration>,
    pub max_error_rate: Option<f64>,
    pub max_latency_increase: Option<f64>,
    pub no_auto_rollback: bool,
    pub pause_timeout: Option<Duration>,
    pub analysis_min_requests: Option<u64>,
    pub analysis_warmup: Option<Duration>,
    pub dry_run: bool,
    /// Deploy even when the version is older than the environment's current one.
    pub allow_downgrade: bool,
    /// Start even when the environment is frozen (SPEC §9); the API edge
    /// lets only admins ask.
    pub override_freeze: bool,
}

/// Longest a deployment's duration option may be (steps, bake, deadlines):
/// beyond a year a value is a typo or an overflow, and a deadline that far
/// out never makes the deployment terminal.
pub const MAX_OPTION_DURATION: Duration = Duration::from_secs(366 * 86_400);
/// Highest p99 latency multiple a canary may be allowed: beyond it the
/// latency check could never trip, like NaN.
pub const MAX_LATENCY_INCREASE: f64 = 1000.0;
/// Longest analysis warm-up: a step's whole hold left out of its analysis
/// would judge nothing.
const MAX_ANALYSIS_WARMUP: Duration = Duration::from_secs(86_400);
/// Most requests an analysis may wait for before judging.
const MAX_ANALYSIS_MIN_REQUESTS: u64 = 1_000_000_000;
/// Shortest pause timeout: below a second a pause would end before anyone
/// could look.
const MIN_PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A deployment or pipeline option, by what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    BatchSize,
    Steps,
    StepDuration,
    ManualPromote,
    AnalysisMinRequests,
    AnalysisWarmup,
    PauseTimeout,
    BakeTime,
    MaxErrorRate,
    MaxLatencyIncrease,
    MinHealthyTime,
    HealthDeadline,
    ProgressDeadline,
    AllowDowngrade,
    /// The last environment a pipeline promotes to.
    PipelineEnd,
}

impl Field {
    /// The option's domain name, as the spec spells it.
    pub fn name(self) -> &'static str {
        match self {
            Field::BatchSize => "batch_size",
            Field::Steps => "steps",
            Field::StepDuration => "step_duration",
            Field::ManualPromote => "manual_promote",
            Field::AnalysisMinRequests => "analysis_min_requests",
            Field::AnalysisWarmup => "analysis_warmup",
            Field::PauseTimeout => "pause_timeout",
            Field::BakeTime => "bake_time",
            Field::MaxErrorRate => "max_error_rate",
            Field::MaxLatencyIncrease => "max_latency_increase",
            Field::MinHealthyTime => "min_healthy_time",
            Field::HealthDeadline => "health_deadline",
            Field::ProgressDeadline => "progress_deadline",
            Field::AllowDowngrade => "allow_downgrade",
            Field::PipelineEnd => "to",
        }
    }
}

/// Why the options do not make a spec.
#[derive(Clone, Debug, PartialEq)]
pub enum SpecError {
    UnknownEnvironment {
        environment: String,
        configured: Vec<String>,
    },
    UnknownStrategy {
        name: String,
    },
    BadBatchSize {
        text: String,
    },
    BadSteps {
        steps: Vec<u32>,
    },
    /// Options given that only `strategy` reads.
    OnlyFor {
        fields: &'static [Field],
        strategy: &'static str,
    },
    PauseTimeoutOutOfRange {
        value: Duration,
    },
    AnalysisWarmupTooLong,
    AnalysisMinRequestsTooHigh,
    MaxErrorRateOutOfRange {
        value: f64,
    },
    MaxLatencyIncreaseOutOfRange {
        value: f64,
    },
    TooLong {
        field: Field,
        value: Duration,
    },
}

impl SpecError {
    /// The message, each option called by `name` (domain names in
    /// `Display`, flags at the API edge).
    pub fn message(&self, name: impl Fn(Field) -> &'static str) -> String {
        match self {
            SpecError::UnknownEnvironment {
                environment,
                configured,
            } => format!(
                "unknown environment {environment:?}; configured: {}",
                configured.join(", ")
            ),
            SpecError::UnknownStrategy { name } => {
                format!("unknown strategy {name:?}: use direct, rolling, blue-green or canary")
            }
            SpecError::BadBatchSize { text } => {
                format!("batch size {text:?} is not N or N% (e.g. 2 or 25%)")
            }
            SpecError::BadSteps { steps } => {
                format!("canary steps {steps:?} must be increasing percentages in 1..=100")
            }
            SpecError::OnlyFor { fields, strategy } => {
                let names: Vec<&str> = fields.iter().map(|f| name(*f)).collect();
                let (list, verb) = match names.split_last() {
                    Some((last, [])) => (last.to_string(), "applies"),
                    Some((last, rest)) => (format!("{} and {last}", rest.join(", ")), "apply"),
                    None => (String::new(), "apply"),
                };
                format!("{list} {verb} to the {strategy} strategy only")
            }
            SpecError::PauseTimeoutOutOfRange { value } => format!(
                "{} {} must be between 1s and 366d",
                name(Field::PauseTimeout),
                human_age(millis(*value))
            ),
            SpecError::AnalysisWarmupTooLong => {
                format!("{} must be at most 24h", name(Field::AnalysisWarmup))
            }
            SpecError::AnalysisMinRequestsTooHigh => format!(
                "{} must be at most {MAX_ANALYSIS_MIN_REQUESTS}",
                name(Field::AnalysisMinRequests)
            ),
            SpecError::MaxErrorRateOutOfRange { value } => format!(
                "{} {value} is not between 0 and 1",
                name(Field::MaxErrorRate)
            ),
            SpecError::MaxLatencyIncreaseOutOfRange { value } => format!(
                "{} {value} must be between 1 and {MAX_LATENCY_INCREASE} (a multiple of the baseline)",
                name(Field::MaxLatencyIncrease)
            ),
            SpecError::TooLong { field, value } => format!(
                "{} {} is longer than 366d",
                name(*field),
                human_age(millis(*value))
            ),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(Field::name))
    }
}

impl std::error::Error for SpecError {}

fn millis(value: Duration) -> u64 {
    u64::try_from(value.as_millis()).unwrap_or(u64::MAX)
}

/// `N` nodes or `N%` of them.
pub fn parse_batch(text: &str) -> Result<BatchSize, SpecError> {
    let bad = || SpecError::BadBatchSize {
        text: text.to_string(),
    };
    match text.strip_suffix('%') {
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .map(BatchSize::Percent)
            .ok_or_else(bad),
        None => text
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .map(BatchSize::Count)
            .ok_or_else(bad),
    }
}

/// The spec of the deployment `request` asks for, by `user`: every option
/// in its range, the rest from `settings`.
pub fn build(request: &CreateRequest, settings: &Settings, user: &str) -> Result<Spec, SpecError> {
    let env = settings
        .environments
        .get(&request.environment)
        .ok_or_else(|| SpecError::UnknownEnvironment {
            environment: request.environment.clone(),
            configured: settings.environments.keys().cloned().collect(),
        })?;
    let d = &settings.deploy;
    let strategy_name = request.strategy.as_deref().unwrap_or(&env.strategy);
    let ms = |v: Option<Duration>, default: Duration| v.unwrap_or(default).as_millis() as u64;
    let strategy = match strategy_name {
        "direct" => Strategy::Direct,
        "rolling" => Strategy::Rolling {
            batch: parse_batch(request.batch_size.as_deref().unwrap_or(&d.batch_size))?,
            min_healthy_ms: ms(request.min_healthy_time, d.min_healthy_time),
        },
        "blue-green" => Strategy::BlueGreen {
            bake_ms: ms(request.bake_time, d.bake_time),
        },
        "canary" => {
            let steps = if request.steps.is_empty() {
                d.steps.clone()
            } else {
                request.steps.clone()
            };
            if steps.iter().any(|s| *s == 0 || *s > 100) || steps.windows(2).any(|w| w[0] >= w[1]) {
                return Err(SpecError::BadSteps { steps });
            }
            Strategy::Canary {
                steps,
                step_ms: ms(request.step_duration, d.step_duration),
                manual_promote: request.manual_promote,
            }
        }
        other => {
            return Err(SpecError::UnknownStrategy {
                name: other.to_string(),
            });
        }
    };
    let rolling = matches!(strategy, Strategy::Rolling { .. });
    let canary = matches!(strategy, Strategy::Canary { .. });
    let blue_green = matches!(strategy, Strategy::BlueGreen { .. });
    if request.batch_size.is_some() && !rolling {
        return Err(SpecError::OnlyFor {
            fields: &[Field::BatchSize],
            strategy: "rolling",
        });
    }
    if (!request.steps.is_empty() || request.manual_promote || request.step_duration.is_some())
        && !canary
    {
        return Err(SpecError::OnlyFor {
            fields: &[Field::Steps, Field::StepDuration, Field::ManualPromote],
            strategy: "canary",
        });
    }
    if (request.analysis_min_requests.is_some() || request.analysis_warmup.is_some()) && !canary {
        return Err(SpecError::OnlyFor {
            fields: &[Field::AnalysisMinRequests, Field::AnalysisWarmup],
            strategy: "canary",
        });
    }
    if let Some(pause) = request.pause_timeout
        && !(MIN_PAUSE_TIMEOUT..=MAX_OPTION_DURATION).contains(&pause)
    {
        return Err(SpecError::PauseTimeoutOutOfRange { value: pause });
    }
    if request
        .analysis_warmup
        .is_some_and(|w| w > MAX_ANALYSIS_WARMUP)
    {
        return Err(SpecError::AnalysisWarmupTooLong);
    }
    if request
        .analysis_min_requests
        .is_some_and(|n| n > MAX_ANALYSIS_MIN_REQUESTS)
    {
        return Err(SpecError::AnalysisMinRequestsTooHigh);
    }
    if request.bake_time.is_some() && !blue_green {
        return Err(SpecError::OnlyFor {
            fields: &[Field::BakeTime],
            strategy: "blue-green",
        });
    }
    let max_error_rate = request.max_error_rate.unwrap_or(d.max_error_rate);
    if !(0.0..=1.0).contains(&max_error_rate) {
        return Err(SpecError::MaxErrorRateOutOfRange {
            value: max_error_rate,
        });
    }
    let latency_increase = request.max_latency_increase.unwrap_or(d.latency_increase);
    if !(1.0..=MAX_LATENCY_INCREASE).contains(&latency_increase) {
        return Err(SpecError::MaxLatencyIncreaseOutOfRange {
            value: latency_increase,
        });
    }
    for (field, value) in [
        (Field::StepDuration, request.step_duration),
        (Field::BakeTime, request.bake_time),
        (Field::MinHealthyTime, request.min_healthy_time),
        (Field::HealthDeadline, request.health_deadline),
        (Field::ProgressDeadline, request.progress_deadline),
    ] {
        if let Some(value) = value
            && value > MAX_OPTION_DURATION
        {
            return Err(SpecError::TooLong { field, value });
        }
    }
    Ok(Spec {
        module: request.module.clone(),
        version: request.version.clone(),
        strategy,
        max_failures: request.max_failures.unwrap_or(d.max_failures),
        health_deadline_ms: ms(request.health_deadline, d.health_deadline),
        progress_deadline_ms: ms(request.progress_deadline, d.progress_deadline),
        auto_rollback: !request.no_auto_rollback,
        require_approval: env.require_approval,
        approval_timeout_ms: settings.approval_timeout.as_millis() as u64,
        pause_timeout_ms: ms(request.pause_timeout, settings.pause_timeout),
        created_by: user.to_string(),
        thresholds: Thresholds {
            max_error_rate,
            error_rate_increase: d.error_rate_increase,
            latency_increase,
            cpu_increase: d.cpu_increase,
            memory_increase: d.memory_increase,
            min_requests: request
                .analysis_min_requests
                .unwrap_or(d.analysis_min_requests),
            warmup_ms: request
                .analysis_warmup
                .unwrap_or(d.analysis_warmup)
                .as_millis() as u64,
            ..Thresholds::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{Just, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as Gen;

    use super::*;

    fn request(environment: &str) -> CreateRequest {
        CreateRequest {
            module: "web".into(),
            version: "2.0.0".into(),
            environment: environment.into(),
            ..CreateRequest::default()
        }
    }

    /// The edge's flag names, to check the wording is assembled right.
    use crate::error::flag_name as dashed;

    fn check(request: CreateRequest, expected: &str) {
        let error = build(&request, &Settings::default(), "alice").expect_err(expected);
        assert_eq!(error.message(dashed), expected, "{error:?}");
    }

    #[test]
    fn refusals_name_the_option() {
        let mut r = request("production");
        r.max_error_rate = Some(2.0);
        check(r, "--max-error-rate 2 is not between 0 and 1");
        let mut r = request("production");
        r.max_latency_increase = Some(0.5);
        check(
            r,
            "--max-latency-increase 0.5 must be between 1 and 1000 (a multiple of the baseline)",
        );
        let mut r = request("dev");
        r.batch_size = Some("2".into());
        check(r, "--batch-size applies to the rolling strategy only");
        let mut r = request("dev");
        r.manual_promote = true;
        check(
            r,
            "--steps, --step-duration and --manual-promote apply to the canary strategy only",
        );
        let mut r = request("dev");
        r.analysis_warmup = Some(Duration::from_secs(1));
        check(
            r,
            "--analysis-min-requests and --analysis-warmup apply to the canary strategy only",
        );
        let mut r = request("dev");
        r.bake_time = Some(Duration::from_secs(1));
        check(r, "--bake-time applies to the blue-green strategy only");
        let mut r = request("dev");
        r.pause_timeout = Some(Duration::from_millis(500));
        check(r, "--pause-timeout 0s must be between 1s and 366d");
        let mut r = request("dev");
        r.health_deadline = Some(MAX_OPTION_DURATION + Duration::from_secs(86_400));
        check(r, "--health-deadline 367d0h is longer than 366d");
        let mut r = request("production");
        r.analysis_min_requests = Some(MAX_ANALYSIS_MIN_REQUESTS + 1);
        check(r, "--analysis-min-requests must be at most 1000000000");
        let mut r = request("production");
        r.analysis_warmup = Some(Duration::from_secs(86_401));
        check(r, "--analysis-warmup must be at most 24h");
        let mut r = request("dev");
        r.strategy = Some("yolo".into());
        check(
            r,
            "unknown strategy \"yolo\": use direct, rolling, blue-green or canary",
        );
        let mut r = request("qa");
        r.batch_size = Some("0%".into());
        check(r, "batch size \"0%\" is not N or N% (e.g. 2 or 25%)");
        let mut r = request("production");
        r.steps = vec![50, 10];
        check(
            r,
            "canary steps [50, 10] must be increasing percentages in 1..=100",
        );
    }

    #[test]
    fn display_uses_domain_names() {
        let error = SpecError::MaxErrorRateOutOfRange { value: 2.0 };
        assert_eq!(error.to_string(), "max_error_rate 2 is not between 0 and 1");
        let error = SpecError::OnlyFor {
            fields: &[Field::AnalysisMinRequests, Field::AnalysisWarmup],
            strategy: "canary",
        };
        assert_eq!(
            error.to_string(),
            "analysis_min_requests and analysis_warmup apply to the canary strategy only"
        );
    }

    #[test]
    fn unknown_environment_lists_the_configured_ones() {
        let error = build(&request("nowhere"), &Settings::default(), "alice").unwrap_err();
        let configured = Settings::default()
            .environments
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(
            error.to_string(),
            format!("unknown environment \"nowhere\"; configured: {configured}")
        );
    }

    #[test]
    fn batch_sizes() {
        assert_eq!(parse_batch("3"), Ok(BatchSize::Count(3)));
        assert_eq!(parse_batch("25%"), Ok(BatchSize::Percent(25)));
        for bad in ["0", "0%", "101%", "x", "", "-1", "5 %"] {
            assert!(parse_batch(bad).is_err(), "{bad}");
        }
    }

    fn strategy_name() -> impl Gen<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("direct".to_string())),
            Just(Some("rolling".to_string())),
            Just(Some("blue-green".to_string())),
            Just(Some("canary".to_string())),
        ]
    }

    fn duration() -> impl Gen<Value = Option<Duration>> {
        prop::option::of((0u64..400 * 86_400_000).prop_map(Duration::from_millis))
    }

    proptest! {
        /// A spec that validates has every option in its range; a refusal
        /// never panics and always says something.
        #[test]
        fn valid_specs_are_in_range(
            environment in prop_oneof![Just("dev"), Just("qa"), Just("staging"), Just("production")],
            strategy in strategy_name(),
            batch in prop::option::of(prop_oneof![Just("2".to_string()), Just("25%".to_string()), Just("0".to_string())]),
            steps in prop::collection::vec(0u32..120, 0..4),
            manual_promote in any::<bool>(),
            step_duration in duration(),
            bake_time in duration(),
            health_deadline in duration(),
            pause_timeout in duration(),
            warmup in duration(),
            min_requests in prop::option::of(0u64..2_000_000_000),
            max_error_rate in prop::option::of(-1.0f64..2.0),
            latency in prop::option::of(0.0f64..2000.0),
        ) {
            let request = CreateRequest {
                strategy,
                batch_size: batch,
                steps,
                manual_promote,
                step_duration,
                bake_time,
                health_deadline,
                pause_timeout,
                analysis_warmup: warmup,
                analysis_min_requests: min_requests,
                max_error_rate,
                max_latency_increase: latency,
                ..request(environment)
            };
            match build(&request, &Settings::default(), "alice") {
                Ok(spec) => {
                    let t = &spec.thresholds;
                    prop_assert!((0.0..=1.0).contains(&t.max_error_rate));
                    prop_assert!((1.0..=MAX_LATENCY_INCREASE).contains(&t.latency_increase));
                    prop_assert!(t.min_requests <= MAX_ANALYSIS_MIN_REQUESTS);
                    prop_assert!(t.warmup_ms <= MAX_ANALYSIS_WARMUP.as_millis() as u64);
                    prop_assert!(spec.health_deadline_ms <= MAX_OPTION_DURATION.as_millis() as u64);
                    prop_assert!(spec.pause_timeout_ms >= 1000);
                    prop_assert_eq!(spec.created_by.as_str(), "alice");
                    match &spec.strategy {
                        Strategy::Canary { steps, step_ms, .. } => {
                            prop_assert!(steps.windows(2).all(|w| w[0] < w[1]));
                            prop_assert!(steps.iter().all(|s| (1..=100).contains(s)));
                            prop_assert!(*step_ms <= MAX_OPTION_DURATION.as_millis() as u64);
                        }
                        other => {
                            prop_assert!(request.steps.is_empty() && !request.manual_promote);
                            prop_assert!(request.step_duration.is_none());
                            let blue_green = matches!(other, Strategy::BlueGreen { .. });
                            let rolling = matches!(other, Strategy::Rolling { .. });
                            prop_assert!(request.bake_time.is_none() || blue_green);
                            prop_assert!(request.batch_size.is_none() || rolling);
                        }
                    }
                }
                Err(error) => {
                    prop_assert!(!error.to_string().is_empty());
                    prop_assert!(!error.message(dashed).is_empty());
                }
            }
        }
    }
}
