mod pipeline;
mod support;
