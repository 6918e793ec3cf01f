//! herald: a multi-tenant Microsoft Teams notification worker.
//!
//! Producers publish notification jobs to RabbitMQ; workers resolve **the
//! job's own organization's** Teams integration from MongoDB, send through the
//! Bot Framework Connector with retries, and dead-letter what cannot be
//! delivered with a reason an operator can act on. See `docs/contract.md` for
//! the names everything relies on.
//!
//! # Layout
//! - [`settings`]: typed settings from embedded defaults, a file and `HERALD_` env.
//! - [`job`]: the wire job parsed at the edge into a validated [`job::Job`].
//! - [`outcome`]: dead-letter reasons, the one error classifier, the retry schedule.
//! - [`rabbitmq`]: topology, confirmed publishing, signed and bounded `x-herald-*` headers.
//! - [`mongo`]: org_integrations, conversations, the scoped, owned deliveries ledger, the fleet's leases.
//! - [`secrets`]: bot secrets: sealed at rest with the key ring, or referenced within the organization's own scope.
//! - [`teams`]: tokens, the service-URL allowlist, the Connector client, cards.
//! - [`worker`]: the step `Pipeline::process(incoming) -> Disposition`, the settler, the
//!   fleet (router, shards, leases), lanes (one conversation in order), the consume loop.
//! - [`producer`]: publishing jobs with publisher confirms (the Rust producer API).
//! - [`cli`]: the `herald` command line.
//! - [`dlq`]: reading the dead-letter queue without changing it.
//! - [`metrics`]: the one metrics struct, rendered for Prometheus.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`telemetry`]: logging setup.
//! - [`text`]: bounded text for headers, logs and errors.
//!
//! Teams' published rate limits live in the `teams-limits` crate (shared with
//! the simulator); the simulator, `teams-sim`, is its own crate, a
//! dev-dependency only.

pub mod cli;
pub mod dlq;
pub mod gateway;
pub mod http;
pub mod job;
pub mod metrics;
pub mod mongo;
pub mod outcome;
pub mod producer;
pub mod rabbitmq;
pub mod secrets;
pub mod settings;
pub mod teams;
pub mod telemetry;
pub mod text;
pub mod worker;
