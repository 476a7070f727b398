//! Module metrics for canary analysis: scraping a module's Prometheus
//! endpoint ([`scrape`]), parsing the text exposition format into the three
//! series the manifest names ([`parse`]), and turning two scrapes into the
//! rates canary analysis compares ([`window`], [`quantile`]).

use std::time::Duration;

use hotswap_common::manifest::MetricsSpec;

use crate::http_client::{HttpError, http_get};

/// Which series to read: the names from the manifest's `[metrics]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricNames {
    /// Counter of requests served.
    pub requests_total: String,
    /// Counter of failed requests.
    pub errors_total: String,
    /// Histogram of request latency in seconds (the name without the
    /// `_bucket`/`_sum`/`_count` suffixes).
    pub latency_seconds: String,
}

impl From<&MetricsSpec> for MetricNames {
    fn from(spec: &MetricsSpec) -> Self {
        MetricNames {
            requests_total: spec.requests_total.clone(),
            errors_total: spec.errors_total.clone(),
            latency_seconds: spec.latency_seconds.clone(),
        }
    }
}

/// Counters and the latency histogram from one scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub requests_total: f64,
    pub errors_total: f64,
    pub latency: Histogram,
}

/// A cumulative histogram.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Histogram {
    /// `(le, cumulative count)`, sorted by `le`; `+Inf` is `f64::INFINITY`.
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

/// What canary analysis compares, over one interval: the shared
/// [`ModuleMetrics`](hotswap_common::status::ModuleMetrics) the report carries.
pub type Window = hotswap_common::status::ModuleMetrics;

/// Scrape a metrics endpoint and parse it. `timeout` bounds the whole
/// request; bodies are capped at 4 MiB.
pub async fn scrape(
    spec_url: &str,
    names: &MetricNames,
    timeout: Duration,
) -> Result<Sample, ScrapeError> {
    let url = || spec_url.to_string();
    let (status, body) = http_get(spec_url, timeout)
        .await
        .map_err(|source| ScrapeError::Http { url: url(), source })?;
    if !(200..300).contains(&status) {
        return Err(ScrapeError::Status { url: url(), status });
    }
    let text = std::str::from_utf8(&body).map_err(|e| ScrapeError::NotText {
        url: url(),
        reason: e.to_string(),
    })?;
    parse(text, names).map_err(|source| ScrapeError::Parse { url: url(), source })
}

/// Why a scrape produced no sample; the next scrape tries again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScrapeError {
    #[error("scrape {url}: {source}")]
    Http { url: String, source: HttpError },
    #[error("scrape {url}: status {status}")]
    Status { url: String, status: u16 },
    #[error("scrape {url}: the response is not UTF-8 text: {reason}")]
    NotText { url: String, reason: String },
    #[error("scrape {url}: {source}")]
    Parse {
        url: String,
        source: ExpositionError,
    },
}

/// A malformed line of a metrics exposition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ExpositionError {
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

/// Parse Prometheus text exposition format (also OpenMetrics: a `_total`
/// suffix on counters, `# EOF`, exemplars).
///
/// A metric is summed over all its label sets (e.g.
/// `http_requests_total{code="200"}` + `{code="500"}`), histogram buckets
/// per `le`. A missing metric counts as 0: a module that has served nothing
/// yet may not expose it. Every line must be well-formed, not just the ones
/// we read, because a malformed line means we cannot trust the rest; the
/// error names the line number.
pub fn parse(text: &str, names: &MetricNames) -> Result<Sample, ExpositionError> {
    let mut requests = CounterSum::default();
    let mut errors = CounterSum::default();
    let mut latency = HistogramSum::default();
    for (index, raw_line) in text.lines().enumerate() {
        let number = index + 1;
        let line = raw_line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            // HELP, TYPE, UNIT and free comments carry nothing we need;
            // OpenMetrics ends the exposition with "# EOF".
            if comment.trim() == "EOF" {
                break;
            }
            continue;
        }
        let malformed = |reason| ExpositionError {
            line: number,
            reason,
        };
        let sample = parse_sample_line(line).map_err(malformed)?;
        // A NaN (or infinite) value would poison every rate computed from
        // the sum; exporters use NaN for "no data", so skip it.
        if !sample.value.is_finite() {
            continue;
        }
        requests.add(&names.requests_total, &sample);
        errors.add(&names.errors_total, &sample);
        latency
            .add(&names.latency_seconds, &sample)
            .map_err(malformed)?;
    }
    Ok(Sample {
        requests_total: requests.total(),
        errors_total: errors.total(),
        latency: latency.finish(),
    })
}

/// One sample line: `name{labels} value [timestamp] [# exemplar]`.
#[derive(Clone, Debug, PartialEq)]
struct SampleLine {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl SampleLine {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A counter summed over label sets. OpenMetrics names the family `foo`
/// and its sample `foo_total`, so a configured `foo` also matches
/// `foo_total`; an exact match wins if both exist, so nothing is counted
/// twice.
#[derive(Default)]
struct CounterSum {
    exact: f64,
    exact_seen: bool,
    suffixed: f64,
}

impl CounterSum {
    fn add(&mut self, name: &str, sample: &SampleLine) {
        if sample.name == name {
            self.exact += sample.value;
            self.exact_seen = true;
        } else if sample
            .name
            .strip_prefix(name)
            .is_some_and(|rest| rest == "_total")
        {
            self.suffixed += sample.value;
        }
    }

    fn total(&self) -> f64 {
        if self.exact_seen {
            self.exact
        } else {
            self.suffixed
        }
    }
}

#[derive(Default)]
struct HistogramSum {
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

impl HistogramSum {
    fn add(&mut self, name: &str, sample: &SampleLine) -> Result<(), String> {
        let Some(suffix) = sample.name.strip_prefix(name) else {
            return Ok(());
        };
        match suffix {
            "_bucket" => {
                let le_text = sample
                    .label("le")
                    .ok_or("histogram bucket without an le label")?;
                let le = parse_float(le_text)
                    .filter(|le| !le.is_nan())
                    .ok_or_else(|| format!("invalid le {le_text:?}"))?;
                // Few buckets (tens at most): a linear search is fine.
                match self.buckets.iter_mut().find(|(bound, _)| *bound == le) {
                    Some((_, count)) => *count += sample.value,
                    None => self.buckets.push((le, sample.value)),
                }
            }
            "_count" => self.count += sample.value,
            "_sum" => self.sum += sample.value,
            _ => {}
        }
        Ok(())
    }

    fn finish(mut self) -> Histogram {
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram {
            buckets: self.buckets,
            count: self.count,
            sum: self.sum,
        }
    }
}

fn parse_sample_line(line: &str) -> Result<SampleLine, String> {
    let mut cursor = Cursor { text: line, pos: 0 };
    let mut name = if cursor.peek() == Some('{') {
        None
    } else {
        Some(cursor.identifier(true).ok_or("expected a metric name")?)
    };
    let mut labels = Vec::new();
    if cursor.eat('{') {
        loop {
            cursor.skip_spaces();
            if cursor.eat('}') {
                break;
            }
            // Newer exposition allows quoted (UTF-8) names: a quoted string
            // on its own inside the braces is the metric name.
            let (key, quoted) = if cursor.peek() == Some('"') {
                (cursor.quoted()?, true)
            } else {
                let key = cursor
                    .identifier(false)
                    .ok_or("expected a label name or '}'")?;
                (key, false)
            };
            cursor.skip_spaces();
            if cursor.eat('=') {
                cursor.skip_spaces();
                if cursor.peek() != Some('"') {
                    return Err(format!("expected a quoted value for label {key:?}"));
                }
                let value = cursor.quoted()?;
                labels.push((key, value));
            } else if quoted && name.is_none() {
                name = Some(key);
            } else {
                return Err(format!("expected '=' after label name {key:?}"));
            }
            cursor.skip_spaces();
            if cursor.eat(',') {
                continue;
            }
            if cursor.eat('}') {
                break;
            }
            return Err("expected ',' or '}' in the label set".to_string());
        }
    }
    let name = name.ok_or("no metric name")?;

    let rest = cursor.rest();
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) && !line[..cursor.pos].ends_with('}') {
        return Err(format!("unexpected character after metric name {name:?}"));
    }
    let mut tokens = rest.split_ascii_whitespace();
    let value_text = tokens
        .next()
        .ok_or_else(|| format!("no value for {name:?}"))?;
    let value = parse_float(value_text).ok_or_else(|| format!("invalid value {value_text:?}"))?;
    let mut after_value = tokens.next();
    if let Some(timestamp) = after_value.filter(|t| !t.starts_with('#')) {
        // Milliseconds (Prometheus) or seconds with a fraction
        // (OpenMetrics); we only check that it is a number.
        parse_float(timestamp)
            .filter(|t| t.is_finite())
            .ok_or_else(|| format!("invalid timestamp {timestamp:?}"))?;
        after_value = tokens.next();
    }
    // Anything left must be an OpenMetrics exemplar ("# {...} value").
    if let Some(extra) = after_value
        && !extra.starts_with('#')
    {
        return Err(format!("unexpected {extra:?} after the value"));
    }
    Ok(SampleLine {
        name,
        labels,
        value,
    })
}

/// Go's ParseFloat spellings as Prometheus writes them (`+Inf`, `-Inf`,
/// `NaN`, exponents); Rust's parser accepts all of those.
fn parse_float(text: &str) -> Option<f64> {
    text.parse().ok()
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn skip_spaces(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start_matches([' ', '\t']).len();
    }

    /// A metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or, without colons, a
    /// label name.
    fn identifier(&mut self, colons: bool) -> Option<String> {
        let ok = |c: char, first: bool| {
            c.is_ascii_alphabetic()
                || c == '_'
                || (colons && c == ':')
                || (!first && c.is_ascii_digit())
        };
        let rest = self.rest();
        let mut end = 0;
        for (i, c) in rest.char_indices() {
            if !ok(c, i == 0) {
                break;
            }
            end = i + c.len_utf8();
        }
        if end == 0 {
            return None;
        }
        let name = rest[..end].to_string();
        self.pos += end;
        Some(name)
    }

    /// A double-quoted string with `\\`, `\"` and `\n` escapes.
    fn quoted(&mut self) -> Result<String, String> {
        if !self.eat('"') {
            return Err("expected '\"'".to_string());
        }
        let mut value = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(value);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    // Not a defined escape: keep it verbatim rather than
                    // reject an exporter's sloppy but harmless output.
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => break,
                },
                other => value.push(other),
            }
        }
        Err("unterminated quoted string".to_string())
    }
}

/// Difference of two samples `elapsed` apart. A counter that went down
/// (process restarted) is treated as a reset: its new value is the increase.
pub fn window(prev: &Sample, cur: &Sample, elapsed: Duration) -> Window {
    let requests = increase(prev.requests_total, cur.requests_total);
    let errors = increase(prev.errors_total, cur.errors_total);
    let seconds = elapsed.as_secs_f64();
    let request_rate = if seconds > 0.0 {
        requests / seconds
    } else {
        0.0
    };
    // Two counters read at the same instant, but each reset-corrected on its
    // own, so errors can exceed requests right after a restart; a rate above
    // 100% means nothing, so cap it.
    let error_rate = if requests > 0.0 {
        (errors / requests).min(1.0)
    } else {
        0.0
    };
    let latency_p99_seconds = if requests > 0.0 {
        quantile(0.99, &histogram_increase(&prev.latency, &cur.latency))
    } else {
        None
    };
    Window {
        request_rate,
        error_rate,
        latency_p99_seconds,
    }
}

fn increase(prev: f64, cur: f64) -> f64 {
    if cur >= prev { cur - prev } else { cur }
}

/// Per-bucket increase of a cumulative histogram. If the count or any
/// bucket went down, the process restarted: everything in `cur` is new.
fn histogram_increase(prev: &Histogram, cur: &Histogram) -> Vec<(f64, f64)> {
    let before = |le: f64| {
        prev.buckets
            .iter()
            .find(|(bound, _)| *bound == le)
            .map_or(0.0, |(_, count)| *count)
    };
    let reset = cur.count < prev.count || cur.buckets.iter().any(|&(le, count)| count < before(le));
    if reset {
        return cur.buckets.clone();
    }
    cur.buckets
        .iter()
        .map(|&(le, count)| (le, count - before(le)))
        .collect()
}

/// The `q`-quantile (0..=1) of a cumulative histogram, interpolating
/// linearly inside the bucket it falls in, like Prometheus's
/// `histogram_quantile`: the lowest bucket starts at 0 (or at its bound if
/// that is not positive). If it falls in the `+Inf` bucket, the result is
/// the largest finite bound. None when the histogram is empty, has only a
/// `+Inf` bucket, or `q` is out of range.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut buckets: Vec<(f64, f64)> = buckets
        .iter()
        .copied()
        .filter(|&(le, count)| !le.is_nan() && le != f64::NEG_INFINITY && count.is_finite())
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Buckets of one histogram are read at slightly different moments (and
    // summed over label sets that may use different bounds), so cumulative
    // counts can dip; like Prometheus, force them monotonic.
    let mut highest = 0.0f64;
    for bucket in &mut buckets {
        highest = highest.max(bucket.1);
        bucket.1 = highest;
    }
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    // The top bucket's count is the total even if it is not +Inf: nothing is
    // known about observations above it.
    let rank = q * total;
    let index = buckets.iter().position(|&(_, count)| count >= rank)?;
    let (upper, count) = buckets[index];
    if upper == f64::INFINITY {
        return buckets
            .iter()
            .rev()
            .map(|&(le, _)| le)
            .find(|le| le.is_finite());
    }
    let (lower, below) = match index.checked_sub(1) {
        Some(previous) => buckets[previous],
        None if upper <= 0.0 => return Some(upper),
        None => (0.0, 0.0),
    };
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(lower);
    }
    let fraction = (rank - below) / in_bucket;
    // Clamped because rounding could otherwise step past the bucket's upper
    // bound and break monotonicity in q.
    Some((lower + (upper - lower) * fraction).clamp(lower, upper))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names() -> MetricNames {
        MetricNames {
            requests_total: "http_requests_total".to_string(),
            errors_total: "http_errors_total".to_string(),
            latency_seconds: "http_request_duration_seconds".to_string(),
        }
    }

    const EXPOSITION: &str = r#"# HELP http_requests_total Requests served.
# TYPE http_requests_total counter
http_requests_total{method="GET",code="200"} 1027 1395066363000
http_requests_total{method="POST",code="500"} 3 1395066363000
http_requests_total{method="GET",path="/a,b",note="say \"hi\", then \\ go"} 10
# HELP http_errors_total Failed requests.
# TYPE http_errors_total counter
http_errors_total{code="500"} 3
http_errors_total{code="503"} NaN
# A histogram of latencies, in two label sets.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05",path="/"} 24054
http_request_duration_seconds_bucket{le="0.1",path="/"} 33444
http_request_duration_seconds_bucket{le="0.2",path="/"} 100392
http_request_duration_seconds_bucket{le="+Inf",path="/"} 144320
http_request_duration_seconds_sum{path="/"} 53423
http_request_duration_seconds_count{path="/"} 144320
http_request_duration_seconds_bucket{path="/x",le="0.05"} 6
http_request_duration_seconds_bucket{path="/x",le="0.1"} 8
http_request_duration_seconds_bucket{path="/x",le="0.2"} 9
http_request_duration_seconds_bucket{path="/x",le="+Inf"} 10
http_request_duration_seconds_sum{path="/x"} 1.5
http_request_duration_seconds_count{path="/x"} 10
# Unrelated metrics must parse but are ignored.
process_cpu_seconds_total 12.47
go_gc_duration_seconds{quantile="0.5"} 1.3e-05
http_requests_total_created 1.7e9
metric_without_timestamp_and_labels 12.47
something_weird{problem="division by zero"} +Inf -3982045
"#;

    #[test]
    fn parses_real_looking_exposition() {
        let sample = parse(EXPOSITION, &names()).unwrap();
        assert_eq!(sample.requests_total, 1040.0);
        assert_eq!(sample.errors_total, 3.0, "NaN values are ignored");
        assert_eq!(
            sample.latency,
            Histogram {
                buckets: vec![
                    (0.05, 24060.0),
                    (0.1, 33452.0),
                    (0.2, 100401.0),
                    (f64::INFINITY, 144330.0)
                ],
                count: 144330.0,
                sum: 53424.5,
            }
        );
    }

    #[test]
    fn parses_openmetrics() {
        let text = r#"# TYPE http_requests counter
# UNIT http_request_duration_seconds seconds
http_requests_total{code="200"} 7.0 1520879607.789 # {trace_id="KOO5S4vxi0o"} 0.67
http_requests_created{code="200"} 1520430000.123
http_requests_total{code="500"} 1.0
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="1.0"} 3 # {trace_id="x y"} 0.5 123
http_request_duration_seconds_bucket{le="+Inf"} 8
http_request_duration_seconds_count 8
http_request_duration_seconds_sum 11.5
# EOF
this line is after EOF and never read {
"#;
        let names = MetricNames {
            requests_total: "http_requests".to_string(),
            errors_total: "http_errors".to_string(),
            latency_seconds: "http_request_duration_seconds".to_string(),
        };
        let sample = parse(text, &names).unwrap();
        assert_eq!(sample.requests_total, 8.0);
        assert_eq!(sample.errors_total, 0.0);
        assert_eq!(
            sample.latency.buckets,
            vec![(1.0, 3.0), (f64::INFINITY, 8.0)]
        );
        assert_eq!(sample.latency.count, 8.0);
        assert_eq!(sample.latency.sum, 11.5);
    }

    #[test]
    fn exact_counter_name_wins_over_total_suffix() {
        let names = MetricNames {
            requests_total: "reqs".to_string(),
            errors_total: "errs".to_string(),
            latency_seconds: "lat".to_string(),
        };
        let sample = parse("reqs 5\nreqs_total 7\nerrs_total 2\n", &names).unwrap();
        assert_eq!(sample.requests_total, 5.0);
        assert_eq!(sample.errors_total, 2.0);
    }

    #[test]
    fn quoted_metric_names() {
        let text = "{\"http_requests_total\", code=\"200\"} 4\n{\"http.errors\"} 1\n";
        let sample = parse(text, &names()).unwrap();
        assert_eq!(sample.requests_total, 4.0);
        let line = parse_sample_line("{\"my.metric\",\"my.label\"=\"v\"} 1").unwrap();
        assert_eq!(line.name, "my.metric");
        assert_eq!(line.labels, vec![("my.label".to_string(), "v".to_string())]);
    }

    #[test]
    fn label_values_with_escapes() {
        let line =
            parse_sample_line(r#"m{a="x,y}",b="q\"uote",c="back\\slash",d="new\nline",} 2 3"#)
                .unwrap();
        assert_eq!(line.name, "m");
        assert_eq!(line.value, 2.0);
        assert_eq!(
            line.labels,
            vec![
                ("a".to_string(), "x,y}".to_string()),
                ("b".to_string(), "q\"uote".to_string()),
                ("c".to_string(), "back\\slash".to_string()),
                ("d".to_string(), "new\nline".to_string()),
            ]
        );
        let line = parse_sample_line("m{ a = \"1\" } -Inf").unwrap();
        assert_eq!(line.value, f64::NEG_INFINITY);
        assert_eq!(parse_sample_line("m{} 1e3").unwrap().value, 1000.0);
        assert_eq!(parse_sample_line("m\t1").unwrap().value, 1.0);
        assert_eq!(parse_sample_line("a:b_c 1").unwrap().name, "a:b_c");
    }

    #[test]
    fn missing_metrics_count_as_zero() {
        let sample = parse("# nothing served yet\nup 1\n", &names()).unwrap();
        assert_eq!(
            sample,
            Sample {
                requests_total: 0.0,
                errors_total: 0.0,
                latency: Histogram::default(),
            }
        );
        assert_eq!(parse("", &names()).unwrap(), sample);
    }

    #[test]
    fn sums_across_label_sets() {
        let text = "http_requests_total{code=\"200\"} 10\nhttp_requests_total{code=\"500\"} 5\nhttp_requests_total{code=\"404\"} 0.5\nhttp_errors_total{code=\"500\"} 5\nhttp_errors_total{code=\"502\"} 1\n";
        let sample = parse(text, &names()).unwrap();
        assert_eq!(sample.requests_total, 15.5);
        assert_eq!(sample.errors_total, 6.0);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        let cases = [
            (
                "ok 1\n\nbad_metric\n",
                "line 3: no value for \"bad_metric\"",
            ),
            (
                "m{a=\"1\" 2\n",
                "line 1: expected ',' or '}' in the label set",
            ),
            (
                "# c\nm{a=1} 2\n",
                "line 2: expected a quoted value for label \"a\"",
            ),
            ("m{a=\"1} 2\n", "line 1: unterminated quoted string"),
            ("m one\n", "line 1: invalid value \"one\""),
            ("m 1 2 3\n", "line 1: unexpected \"3\" after the value"),
            ("m 1 soon\n", "line 1: invalid timestamp \"soon\""),
            ("m{0a=\"1\"} 1\n", "line 1: expected a label name or '}'"),
            ("m{a} 1\n", "line 1: expected '=' after label name \"a\""),
            ("{a=\"1\"} 1\n", "line 1: no metric name"),
            ("9m 1\n", "line 1: expected a metric name"),
            (
                "m-x 1\n",
                "line 1: unexpected character after metric name \"m\"",
            ),
            (
                "http_request_duration_seconds_bucket 3\n",
                "line 1: histogram bucket without an le label",
            ),
            (
                "x 1\nhttp_request_duration_seconds_bucket{le=\"soon\"} 3\n",
                "line 2: invalid le \"soon\"",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse(text, &names()).unwrap_err().to_string(),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn windows_and_resets() {
        let hist = |buckets: &[(f64, f64)]| Histogram {
            buckets: buckets.to_vec(),
            count: buckets.last().map_or(0.0, |b| b.1),
            sum: 0.0,
        };
        let prev = Sample {
            requests_total: 100.0,
            errors_total: 10.0,
            latency: hist(&[(0.1, 50.0), (1.0, 90.0), (f64::INFINITY, 100.0)]),
        };
        let cur = Sample {
            requests_total: 300.0,
            errors_total: 20.0,
            latency: hist(&[(0.1, 150.0), (1.0, 290.0), (f64::INFINITY, 300.0)]),
        };
        let w = window(&prev, &cur, Duration::from_secs(10));
        assert_eq!(w.request_rate, 20.0);
        assert_eq!(w.error_rate, 0.05);
        // Delta: 100 in (0, 0.1], 100 in (0.1, 1], 0 above; p99 = rank 198
        // of 200, 98% into the second bucket.
        let p99 = w.latency_p99_seconds.unwrap();
        assert!((p99 - (0.1 + 0.9 * 0.98)).abs() < 1e-9, "{p99}");

        // No traffic.
        let w = window(&cur, &cur, Duration::from_secs(10));
        assert_eq!(
            w,
            Window {
                request_rate: 0.0,
                error_rate: 0.0,
                latency_p99_seconds: None
            }
        );

        // Restart: counters start over; the new values are the increase.
        let restarted = Sample {
            requests_total: 40.0,
            errors_total: 4.0,
            latency: hist(&[(0.1, 40.0), (1.0, 40.0), (f64::INFINITY, 40.0)]),
        };
        let w = window(&cur, &restarted, Duration::from_secs(4));
        assert_eq!(w.request_rate, 10.0);
        assert_eq!(w.error_rate, 0.1);
        let p99 = w.latency_p99_seconds.unwrap();
        assert!((p99 - 0.099).abs() < 1e-9, "{p99}");

        // Errors reset but requests did not: capped at 100%.
        let odd = Sample {
            requests_total: 301.0,
            errors_total: 5.0,
            latency: cur.latency.clone(),
        };
        assert_eq!(window(&cur, &odd, Duration::from_secs(1)).error_rate, 1.0);

        // Zero elapsed time does not divide by zero.
        assert_eq!(window(&prev, &cur, Duration::ZERO).request_rate, 0.0);

        // Requests without a latency histogram.
        let bare = |n: f64| Sample {
            requests_total: n,
            errors_total: 0.0,
            latency: Histogram::default(),
        };
        let w = window(&bare(1.0), &bare(5.0), Duration::from_secs(2));
        assert_eq!(w.request_rate, 2.0);
        assert_eq!(w.latency_p99_seconds, None);
    }

    #[test]
    fn quantile_table() {
        let inf = f64::INFINITY;
        let uniform = [
            (1.0, 10.0),
            (2.0, 20.0),
            (3.0, 30.0),
            (4.0, 40.0),
            (inf, 40.0),
        ];
        type Case<'a> = (f64, &'a [(f64, f64)], Option<f64>);
        let cases: &[Case] = &[
            (0.5, &uniform, Some(2.0)),
            (0.25, &uniform, Some(1.0)),
            (0.99, &uniform, Some(3.96)),
            (1.0, &uniform, Some(4.0)),
            (0.0, &uniform, Some(0.0)),
            (0.125, &uniform, Some(0.5)),
            // All observations in the first bucket.
            (0.5, &[(0.5, 8.0), (1.0, 8.0), (inf, 8.0)], Some(0.25)),
            (0.99, &[(0.5, 8.0), (1.0, 8.0), (inf, 8.0)], Some(0.495)),
            // All in +Inf: the largest finite bound.
            (0.5, &[(0.5, 0.0), (1.0, 0.0), (inf, 8.0)], Some(1.0)),
            (0.99, &[(0.5, 0.0), (1.0, 0.0), (inf, 8.0)], Some(1.0)),
            // Only a +Inf bucket: nothing known.
            (0.5, &[(inf, 8.0)], None),
            // Empty.
            (0.5, &[], None),
            (0.5, &[(1.0, 0.0), (inf, 0.0)], None),
            // Unsorted input and a dip are tolerated.
            (
                0.5,
                &[(inf, 40.0), (2.0, 20.0), (1.0, 10.0), (3.0, 19.0)],
                Some(2.0),
            ),
            // Non-positive lowest bound.
            (0.1, &[(-1.0, 5.0), (1.0, 10.0), (inf, 10.0)], Some(-1.0)),
            // No +Inf bucket: the top bucket holds the total.
            (0.5, &[(1.0, 5.0), (2.0, 10.0)], Some(1.0)),
            // Out of range.
            (1.5, &uniform, None),
            (-0.1, &uniform, None),
            (f64::NAN, &uniform, None),
        ];
        for (q, buckets, want) in cases {
            let got = quantile(*q, buckets);
            match (got, want) {
                (Some(got), Some(want)) => {
                    assert!(
                        (got - want).abs() < 1e-9,
                        "q={q} {buckets:?}: {got} != {want}"
                    )
                }
                _ => assert_eq!(got, *want, "q={q} {buckets:?}"),
            }
        }
    }

    #[tokio::test]
    async fn scrapes_a_live_endpoint() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let body = EXPOSITION;
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/metrics");
        let sample = scrape(&url, &names(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(sample.requests_total, 1040.0);
        let err = scrape(&url, &names(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), format!("scrape {url}: status 500"));

        let err = scrape(
            "http://127.0.0.1:1/metrics",
            &names(),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "scrape http://127.0.0.1:1/metrics: connection refused"
        );
    }

    #[test]
    fn names_from_spec() {
        let spec = MetricsSpec {
            prometheus: "http://127.0.0.1:9090/metrics".to_string(),
            requests_total: "a".to_string(),
            errors_total: "b".to_string(),
            latency_seconds: "c".to_string(),
        };
        assert_eq!(
            MetricNames::from(&spec),
            MetricNames {
                requests_total: "a".to_string(),
                errors_total: "b".to_string(),
                latency_seconds: "c".to_string(),
            }
        );
    }

    fn buckets_strategy() -> impl Strategy<Value = Vec<(f64, f64)>> {
        let bound = prop_oneof![
            (-5i32..50).prop_map(|n| f64::from(n) / 4.0),
            Just(f64::INFINITY),
        ];
        proptest::collection::vec((bound, 0u32..1000), 0..12).prop_map(|buckets| {
            buckets
                .into_iter()
                .map(|(le, count)| (le, f64::from(count)))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = parse(&text, &names());
        }

        #[test]
        fn parse_never_panics_on_exposition_like_text(
            text in "[a-z_{}=\",# \\\\\n0-9.+InfNaE-]{0,200}"
        ) {
            let _ = parse(&text, &names());
        }

        #[test]
        fn quantile_is_monotonic_in_q(
            buckets in buckets_strategy(),
            mut qs in proptest::collection::vec(0.0f64..=1.0, 2..8),
        ) {
            qs.sort_by(f64::total_cmp);
            let results: Vec<Option<f64>> = qs.iter().map(|&q| quantile(q, &buckets)).collect();
            // Whether there is an answer depends on the buckets only.
            prop_assert!(results.iter().all(|r| r.is_some() == results[0].is_some()));
            for pair in results.windows(2) {
                if let [Some(a), Some(b)] = pair {
                    prop_assert!(a <= b, "{:?} at {:?} for {:?}", results, qs, buckets);
                }
            }
        }
    }
}
