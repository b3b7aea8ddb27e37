//! Code shared by the examples (and the upgrade bench): the echo server and the load generator.
#![allow(dead_code)]

pub mod echo_server;
pub mod json;
pub mod load;
pub mod scenario;
