//! herald: a multi-tenant Microsoft Teams notification worker.
pub mod sim;
