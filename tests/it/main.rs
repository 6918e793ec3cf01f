mod observe;
mod pipeline;
mod property;
mod secrets;
mod shutdown;
mod sim;
mod support;
mod tenancy;
