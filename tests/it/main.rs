mod observe;
mod pipeline;
mod shutdown;
mod sim;
mod support;
mod tenancy;
