//! Shared by every component that owns series (`ops::metrics`,
//! `upstream::stats`): each registers its own metrics into the one
//! registry the admin listener renders, and keeps handles to them.

use prometheus_client::registry::{Metric, Registry};

/// A new metric, registered; the caller keeps a handle to the same series.
/// `help` has no final full stop: the registry adds one.
pub fn registered<M: Metric + Clone + Default>(r: &mut Registry, name: &str, help: &str) -> M {
    let m = M::default();
    r.register(name, help, m.clone());
    m
}
