use super::*;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

fn request(service: Option<&str>, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: service
                    .map(|s| vec![string_kv("service.name", s)])
                    .unwrap_or_default(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn span(trace: u8, id: u8, parent: Option<u8>, name: &str, attrs: Vec<KeyValue>) -> Span {
    Span {
        trace_id: vec![trace; 16],
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: name.into(),
        kind: span::SpanKind::Client as i32,
        start_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(id) * 1000,
        end_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(id) * 1000 + 5_000_000,
        attributes: attrs,
        status: Some(Status {
            code: status::StatusCode::Error as i32,
            message: "boom".into(),
        }),
        ..Default::default()
    }
}

#[test]
fn own_spans_name_their_agent_and_session_in_attributes() {
    let req = request(
        Some("hangar"),
        vec![span(
            1,
            2,
            None,
            "invoke_agent notes:1",
            vec![
                string_kv("gen_ai.agent.name", "notes"),
                string_kv("hangar.session.id", "sess_1"),
                KeyValue {
                    key: "gen_ai.usage.input_tokens".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(42)),
                    }),
                    ..Default::default()
                },
            ],
        )],
    );
    let rows = flatten(&req, &Origin::Hangar);
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.trace_id, "01".repeat(16));
    assert_eq!(r.span_id, "02".repeat(8));
    assert_eq!(r.parent_span_id, None);
    assert_eq!(r.service, "hangar");
    assert_eq!(r.kind, "client");
    assert_eq!(
        (r.status.as_str(), r.status_message.as_deref()),
        ("error", Some("boom"))
    );
    assert_eq!(r.agent.as_deref(), Some("notes"));
    assert_eq!(r.session.as_deref(), Some("sess_1"));
    assert_eq!(r.attributes["gen_ai.usage.input_tokens"], 42);
    assert_eq!(r.end_us - r.start_us, 5000);
}

#[test]
fn agent_spans_are_attributed_by_hangar_not_by_their_claims() {
    let mut req = request(
        None,
        vec![
            span(
                1,
                3,
                Some(2),
                "tool",
                vec![string_kv("hangar.session.id", "sess_other")],
            ),
            // Malformed ids are left out.
            Span {
                trace_id: vec![1; 3],
                ..span(1, 4, None, "bad", vec![])
            },
        ],
    );
    req.resource_spans[0]
        .resource
        .as_mut()
        .unwrap()
        .attributes
        .push(string_kv("hangar.session.id", "sess_forged"));
    let origin = Origin::Agent {
        agent: "notes".into(),
        session: Some("sess_1".into()),
    };
    label(&mut req, "notes", Some("sess_1"));
    let rows = flatten(&req, &origin);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].session.as_deref(), Some("sess_1"));
    assert_eq!(
        rows[0].service, "notes",
        "service.name defaults to the agent"
    );
    assert_eq!(
        rows[0].parent_span_id.as_deref(),
        Some("02".repeat(8).as_str())
    );
    let resource = &req.resource_spans[0].resource.as_ref().unwrap().attributes;
    let sessions: Vec<_> = resource
        .iter()
        .filter(|kv| kv.key == "hangar.session.id")
        .collect();
    assert_eq!(sessions.len(), 1);
    assert_eq!(find_str(resource, "hangar.session.id"), Some("sess_1"));
}

#[test]
fn decode_takes_protobuf_json_and_gzip_within_bounds() {
    use prost::Message;
    let req = request(Some("svc"), vec![span(7, 8, None, "x", vec![])]);
    let bytes = req.encode_to_vec();
    let (got, f) = otlp::decode(Some("application/x-protobuf"), None, &bytes, 1 << 20).unwrap();
    assert_eq!((got, f), (req.clone(), otlp::Format::Protobuf));

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &bytes).unwrap();
    let gz = gz.finish().unwrap();
    let (got, _) =
        otlp::decode(Some("application/x-protobuf"), Some("gzip"), &gz, 1 << 20).unwrap();
    assert_eq!(got, req);
    // A bomb stops at the bound.
    let err = otlp::decode(Some("application/x-protobuf"), Some("gzip"), &gz, 16).unwrap_err();
    assert!(matches!(err, otlp::DecodeError::TooLarge(16)), "{err}");

    // OTLP/JSON: hex ids, integer enums, string nanoseconds.
    let json = br#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"py"}}]},
        "scopeSpans":[{"scope":{},"spans":[{"traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174",
        "name":"tool","kind":3,"startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000",
        "attributes":[{"key":"n","value":{"intValue":"3"}}],"unknownField":1}]}]}]}"#;
    let (got, f) =
        otlp::decode(Some("application/json; charset=utf-8"), None, json, 1 << 20).unwrap();
    assert_eq!(f, otlp::Format::Json);
    let rows = flatten(&got, &Origin::Caller);
    assert_eq!(rows[0].trace_id, "5b8efff798038103d269b633813fc60c");
    assert_eq!(rows[0].attributes["n"], 3);
    assert_eq!(rows[0].end_us - rows[0].start_us, 1000);

    for (ct, ce) in [
        (Some("text/plain"), None),
        (None, None),
        (Some("application/json"), Some("br")),
    ] {
        assert!(otlp::decode(ct, ce, b"{}", 1024).is_err());
    }
    assert!(matches!(
        otlp::decode(Some("application/x-protobuf"), None, b"\xff\xff\xff", 1024),
        Err(otlp::DecodeError::Invalid(_))
    ));
    assert_eq!(
        otlp::decode(Some("application/json"), None, b"", 1024)
            .unwrap()
            .0,
        Default::default()
    );
}

#[test]
fn the_endpoint_follows_the_otlp_exporter_rules() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(Endpoint::resolve(None, env(&[])).unwrap(), None);
    assert_eq!(
        Endpoint::resolve(None, env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])).unwrap(),
        None
    );
    let e = Endpoint::resolve(
        None,
        env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(e.url, "http://c:4318/v1/traces");
    let e = Endpoint::resolve(
        None,
        env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b, x=1"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(e.url, "http://t:1/custom");
    assert_eq!(
        e.headers,
        vec![("api-key".into(), "a b".into()), ("x".into(), "1".into())]
    );
    assert!(e.gzip);
    let e = Endpoint::resolve(
        Some("https://flag:4318"),
        env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom")]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(e.url, "https://flag:4318/v1/traces");
    assert!(Endpoint::resolve(Some("ftp://x"), env(&[])).is_err());
    assert!(Endpoint::resolve(
        Some("http://x"),
        env(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")])
    )
    .is_err());
}

#[tokio::test]
async fn batches_are_stored_found_by_session_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = hangar_store::TraceStore::open(&dir.path().join("t.db"))
        .await
        .unwrap();
    let t = Telemetry::new();
    t.start(Config {
        store: store.clone(),
        endpoint: None,
        retention: Duration::from_secs(3600),
        max_bytes: 1 << 20,
    });
    t.accept(
        Origin::Hangar,
        request(
            Some("hangar"),
            vec![span(
                9,
                1,
                None,
                "invoke_agent a:1",
                vec![
                    string_kv("gen_ai.agent.name", "a"),
                    string_kv("hangar.session.id", "sess_9"),
                ],
            )],
        ),
    )
    .unwrap();
    t.accept(
        Origin::Agent {
            agent: "a".into(),
            session: Some("sess_9".into()),
        },
        request(None, vec![span(9, 2, Some(1), "agent work", vec![])]),
    )
    .unwrap();
    let filter = hangar_store::TraceFilter {
        session: Some("sess_9"),
        limit: 10,
        ..Default::default()
    };
    let mut traces = Vec::new();
    for _ in 0..100 {
        traces = store.traces(&filter).await.unwrap();
        if traces.first().is_some_and(|t| t.spans == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(traces.len(), 1, "{traces:?}");
    assert_eq!(traces[0].name, "invoke_agent a:1");
    assert!(traces[0].error);
    let spans = store.trace(&traces[0].trace_id).await.unwrap();
    assert_eq!(spans.len(), 2);
    assert_eq!(spans[1].service, "a");
    // Over the size bound, the oldest go first.
    let gone = store.prune_spans(0, 1).await.unwrap();
    assert_eq!(gone, 2);
    assert!(store.trace(&traces[0].trace_id).await.unwrap().is_empty());
}
