//! A device's counters as data, and the two text formats the metrics
//! endpoint serves them in: JSON (`GET /counters`) and the Prometheus text
//! exposition format 0.0.4 (`GET /metrics`). Formatting is pure: it takes a
//! [`Counters`] read from the atomics and returns a string.

use serde_json::{Map, Value};

/// Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (Prometheus name gets `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One metric family of a device.
#[derive(Debug, PartialEq, Eq)]
pub struct Metric {
    /// snake_case name: the JSON key, and `vmm_<device>_<name>[_total]` in Prometheus.
    pub name: &'static str,
    /// One line of help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// The extra label telling the samples of one queue apart (e.g.
    /// `reason`); in JSON the samples become an object keyed by its values.
    pub label: Option<&'static str>,
}

impl Metric {
    /// A counter without an extra label.
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: MetricKind::Counter,
            label: None,
        }
    }

    /// A gauge without an extra label.
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: MetricKind::Gauge,
            label: None,
        }
    }
}

/// One value of a metric on one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Which metric.
    pub metric: &'static Metric,
    /// The value of [`Metric::label`] (empty without a label).
    pub label_value: &'static str,
    /// The value.
    pub value: u64,
}

impl Sample {
    /// A sample of an unlabelled metric.
    pub fn new(metric: &'static Metric, value: u64) -> Self {
        Sample {
            metric,
            label_value: "",
            value,
        }
    }

    /// A sample of a labelled metric.
    pub fn labelled(metric: &'static Metric, label_value: &'static str, value: u64) -> Self {
        Sample {
            metric,
            label_value,
            value,
        }
    }
}

/// The samples of one queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueCounters {
    /// Queue index.
    pub queue: usize,
    /// What the queue is, for devices with queues of several kinds (`rx`, `tx`, `ctrl`).
    pub kind: Option<&'static str>,
    /// Its samples, in a fixed order.
    pub samples: Vec<Sample>,
}

/// Everything a device counts, read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Device name (`blk`, `net`): the JSON `device` and the Prometheus prefix `vmm_<device>_`.
    pub device: &'static str,
    /// Per-queue samples.
    pub queues: Vec<QueueCounters>,
}

/// Something the metrics endpoint can read at any time without blocking
/// the queue workers (it reads atomics only).
pub trait CounterSource: Send + Sync + 'static {
    /// The current values.
    fn counters(&self) -> Counters;
}

impl Counters {
    /// Every sample summed over the queues, in order of first appearance.
    pub fn totals(&self) -> Vec<Sample> {
        let mut totals: Vec<Sample> = Vec::new();
        for s in self.queues.iter().flat_map(|q| &q.samples) {
            match totals
                .iter_mut()
                .find(|t| t.metric.name == s.metric.name && t.label_value == s.label_value)
            {
                Some(t) => t.value = t.value.saturating_add(s.value),
                None => totals.push(*s),
            }
        }
        totals
    }
}

fn samples_json(samples: &[Sample]) -> Map<String, Value> {
    let mut obj = Map::new();
    for s in samples {
        if s.metric.label.is_some() {
            let entry = obj
                .entry(s.metric.name)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = entry {
                m.insert(s.label_value.into(), s.value.into());
            }
        } else {
            obj.insert(s.metric.name.into(), s.value.into());
        }
    }
    obj
}

/// The JSON document of `GET /counters`:
/// `{"device":"blk","queues":[{"queue":0,...},...],"totals":{...}}`; a
/// labelled metric is an object keyed by label value
/// (`"dropped_frames":{"bad_chain":0,...}`).
pub fn to_json(c: &Counters) -> String {
    let queues: Vec<Value> = c
        .queues
        .iter()
        .map(|q| {
            let mut obj = samples_json(&q.samples);
            obj.insert("queue".into(), q.queue.into());
            if let Some(kind) = q.kind {
                obj.insert("kind".into(), kind.into());
            }
            Value::Object(obj)
        })
        .collect();
    let mut doc = Map::new();
    doc.insert("device".into(), c.device.into());
    doc.insert("queues".into(), Value::Array(queues));
    doc.insert("totals".into(), Value::Object(samples_json(&c.totals())));
    Value::Object(doc).to_string()
}

/// The Prometheus name of `m` on device `device`.
pub fn prometheus_name(device: &str, m: &Metric) -> String {
    match m.kind {
        MetricKind::Counter => format!("vmm_{device}_{}_total", m.name),
        MetricKind::Gauge => format!("vmm_{device}_{}", m.name),
    }
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Escapes help text: backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

/// The Prometheus text exposition (format 0.0.4) of `GET /metrics`: per
/// metric a `# HELP` and a `# TYPE` line, then one sample per queue (and
/// label value), e.g. `vmm_blk_requests_total{queue="0"} 32`.
pub fn to_prometheus(c: &Counters) -> String {
    let mut metrics: Vec<&'static Metric> = Vec::new();
    for s in c.queues.iter().flat_map(|q| &q.samples) {
        if !metrics.iter().any(|m| m.name == s.metric.name) {
            metrics.push(s.metric);
        }
    }
    let mut out = String::new();
    for m in metrics {
        let name = prometheus_name(c.device, m);
        let kind = match m.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        out.push_str(&format!("# HELP {name} {}\n", escape_help(m.help)));
        out.push_str(&format!("# TYPE {name} {kind}\n"));
        for q in &c.queues {
            for s in q.samples.iter().filter(|s| s.metric.name == m.name) {
                out.push_str(&format!("{name}{{queue=\"{}\"", q.queue));
                if let Some(label) = m.label {
                    out.push_str(&format!(",{label}=\"{}\"", escape_label(s.label_value)));
                }
                out.push_str(&format!("}} {}\n", s.value));
            }
        }
    }
    out
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn check_labels(labels: &str) -> bool {
    if labels.is_empty() {
        return true;
    }
    labels.split(',').all(|pair| {
        pair.split_once('=').is_some_and(|(k, v)| {
            is_metric_name(k)
                && !k.contains(':')
                && v.len() >= 2
                && v.starts_with('"')
                && v.ends_with('"')
        })
    })
}

/// Checks the shape of a Prometheus text exposition as [`to_prometheus`]
/// writes it (label values without commas): every sample line is
/// `name{labels} value`, and every metric has a `# HELP` and a `# TYPE`
/// line before its samples. Returns the number of samples, or the first bad
/// line. For tests and tools.
pub fn check_prometheus_text(text: &str) -> Result<usize, String> {
    let mut help: Vec<&str> = Vec::new();
    let mut typed: Vec<&str> = Vec::new();
    let mut samples = 0;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("no newline at the end".into());
    }
    for line in text.lines() {
        let bad = || Err(format!("bad line: {line:?}"));
        if let Some(rest) = line.strip_prefix("# HELP ") {
            match rest.split_once(' ') {
                Some((name, _)) if is_metric_name(name) => help.push(name),
                _ => return bad(),
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter" | "gauge" | "histogram" | "summary" | "untyped"))
                    if is_metric_name(name) && !typed.contains(&name) =>
                {
                    typed.push(name)
                }
                _ => return bad(),
            }
        } else {
            let Some((series, value)) = line.rsplit_once(' ') else {
                return bad();
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => match l.strip_suffix('}') {
                    Some(l) => (n, l),
                    None => return bad(),
                },
                None => (series, ""),
            };
            if !is_metric_name(name) || !check_labels(labels) || value.parse::<f64>().is_err() {
                return bad();
            }
            if !help.contains(&name) || !typed.contains(&name) {
                return Err(format!("no HELP or TYPE before {line:?}"));
            }
            samples += 1;
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    static REQUESTS: Metric = Metric::counter("requests", "Requests taken.");
    static IN_FLIGHT: Metric = Metric::gauge("in_flight", "Requests in flight.");
    static DROPPED: Metric = Metric {
        name: "dropped_frames",
        help: "Frames dropped, by reason.",
        kind: MetricKind::Counter,
        label: Some("reason"),
    };

    fn two_queues() -> Counters {
        let q = |queue, n| QueueCounters {
            queue,
            kind: None,
            samples: vec![
                Sample::new(&REQUESTS, n),
                Sample::new(&IN_FLIGHT, 1),
                Sample::labelled(&DROPPED, "bad_chain", n * 10),
                Sample::labelled(&DROPPED, "oversize", 0),
            ],
        };
        Counters {
            device: "test",
            queues: vec![q(0, 3), q(1, 4)],
        }
    }

    #[test]
    fn totals_sum_each_metric_and_label_over_queues() {
        let c = two_queues();

        let t = c.totals();

        let values: Vec<_> = t
            .iter()
            .map(|s| (s.metric.name, s.label_value, s.value))
            .collect();
        assert_eq!(
            values,
            [
                ("requests", "", 7),
                ("in_flight", "", 2),
                ("dropped_frames", "bad_chain", 70),
                ("dropped_frames", "oversize", 0)
            ]
        );
    }

    #[test]
    fn json_has_device_queues_and_totals_with_labelled_objects() {
        let c = two_queues();

        let v: Value = serde_json::from_str(&to_json(&c)).unwrap();

        assert_eq!(v["device"], "test");
        assert_eq!(v["queues"][1]["queue"], 1);
        assert_eq!(v["queues"][1]["requests"], 4);
        assert_eq!(v["queues"][0]["dropped_frames"]["bad_chain"], 30);
        assert_eq!(v["totals"]["requests"], 7);
        assert_eq!(v["totals"]["dropped_frames"]["bad_chain"], 70);
        assert!(v["queues"][0].get("kind").is_none());
    }

    #[test]
    fn json_names_the_queue_kind_when_given() {
        let mut c = two_queues();
        c.queues[0].kind = Some("rx");

        let v: Value = serde_json::from_str(&to_json(&c)).unwrap();

        assert_eq!(v["queues"][0]["kind"], "rx");
    }

    #[test]
    fn prometheus_text_has_help_type_and_one_line_per_queue_and_label() {
        let c = two_queues();

        let text = to_prometheus(&c);

        let expected = "\
# HELP vmm_test_requests_total Requests taken.
# TYPE vmm_test_requests_total counter
vmm_test_requests_total{queue=\"0\"} 3
vmm_test_requests_total{queue=\"1\"} 4
# HELP vmm_test_in_flight Requests in flight.
# TYPE vmm_test_in_flight gauge
vmm_test_in_flight{queue=\"0\"} 1
vmm_test_in_flight{queue=\"1\"} 1
# HELP vmm_test_dropped_frames_total Frames dropped, by reason.
# TYPE vmm_test_dropped_frames_total counter
vmm_test_dropped_frames_total{queue=\"0\",reason=\"bad_chain\"} 30
vmm_test_dropped_frames_total{queue=\"0\",reason=\"oversize\"} 0
vmm_test_dropped_frames_total{queue=\"1\",reason=\"bad_chain\"} 40
vmm_test_dropped_frames_total{queue=\"1\",reason=\"oversize\"} 0
";
        assert_eq!(text, expected);
    }

    #[test]
    fn written_text_passes_the_shape_check() {
        let text = to_prometheus(&two_queues());

        assert_eq!(check_prometheus_text(&text), Ok(8));
    }

    #[test]
    fn shape_check_rejects_a_sample_without_type() {
        let text = "# HELP a_total A.\na_total{queue=\"0\"} 1\n";

        assert!(check_prometheus_text(text).is_err());
    }

    #[test]
    fn shape_check_rejects_a_value_that_is_not_a_number() {
        let text = "# HELP a A.\n# TYPE a gauge\na{queue=\"0\"} x\n";

        assert!(check_prometheus_text(text).is_err());
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
    }
}
