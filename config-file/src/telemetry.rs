//! OpenTelemetry traces over OTLP/HTTP (protobuf), shared by both binaries.
//!
//! Off unless an endpoint is configured (`--otlp-endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`): then no exporter, no layer and no header is touched, and
//! the request spans cost what they cost before. On, the request spans of each binary (the
//! tracing spans of its `relay_*` crates at `info`) are exported in batches, each user
//! request's trace continues the W3C `traceparent` it came with (or starts one), and the hop
//! to the next party carries this process's span as the new `traceparent`, so one trace
//! shows the user request, the wait for pickup, the response, and the agent's backend call.
//! Sampling is parent-based: a sampled caller's trace is always kept, new traces by
//! `--otlp-sample-ratio`.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Where and how traces are exported.
#[derive(Clone, Debug)]
pub struct Otlp {
    /// The collector's base URL (`http://collector:4318`); spans go to `/v1/traces` below it.
    pub endpoint: String,
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service: &'static str,
    /// Share of new traces kept (parent-based: a caller's decision wins).
    pub ratio: f64,
}

impl Otlp {
    /// The settings from the flag, or from `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` keeps
    /// tracing off.
    pub fn from_flags(endpoint: Option<&str>, service: &'static str, ratio: f64) -> Option<Self> {
        let env = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
        let endpoint = endpoint.map(str::to_owned).or(env)?;
        (!endpoint.trim().is_empty()).then_some(Otlp {
            endpoint,
            service,
            ratio,
        })
    }
}

/// Parses a sampling ratio between 0 and 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1")),
    }
}

static ON: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("--otlp-endpoint: {0}")]
pub struct TelemetryError(String);

/// The exporter and the tracing layer that feeds it (spans of the `relay_*` crates only).
pub fn layer<S>(cfg: &Otlp) -> Result<(impl tracing_subscriber::Layer<S>, Guard), TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let base = cfg.endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(cfg.service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.ratio,
        ))))
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer(cfg.service);
    let only_ours = tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span()
            && meta.target().starts_with("relay_")
            && *meta.level() <= tracing::Level::INFO
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(only_ours);
    ON.store(true, Ordering::Relaxed);
    Ok((layer, Guard(provider)))
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Continues the trace of a request's W3C `traceparent`/`tracestate` (Trace Context §3) in
/// `span`; without them `span` starts a new trace. A no-op while tracing is off.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if enabled() {
        let cx = TraceContextPropagator::new().extract(&Headers(headers));
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` the parent the next hop sees: `traceparent` (and `tracestate`) in `headers`
/// become `span`'s. A no-op while tracing is off (the caller's headers pass untouched).
pub fn hand_on(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if enabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
    }
}
