//! Log set-up shared by both binaries (`--log`, `--log-format`).

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, with the request span's fields (id, name, trace id).
    Json,
}

/// Installs the log subscriber: `filter` in tracing's EnvFilter syntax, lines on stderr; and
/// with `otlp` the trace exporter beside it (its guard flushes on drop).
pub fn init(
    filter: &str,
    format: LogFormat,
    otlp: Option<&crate::telemetry::Otlp>,
) -> Result<Option<crate::telemetry::Guard>, crate::telemetry::TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let lines: Boxed = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // The log filter applies to the lines only: the trace exporter has its own.
    let mut layers = vec![lines
        .with_filter(tracing_subscriber::EnvFilter::new(filter))
        .boxed()];
    let guard = match otlp {
        Some(cfg) => {
            let (traces, guard) = crate::telemetry::layer(cfg)?;
            layers.push(traces.boxed());
            Some(guard)
        }
        None => None,
    };
    tracing_subscriber::registry().with(layers).init();
    Ok(guard)
}

/// A line for the operator outside the log stream: the start-up announcements on stdout
/// (addresses, the zero-config agent command) and the fatal error on stderr. Text mode
/// prints `text` as it is (scripts wait for these lines); JSON mode prints one JSON object
/// instead, with `message` and `fields`, so that every line a binary writes parses.
pub struct Say {
    format: LogFormat,
}

impl Say {
    /// Lines in `format`.
    pub fn new(format: LogFormat) -> Self {
        Say { format }
    }

    /// An announcement on stdout.
    pub fn info(&self, text: &str, message: &str, fields: &[(&str, String)]) {
        println!("{}", self.render(text, "INFO", message, fields));
    }

    /// A fatal error on stderr.
    pub fn error(&self, text: &str, message: &str, fields: &[(&str, String)]) {
        eprintln!("{}", self.render(text, "ERROR", message, fields));
    }

    fn render(&self, text: &str, level: &str, message: &str, fields: &[(&str, String)]) -> String {
        match self.format {
            LogFormat::Text => text.to_owned(),
            LogFormat::Json => {
                let mut o = serde_json::Map::new();
                let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
                o.insert("timestamp".into(), now.to_string().into());
                o.insert("level".into(), level.into());
                o.insert("message".into(), message.into());
                for (k, v) in fields {
                    o.insert((*k).into(), v.clone().into());
                }
                serde_json::Value::Object(o).to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_parse_and_text_lines_stay() {
        let text = Say::new(LogFormat::Text).render("a b", "INFO", "m", &[]);
        assert_eq!(text, "a b");
        let json = Say::new(LogFormat::Json).render(
            "ignored",
            "INFO",
            "relay-server listening",
            &[("address", "http://127.0.0.1:8080".into())],
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["message"], "relay-server listening");
        assert_eq!(v["address"], "http://127.0.0.1:8080");
        assert_eq!(v["level"], "INFO");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
