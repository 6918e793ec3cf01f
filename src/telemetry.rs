//! Logging and tracing: JSON logs by default (human-readable on a terminal),
//! one OpenTelemetry span per job continuing the producer's W3C
//! `traceparent`, and OTLP/HTTP export when an endpoint is configured.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::{LogFormat, Settings};

/// Keeps the tracer provider alive; flushes spans when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Install the global subscriber. `RUST_LOG` wins over the configured filter.
pub fn init(settings: &Settings) -> Telemetry {
    let mut provider = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(settings.telemetry.service_name.clone()).build());
    let endpoint = settings.telemetry.otlp_endpoint.trim_end_matches('/');
    let mut export_error = None;
    if !endpoint.is_empty() {
        let url = if endpoint.ends_with("/v1/traces") { endpoint.to_owned() } else { format!("{endpoint}/v1/traces") };
        match opentelemetry_otlp::SpanExporter::builder().with_http().with_endpoint(url).build() {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(err) => export_error = Some(err.to_string()),
        }
    }
    let provider = provider.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("herald"));

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log.filter));
    let json = match settings.log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = if json {
        let fmt = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr);
        registry.with(fmt).try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().compact().with_writer(std::io::stderr)).try_init()
    };
    if let Some(err) = export_error {
        tracing::error!(error = %err, endpoint = %endpoint, "OTLP export disabled: the exporter could not be built");
    }
    Telemetry { provider }
}

struct One<'a>(Option<&'a str>);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key == "traceparent" { self.0 } else { None }
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct Out(Option<String>);

impl Injector for Out {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// Make `span` continue the trace of a W3C `traceparent`, and return the
/// trace id the span belongs to (for log lines), if there is one.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) -> Option<String> {
    if traceparent.is_some() {
        let parent = TraceContextPropagator::new().extract(&One(traceparent));
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let otel = context.span();
    let span_context = otel.span_context();
    if span_context.is_valid() {
        return Some(span_context.trace_id().to_string());
    }
    // No OpenTelemetry layer installed (a library user, a test): the producer's id still counts.
    traceparent.and_then(|t| t.split('-').nth(1)).filter(|id| id.len() == 32).map(str::to_owned)
}

/// The W3C `traceparent` of the current span, for a message being published.
pub fn current_traceparent() -> Option<String> {
    let mut out = Out(None);
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut out);
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_goes_out_with_the_current_span_and_comes_back_in() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("job");
            let trace_id = continue_trace(&span, Some(incoming));
            assert_eq!(trace_id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
            let _entered = span.enter();
            let outgoing = current_traceparent().expect("a traceparent for the current span");
            assert!(outgoing.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{outgoing}");
            assert!(!outgoing.contains("00f067aa0ba902b7"), "a child span of its own: {outgoing}");
        });
    }

    #[test]
    fn without_a_tracing_layer_the_producers_trace_id_is_still_reported() {
        let span = tracing::Span::none();
        assert_eq!(
            continue_trace(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(continue_trace(&span, None), None);
    }
}
