//! What the proxy does to each connection: a pure function of (seed, kinds, connection
//! index), so that a drill run can be replayed exactly from its seed.

use rand::{Rng, SeedableRng};
use rand::rngs::StdRng;
use std::time::Duration;

/// One kind of network fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Every chunk waits a fixed time before it is forwarded.
    Delay,
    /// Every chunk waits a random time (0..jitter) before it is forwarded.
    Jitter,
    /// Forwarding is capped at a number of bytes per second.
    Bandwidth,
    /// The connection is closed (FIN both ways) after a while.
    Drop,
    /// The client side is reset (SO_LINGER 0, RST) after a while.
    Reset,
    /// After a while (or from the start) nothing more is forwarded either way, and the
    /// connection stays open: a half-open connection.
    Blackhole,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [FaultKind::Delay, FaultKind::Jitter, FaultKind::Bandwidth, FaultKind::Drop, FaultKind::Reset, FaultKind::Blackhole];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Delay => "delay",
            FaultKind::Jitter => "jitter",
            FaultKind::Bandwidth => "bandwidth",
            FaultKind::Drop => "drop",
            FaultKind::Reset => "reset",
            FaultKind::Blackhole => "blackhole",
        }
    }

    pub fn parse(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the fault ends the connection's usefulness (the others only slow it).
    pub fn cuts(self) -> bool {
        matches!(self, FaultKind::Drop | FaultKind::Reset | FaultKind::Blackhole)
    }
}

/// What happens to one connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnFault {
    /// Added before each forwarded chunk.
    pub delay: Duration,
    /// Upper bound of a random extra wait per chunk (drawn from `jitter_seed`).
    pub jitter: Duration,
    pub jitter_seed: u64,
    /// Cap in bytes per second (each direction).
    pub bytes_per_sec: Option<u64>,
    /// A drop, reset or blackhole, and how long after accept it happens.
    pub cut: Option<(FaultKind, Duration)>,
}

impl ConnFault {
    pub fn is_clean(&self) -> bool {
        *self == ConnFault::default()
    }

    /// The kind this connection's fault counts as, if any.
    pub fn kind(&self) -> Option<FaultKind> {
        if let Some((k, _)) = self.cut {
            return Some(k);
        }
        if self.bytes_per_sec.is_some() {
            Some(FaultKind::Bandwidth)
        } else if !self.jitter.is_zero() {
            Some(FaultKind::Jitter)
        } else if !self.delay.is_zero() {
            Some(FaultKind::Delay)
        } else {
            None
        }
    }
}

/// A seeded schedule: the first `faulted` connections each get one fault of `kinds`
/// (in turn, starting at a seeded offset, so every kind appears once `faulted >=
/// kinds.len()`), with seeded parameters; later connections pass untouched, so that a
/// drill always ends converged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPlan {
    pub seed: u64,
    pub kinds: Vec<FaultKind>,
    pub faulted: u64,
    /// Range of the delay before a drop, reset or blackhole (ms).
    pub cut_after_ms: (u64, u64),
    /// Range of a bandwidth cap (KiB/s).
    pub bandwidth_kib: (u64, u64),
}

impl FaultPlan {
    pub fn new(seed: u64, kinds: &[FaultKind], faulted: u64) -> FaultPlan {
        FaultPlan { seed, kinds: kinds.to_vec(), faulted, cut_after_ms: (300, 2_500), bandwidth_kib: (64, 512) }
    }

    /// A plan that touches nothing.
    pub fn clean() -> FaultPlan {
        FaultPlan::new(0, &[], 0)
    }

    pub fn with_cut_after_ms(mut self, lo: u64, hi: u64) -> FaultPlan {
        self.cut_after_ms = (lo, hi.max(lo));
        self
    }

    pub fn with_bandwidth_kib(mut self, lo: u64, hi: u64) -> FaultPlan {
        self.bandwidth_kib = (lo.max(1), hi.max(lo.max(1)));
        self
    }

    /// The fault of connection `index` (from 0, in accept order).
    pub fn fault_for(&self, index: u64) -> ConnFault {
        if self.kinds.is_empty() || index >= self.faulted {
            return ConnFault::default();
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let offset = StdRng::seed_from_u64(self.seed).gen_range(0..self.kinds.len() as u64);
        let kind = self.kinds[((index + offset) % self.kinds.len() as u64) as usize];
        let (lo, hi) = self.cut_after_ms;
        let after = Duration::from_millis(rng.gen_range(lo..=hi));
        match kind {
            FaultKind::Delay => ConnFault { delay: Duration::from_millis(rng.gen_range(20..=150)), ..ConnFault::default() },
            FaultKind::Jitter => ConnFault { jitter: Duration::from_millis(rng.gen_range(20..=200)), jitter_seed: rng.gen(), ..ConnFault::default() },
            FaultKind::Bandwidth => ConnFault { bytes_per_sec: Some(rng.gen_range(self.bandwidth_kib.0..=self.bandwidth_kib.1) * 1024), ..ConnFault::default() },
            FaultKind::Drop | FaultKind::Reset => ConnFault { cut: Some((kind, after)), ..ConnFault::default() },
            // Half the blackholes swallow the connection from its first byte (a handshake
            // that never answers), half stall an established one.
            FaultKind::Blackhole => {
                let after = if rng.gen_bool(0.5) { Duration::ZERO } else { after };
                ConnFault { cut: Some((kind, after)), ..ConnFault::default() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = FaultPlan::new(42, &FaultKind::ALL, 50);
        let b = FaultPlan::new(42, &FaultKind::ALL, 50);
        let c = FaultPlan::new(43, &FaultKind::ALL, 50);
        let of = |p: &FaultPlan| (0..50).map(|i| p.fault_for(i)).collect::<Vec<_>>();
        assert_eq!(of(&a), of(&b));
        assert_ne!(of(&a), of(&c));
    }

    #[test]
    fn every_kind_appears_and_later_connections_are_clean() {
        for seed in 0..20 {
            let plan = FaultPlan::new(seed, &FaultKind::ALL, 6);
            let mut kinds: Vec<_> = (0..6).map(|i| plan.fault_for(i).kind().expect("a fault")).collect();
            kinds.sort();
            assert_eq!(kinds, FaultKind::ALL.to_vec(), "seed {seed}");
            assert!((6..100).all(|i| plan.fault_for(i).is_clean()));
        }
    }

    #[test]
    fn parameters_stay_in_their_ranges() {
        let plan = FaultPlan::new(7, &FaultKind::ALL, 600).with_cut_after_ms(100, 200);
        for i in 0..600 {
            let f = plan.fault_for(i);
            assert!(f.delay <= Duration::from_millis(150) && f.jitter <= Duration::from_millis(200));
            assert!(f.bytes_per_sec.is_none_or(|b| (64 * 1024..=512 * 1024).contains(&b)));
            if let Some((kind, after)) = f.cut {
                let zero_blackhole = kind == FaultKind::Blackhole && after.is_zero();
                assert!(zero_blackhole || (Duration::from_millis(100)..=Duration::from_millis(200)).contains(&after), "{f:?}");
            }
        }
    }

    #[test]
    fn a_clean_plan_touches_nothing_and_names_round_trip() {
        assert!((0..10).all(|i| FaultPlan::clean().fault_for(i).is_clean()));
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
        }
    }
}
