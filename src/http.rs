//! The worker's HTTP endpoint: `/healthz`, `/readyz`, `/metrics`. It reads a
//! [`Health`] handle and knows nothing of the pipeline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Gauges, Metrics};
use crate::mongo::Store;

/// What the endpoint reads: the metrics, MongoDB for readiness, and the
/// values other parts own (read when rendering).
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the consumer is active (so the broker is connected) and MongoDB answers.
async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if !health.metrics.is_consuming() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not consuming the work queue");
    }
    match tokio::time::timeout(Duration::from_secs(2), health.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "MongoDB does not answer"),
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], health.metrics.render(&(health.gauges)()))
}

/// Serve until `shutdown`. Returns the bound address once listening.
pub async fn serve(listen: &str, health: Health, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app =
        Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics)).with_state(health);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    });
    Ok(addr)
}
