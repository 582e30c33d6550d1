//! The connection's life: connecting, the `hello` handshake, subscribed, backing off
//! after a failure, stopped.

use crate::backoff;
use khala_proto::v1::ConnectionState;
use std::time::{Duration, Instant};

/// How long the server may take to answer `hello` once connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// No connection, none being made: the next tick connects.
    Idle,
    /// A connection is being opened; `hello` is sent once it reports in.
    Connecting { since: Instant },
    /// Connected; `hello` is sent once the connection reports this client's identity,
    /// and must be answered by `deadline`.
    Handshaking { deadline: Instant, hello_sent: bool },
    /// `hello` answered; `subscribed` once the first subscription rows are in.
    Up { subscribed: bool },
    /// After a failure, waiting until `until` to connect again.
    Backoff { until: Instant, state: ConnectionState },
    /// Stopped for good (shutdown, or a failure retrying cannot fix).
    Stopped { state: ConnectionState },
}

/// The connection's life and its reconnect backoff.
#[derive(Debug)]
pub struct Session {
    pub phase: Phase,
    /// Failed attempts since the client was last live (the backoff attempt).
    attempt: u32,
    /// xorshift64 state, for the backoff's jitter (seeded by the shell: no clock or
    /// randomness is read here).
    rng: u64,
}

impl Session {
    pub fn new(seed: u64) -> Self {
        Session { phase: Phase::Idle, attempt: 0, rng: seed | 1 }
    }

    /// A draw from `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The attempt about to be made (1-based), as health shows it.
    pub fn attempt(&self) -> u32 {
        self.attempt + 1
    }

    /// A failed session: the delay before the next attempt.
    pub fn failed(&mut self) -> Duration {
        let unit = self.unit();
        let delay = backoff::delay(self.attempt, unit);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// The client reached live: the next failure starts the backoff over.
    pub fn live(&mut self) {
        self.attempt = 0;
    }

    pub fn subscribed(&self) -> bool {
        self.phase == Phase::Up { subscribed: true }
    }
}
