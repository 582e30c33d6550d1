//! Fault injection for the drills (`khala chaos`, docs/RELIABILITY.md): a loopback TCP
//! proxy with seeded per-connection faults ([`proxy`], [`plan`]).

pub mod plan;
pub mod proxy;

pub use plan::{ConnFault, FaultKind, FaultPlan};
pub use proxy::{FaultCounters, Proxy};
