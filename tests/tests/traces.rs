//! OpenTelemetry traces: the real binaries export spans over OTLP/HTTP (protobuf) to a
//! receiver in the test, which decodes them. One relayed request with a user `traceparent`
//! gives one trace: the server's request span (child of the user's span) with its pickup and
//! response-head waits, the agent's request span (child of the server's), and a backend
//! that sees the agent's span as its parent.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use relay_tests::procs::{binary, Proc};
use relay_tests::*;

/// One exported span: service, name, ids (hex), string attributes.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: Vec<(String, String)>,
}

fn hex(b: &[u8]) -> String {
    relay_common::id::hex(b)
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// An OTLP/HTTP receiver: decodes every `POST /v1/traces` into spans.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Got>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let addr = backend(move |req: Request<hyper::body::Incoming>| {
        let sink = sink.clone();
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            let body = body_bytes(req.into_body()).await.unwrap();
            let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
            for rs in export.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .map(|a| text(&a.value))
                    .unwrap_or_default();
                for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                    sink.lock().unwrap().push(Got {
                        service: service.clone(),
                        name: span.name,
                        trace: hex(&span.trace_id),
                        id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        attrs: span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(&a.value)))
                            .collect(),
                    });
                }
            }
            Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(empty())
                .unwrap()
        }
    })
    .await;
    (addr, got)
}

/// A binary exporting to `otlp` and flushing every 50 ms.
fn traced(bin: &str, args: &[&str], otlp: std::net::SocketAddr) -> Command {
    let mut cmd = Command::new(binary(bin));
    cmd.args(args)
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        .env("RELAY_LOG", "info")
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    cmd
}

#[tokio::test]
async fn one_relayed_request_is_one_trace_across_server_agent_and_backend() {
    let (otlp, spans) = receiver().await;
    let (backend_addr, seen) = recording_backend().await;
    let mut server = Proc::spawn(traced(
        "relay-server",
        &[
            "--listen",
            "127.0.0.1:0",
            "--agent-token",
            &format!("*={TOKEN}"),
        ],
        otlp,
    ));
    let relay = server.wait_addr("relay-server listening on http://");
    let _agent = Proc::spawn(traced(
        "relay-client",
        &[
            "--relay-url",
            &format!("http://{relay}"),
            "--name",
            "traced",
            "--backend-url",
            &format!("http://{backend_addr}"),
            "--token",
            TOKEN,
        ],
        otlp,
    ));
    server.wait_line("relay-client connected");

    let (user_trace, user_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let resp = client()
        .request(
            Request::get(format!("http://{relay}/client/traced/hello"))
                .header("traceparent", format!("00-{user_trace}-{user_span}-01"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let find = |service: &str, name: &str| {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.service == service && s.name == name && s.trace == user_trace)
            .cloned()
    };
    let wait = |service: &'static str, name: &'static str| {
        let find = &find;
        eventually(Duration::from_secs(20), name, move || {
            std::future::ready(find(service, name))
        })
    };
    let request = wait("relay-server", "request").await;
    let pickup = wait("relay-server", "pickup").await;
    let head = wait("relay-server", "response head").await;
    let agent = wait("relay-client", "request").await;
    // The server continues the user's trace; its waits are its children.
    assert_eq!(request.parent, user_span);
    assert_eq!(pickup.parent, request.id);
    assert_eq!(head.parent, request.id);
    let attr = |s: &Got, k: &str| {
        s.attrs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(attr(&request, "backend"), "traced", "{request:?}");
    assert_eq!(attr(&request, "status"), "200", "{request:?}");
    assert_eq!(attr(&request, "method"), "GET", "{request:?}");
    // The agent's span is the server's child, and the backend's parent.
    assert_eq!(agent.parent, request.id);
    assert_eq!(attr(&agent, "path"), "/hello", "{agent:?}");
    assert_eq!(
        attr(&request, "path"),
        "/client/traced/hello",
        "{request:?}"
    );
    let seen = seen.lock().unwrap();
    let traceparent = seen
        .iter()
        .find_map(|s| {
            s.headers
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .expect("the backend got a traceparent");
    assert_eq!(
        traceparent,
        format!("00-{user_trace}-{}-01", agent.id),
        "the backend's parent is the agent's span"
    );
}
