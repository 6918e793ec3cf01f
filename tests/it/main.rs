mod compose;
mod demo;
mod dlq;
mod docs;
#[path = "../../examples/fleet/mod.rs"]
#[allow(dead_code)]
mod fleet;
mod fleetwide;
mod fuzz;
mod hostile;
mod isolation;
mod ledger;
mod observe;
mod operate;
mod pacing;
mod pipeline;
mod poison;
mod property;
mod python;
mod scale;
mod schema;
mod secrets;
mod shutdown;
mod sim;
mod soak;
mod step;
mod support;
mod tenancy;
