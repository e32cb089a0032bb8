//! Black-box tests of the `offload` binary: each starts a real server on a
//! free port (SQLite in a temporary directory) and talks to it over HTTP or
//! through the command line, as users and scripts do.

mod support;

mod any_input;
mod cli;
mod cluster;
mod http;
mod lifecycle;
mod worker_protocol;
