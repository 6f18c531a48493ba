//! DirectMQ integration tests: real brokers (in this process or as child processes), real
//! QUIC with mutual TLS on loopback, real fsync'd segment files and index files.

mod bad_input;
mod cli;
mod consumers;
mod end_to_end;
mod hostile;
mod limits;
mod multi;
mod operations;
mod rebuild;
mod retention;
mod rotation;
mod security;
mod tokens;
mod wan;

/// The `directmq` command line under test (Cargo builds it for this test target).
pub fn directmq_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_directmq-under-test"))
}
