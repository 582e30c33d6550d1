//! Reading a Prometheus text exposition, as a SpacetimeDB server serves it on
//! `/v1/metrics`: its samples with their labels, and sums over the ones that match.
//! `khala status` reads the server's heap from it; `khala bench latency` reads what the
//! database's thread spent per reducer call (docs/BENCHMARKS.md).

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// The samples of an exposition; comment lines and lines that do not parse are skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    pub fn parse(text: &str) -> Samples {
        Samples(text.lines().filter_map(parse_line).collect())
    }

    /// The sum of the samples named `name` that carry every label in `labels`; `None`
    /// when there are none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).fold(None, |sum, s| Some(sum.unwrap_or(0.0) + s.value))
    }

    /// The samples named `name` that carry every label in `labels`.
    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| s.matches(name, labels))
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// Parses `key="value",...}` (after the opening brace); returns the labels and what
/// follows the closing brace. Values may hold `\"`, `\\` and `\n` escapes.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[eq + 1..][1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP spacetime_txn_cpu_time_sec cpu\n\
        # TYPE spacetime_txn_cpu_time_sec histogram\n\
        spacetime_txn_cpu_time_sec_sum{db=\"c200aa\",reducer=\"publish\",txn_type=\"Reducer\"} 0.25\n\
        spacetime_txn_cpu_time_sec_sum{db=\"c200aa\",reducer=\"publish\",txn_type=\"Update\"} 0.5\n\
        spacetime_txn_cpu_time_sec_sum{db=\"c200bb\",reducer=\"publish\",txn_type=\"Update\"} 9\n\
        spacetime_reducer_wait_time_sec_bucket{db=\"c200aa\",reducer=\"publish\",le=\"+Inf\"} 40\n\
        odd{note=\"a \\\"quoted\\\", \\\\ and\\nnewline}\"} 2 1700000000\n\
        jemalloc_allocated_bytes 1024\n\
        not a sample\n";

    #[test]
    fn sums_the_samples_that_carry_every_label_asked_for() {
        let s = Samples::parse(TEXT);
        assert_eq!(s.sum("spacetime_txn_cpu_time_sec_sum", &[("db", "c200aa")]), Some(0.75));
        assert_eq!(s.sum("spacetime_txn_cpu_time_sec_sum", &[("txn_type", "Update")]), Some(9.5));
        assert_eq!(s.sum("spacetime_txn_cpu_time_sec_sum", &[("db", "c200aa"), ("txn_type", "Update")]), Some(0.5));
        assert_eq!(s.sum("spacetime_txn_cpu_time_sec_sum", &[("db", "c200cc")]), None);
        assert_eq!(s.sum("spacetime_txn_cpu_time_sec", &[]), None, "a longer name is another metric");
        assert_eq!(s.sum("jemalloc_allocated_bytes", &[]), Some(1024.0));
    }

    #[test]
    fn reads_escaped_label_values_infinite_bounds_and_timestamps() {
        let s = Samples::parse(TEXT);
        let odd = s.matching("odd", &[]).next().expect("the odd sample");
        assert_eq!(odd.label("note"), Some("a \"quoted\", \\ and\nnewline}"));
        assert_eq!(odd.value, 2.0);
        let bucket = s.matching("spacetime_reducer_wait_time_sec_bucket", &[]).next().expect("the bucket");
        assert_eq!(bucket.label("le"), Some("+Inf"));
        assert_eq!(s.0.len(), 6, "comments and the line that is not a sample are skipped");
    }
}
