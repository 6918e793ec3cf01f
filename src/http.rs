//! The worker's HTTP endpoint: `/healthz`, `/readyz`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Gauges;
use crate::worker::Pipeline;

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the consumer is active (so the broker is connected) and MongoDB answers.
async fn readyz(State(pipeline): State<Arc<Pipeline>>) -> impl IntoResponse {
    if !pipeline.metrics.is_consuming() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not consuming the work queue");
    }
    match tokio::time::timeout(Duration::from_secs(2), pipeline.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "MongoDB does not answer"),
    }
}

async fn metrics(State(pipeline): State<Arc<Pipeline>>) -> impl IntoResponse {
    let (cache_hits, cache_misses) = pipeline.resolver.cache_stats();
    let (mongodb_reads, mongodb_writes) = pipeline.store.op_counts();
    let gauges = Gauges { token_requests: pipeline.teams.token_requests(), cache_hits, cache_misses, mongodb_reads, mongodb_writes };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], pipeline.metrics.render(&gauges))
}

/// Serve until `shutdown`. Returns the bound address once listening.
pub async fn serve(listen: &str, pipeline: Arc<Pipeline>, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app =
        Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics)).with_state(pipeline);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    });
    Ok(addr)
}
