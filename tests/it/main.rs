mod observe;
mod pipeline;
mod property;
mod shutdown;
mod sim;
mod support;
mod tenancy;
