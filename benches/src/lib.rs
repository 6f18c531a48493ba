//! Library parts of the benchmarks, shared by `directmq-bench` and the integration tests:
//! [`wan`], a UDP relay that emulates a WAN link between clients and a broker. Like the
//! rest of this package it sits above the client and may depend on anything; nothing in the
//! product depends on it.

pub mod wan;
