//! The system driven from outside, only through the gateway's HTTP API, as a
//! client would. Each test starts its own system on port 0 with a fresh
//! data directory, so tests run in parallel without sharing anything.

mod backlog;
mod bad_input;
mod bench;
mod cancel;
mod crash;
mod faults;
mod helpers;
mod rebuild;
mod saga;
