//! A target's admin state, set by an operator through the admin write API
//! (HAProxy's `set server state`): `enabled` (the default), `drain` (no new
//! connections, live ones finish, probes go on so its health stays known)
//! and `disabled` (no new connections and no probes: maintenance).
//!
//! Kept in the target's `Backend`, which a reload keeps for every target
//! that stays, so the state survives reloads; a target removed from the
//! config forgets it.

use std::sync::atomic::{AtomicU8, Ordering};

use prometheus_client::metrics::gauge::Gauge;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RotationState {
    Enabled,
    Drain,
    Disabled,
}

impl RotationState {
    pub const ALL: [RotationState; 3] = [
        RotationState::Enabled,
        RotationState::Drain,
        RotationState::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RotationState::Enabled => "enabled",
            RotationState::Drain => "drain",
            RotationState::Disabled => "disabled",
        }
    }

    /// The verb of the admin API (`POST /targets/APP/TARGET/drain`).
    pub fn from_action(action: &str) -> Option<RotationState> {
        match action {
            "enable" => Some(RotationState::Enabled),
            "drain" => Some(RotationState::Drain),
            "disable" => Some(RotationState::Disabled),
            _ => None,
        }
    }
}

/// One target's admin state, with `proxy_target_admin_state{state}` (1 for
/// the state in force, 0 for the others, so every state is always a series).
#[derive(Debug)]
pub struct Rotation {
    state: AtomicU8,
    series: [Gauge; RotationState::ALL.len()],
}

impl Rotation {
    pub fn new(series: [Gauge; RotationState::ALL.len()]) -> Rotation {
        let r = Rotation {
            state: AtomicU8::new(RotationState::Enabled as u8),
            series,
        };
        r.show(RotationState::Enabled);
        r
    }

    pub fn get(&self) -> RotationState {
        RotationState::ALL
            .get(usize::from(self.state.load(Ordering::Relaxed)))
            .copied()
            .unwrap_or(RotationState::Enabled)
    }

    /// Sets the state; returns the one it replaced.
    pub fn set(&self, to: RotationState) -> RotationState {
        let from = self.state.swap(to as u8, Ordering::Relaxed);
        self.show(to);
        RotationState::ALL
            .get(usize::from(from))
            .copied()
            .unwrap_or(RotationState::Enabled)
    }

    /// Whether the balancer may pick this target for a new connection.
    pub fn takes_new(&self) -> bool {
        self.get() == RotationState::Enabled
    }

    /// Whether probes run: not while disabled (maintenance).
    pub fn probed(&self) -> bool {
        self.get() != RotationState::Disabled
    }

    fn show(&self, now: RotationState) {
        for (s, g) in RotationState::ALL.iter().zip(&self.series) {
            g.set(i64::from(*s == now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_series() {
        let r = Rotation::new(Default::default());
        assert!(r.takes_new() && r.probed());
        assert_eq!(r.set(RotationState::Drain), RotationState::Enabled);
        assert!(!r.takes_new() && r.probed());
        assert_eq!(r.series.each_ref().map(|g| g.get()), [0, 1, 0]);
        r.set(RotationState::Disabled);
        assert!(!r.takes_new() && !r.probed());
        assert_eq!(
            RotationState::from_action("enable"),
            Some(RotationState::Enabled)
        );
        assert_eq!(RotationState::from_action("maint"), None);
    }
}
