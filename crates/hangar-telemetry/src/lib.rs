//! Traces: Hangar's own spans and those its agents send, kept in the store for a while and
//! forwarded to an OTLP/HTTP endpoint when one is configured.
//!
//! Everything enters through one bounded queue ([`Telemetry`]): the OpenTelemetry SDK's
//! batch processor hands Hangar's spans to [`Exporter`], and `/v1/traces` hands over what
//! agents posted (already decoded by [`otlp::decode`]). One task stores each batch and
//! passes it to a forwarder task; a full queue drops the batch and counts it, so tracing
//! never slows a request down.

pub mod otlp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hangar_store::{SpanRow, TraceStore};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, status};
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::mpsc;

pub use otlp::Endpoint;

/// How traces are kept and where they go.
#[derive(Clone)]
pub struct Config {
    pub store: TraceStore,
    /// Forward every batch here too (OTLP/HTTP protobuf).
    pub endpoint: Option<Endpoint>,
    /// Spans older than this are dropped from the store.
    pub retention: Duration,
    /// The store keeps at most about this many bytes of spans (the newest).
    pub max_bytes: u64,
}

/// Where a batch of spans came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Hangar's own spans.
    Hangar,
    /// An agent's sandbox, attributed by Hangar (never by what the agent claims).
    Agent {
        agent: String,
        session: Option<String>,
    },
    /// A caller with an API key (an agent running elsewhere).
    Caller,
}

struct Batch {
    origin: Origin,
    request: ExportTraceServiceRequest,
}

/// Counters of what happened to spans, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub dropped: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failed: AtomicU64,
}

/// The queue into the trace store (cheap to clone). Made before the store is open (the
/// tracing layer is set up first); what is queued waits for [`Telemetry::start`].
#[derive(Clone)]
pub struct Telemetry {
    tx: mpsc::Sender<Batch>,
    rx: Arc<std::sync::Mutex<Option<mpsc::Receiver<Batch>>>>,
    store: Arc<std::sync::OnceLock<TraceStore>>,
    counters: Arc<Counters>,
}

/// The queue is full: the batch was not taken (callers answer 503 with `Retry-After`).
#[derive(Debug, thiserror::Error)]
#[error("the trace queue is full")]
pub struct Busy;

const QUEUE: usize = 1024;
const FORWARD_QUEUE: usize = 256;
const PRUNE_EVERY: Duration = Duration::from_secs(30);

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let (tx, rx) = mpsc::channel(QUEUE);
        Telemetry {
            tx,
            rx: Arc::new(std::sync::Mutex::new(Some(rx))),
            store: Default::default(),
            counters: Default::default(),
        }
    }

    /// Starts the store-and-forward tasks (on the current tokio runtime); once.
    pub fn start(&self, cfg: Config) {
        let Some(rx) = self.rx.lock().unwrap().take() else {
            return;
        };
        let _ = self.store.set(cfg.store.clone());
        let forward = cfg.endpoint.clone().map(|endpoint| {
            let (ftx, frx) = mpsc::channel(FORWARD_QUEUE);
            tokio::spawn(otlp::forward(endpoint, frx, self.counters.clone()));
            ftx
        });
        tokio::spawn(keep(cfg, rx, forward, self.counters.clone()));
    }

    /// The tracer provider whose batches come here, named `hangar` (or
    /// `OTEL_SERVICE_NAME`), exporting every second unless `OTEL_BSP_SCHEDULE_DELAY` says
    /// otherwise. Also installs the W3C trace-context and baggage propagators.
    pub fn provider(&self) -> opentelemetry_sdk::trace::SdkTracerProvider {
        use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
        use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor};
        opentelemetry::global::set_text_map_propagator(
            opentelemetry::propagation::TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]),
        );
        let mut batch = BatchConfigBuilder::default();
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            batch = batch.with_scheduled_delay(Duration::from_secs(1));
        }
        let processor = BatchSpanProcessor::builder(self.exporter())
            .with_batch_config(batch.build())
            .build();
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("hangar");
        }
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_span_processor(processor)
            .build()
    }

    /// Takes a batch of spans; never waits.
    pub fn accept(&self, origin: Origin, request: ExportTraceServiceRequest) -> Result<(), Busy> {
        self.tx.try_send(Batch { origin, request }).map_err(|_| {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            Busy
        })
    }

    /// The SDK exporter that feeds Hangar's own spans into the queue.
    pub fn exporter(&self) -> Exporter {
        Exporter {
            telemetry: self.clone(),
            resource: Default::default(),
        }
    }

    /// The trace store, once started.
    pub fn store(&self) -> Option<&TraceStore> {
        self.store.get()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Hangar's spans, from the OpenTelemetry SDK's batch processor into [`Telemetry`].
#[derive(Debug)]
pub struct Exporter {
    telemetry: Telemetry,
    resource: ResourceAttributesWithSchema,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl SpanExporter for Exporter {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        let r = self
            .telemetry
            .accept(Origin::Hangar, request)
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()));
        std::future::ready(r)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.resource = resource.into();
    }
}

/// Stores every batch, hands it to the forwarder, and prunes the store now and then.
async fn keep(
    cfg: Config,
    mut rx: mpsc::Receiver<Batch>,
    forward: Option<mpsc::Sender<ExportTraceServiceRequest>>,
    counters: Arc<Counters>,
) {
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(mut batch) = batch else { return };
                if let Origin::Agent { agent, session } = &batch.origin {
                    label(&mut batch.request, agent, session.as_deref());
                }
                let rows = flatten(&batch.request, &batch.origin);
                match cfg.store.put_spans(&rows, unix_now()).await {
                    Ok(()) => {
                        counters.stored.fetch_add(rows.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, spans = rows.len(), "cannot store spans"),
                }
                if let Some(tx) = &forward {
                    if tx.try_send(batch.request).is_err() {
                        counters.forward_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = prune.tick() => {
                let older = unix_now() - cfg.retention.as_secs() as i64;
                match cfg.store.prune_spans(older, cfg.max_bytes as i64).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(spans = n, "old spans pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune spans"),
                }
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Marks an agent's spans with the agent and session Hangar attributed them to (what an
/// external backend filters on), replacing whatever the agent claimed for those keys.
fn label(request: &mut ExportTraceServiceRequest, agent: &str, session: Option<&str>) {
    for rs in &mut request.resource_spans {
        let resource = rs.resource.get_or_insert_with(Default::default);
        resource
            .attributes
            .retain(|kv| kv.key != "hangar.agent.name" && kv.key != "hangar.session.id");
        resource
            .attributes
            .push(string_kv("hangar.agent.name", agent));
        if let Some(s) = session {
            resource.attributes.push(string_kv("hangar.session.id", s));
        }
        if !resource
            .attributes
            .iter()
            .any(|kv| kv.key == "service.name")
        {
            resource.attributes.push(string_kv("service.name", agent));
        }
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An OTLP request as store rows. Hangar's own spans name their agent and session in
/// attributes; an agent's spans get the ones Hangar attributed them to.
pub fn flatten(request: &ExportTraceServiceRequest, origin: &Origin) -> Vec<SpanRow> {
    let mut rows = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| &r.attributes[..])
            .unwrap_or(&[]);
        let service = find_str(resource, "service.name").unwrap_or("unknown_service");
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                if s.trace_id.len() != 16 || s.span_id.len() != 8 {
                    continue;
                }
                let attributes = attributes_json(&s.attributes);
                let (agent, session) = match origin {
                    Origin::Agent { agent, session } => (Some(agent.clone()), session.clone()),
                    Origin::Hangar | Origin::Caller => (
                        find_str(&s.attributes, "gen_ai.agent.name").map(str::to_owned),
                        find_str(&s.attributes, "hangar.session.id").map(str::to_owned),
                    ),
                };
                let (status, message) = match &s.status {
                    Some(st) => (
                        match status::StatusCode::try_from(st.code) {
                            Ok(status::StatusCode::Ok) => "ok",
                            Ok(status::StatusCode::Error) => "error",
                            _ => "unset",
                        },
                        (!st.message.is_empty()).then(|| st.message.clone()),
                    ),
                    None => ("unset", None),
                };
                rows.push(SpanRow {
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: (s.parent_span_id.len() == 8)
                        .then(|| hex::encode(&s.parent_span_id)),
                    name: s.name.clone(),
                    service: service.to_owned(),
                    kind: match span::SpanKind::try_from(s.kind) {
                        Ok(span::SpanKind::Server) => "server",
                        Ok(span::SpanKind::Client) => "client",
                        Ok(span::SpanKind::Producer) => "producer",
                        Ok(span::SpanKind::Consumer) => "consumer",
                        _ => "internal",
                    }
                    .to_owned(),
                    start_us: (s.start_time_unix_nano / 1000) as i64,
                    end_us: (s.end_time_unix_nano.max(s.start_time_unix_nano) / 1000) as i64,
                    status: status.to_owned(),
                    status_message: message,
                    agent,
                    session,
                    attributes,
                });
            }
        }
    }
    rows
}

fn find_str<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

fn attributes_json(attrs: &[KeyValue]) -> serde_json::Value {
    serde_json::Value::Object(
        attrs
            .iter()
            .map(|kv| (kv.key.clone(), any_json(kv.value.as_ref())))
            .collect(),
    )
}

fn any_json(v: Option<&AnyValue>) -> serde_json::Value {
    use serde_json::Value as J;
    match v.and_then(|v| v.value.as_ref()) {
        None => J::Null,
        Some(any_value::Value::StringValue(s)) => J::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => J::Bool(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        Some(any_value::Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(J::Null, J::Number)
        }
        Some(any_value::Value::ArrayValue(a)) => {
            J::Array(a.values.iter().map(|v| any_json(Some(v))).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => attributes_json(&l.values),
        Some(any_value::Value::BytesValue(b)) => J::String(hex::encode(b)),
        Some(_) => J::Null,
    }
}

#[cfg(test)]
mod tests;
