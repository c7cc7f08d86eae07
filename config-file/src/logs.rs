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
