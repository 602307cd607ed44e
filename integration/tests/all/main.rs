//! End-to-end tests: the real `wasmbox` and `wasmbox-worker` binaries over HTTP on loopback.
//! One binary, one module per topic.
#![allow(clippy::unwrap_used)]

mod admin;
mod cgroups;
mod chaos;
mod cli;
mod compiler;
mod components;
mod conformance;
mod deployment_lint;
mod drift;
mod engines;
mod faults;
mod hardening;
mod hostile;
mod http_hardening;
mod invoke;
mod limits;
mod load_balancer;
mod operations;
mod preopens;
mod sessions;
mod tenancy;
mod zygote;
