//! Readiness: config loaded and every listener bound; false again while
//! draining. `/readyz` answers from it and `proxy_ready` shows it.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cloning shares the state. The gauge is the state itself, so `/readyz`
/// and `proxy_ready` cannot disagree.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Gauge);

impl Readiness {
    pub fn register(registry: &mut Registry) -> Readiness {
        let r = Readiness::default();
        registry.register(
            "proxy_ready",
            "1 when the config is loaded and every listener is bound (same as /readyz)",
            r.0.clone(),
        );
        r
    }

    pub fn set(&self, ready: bool) {
        self.0.set(i64::from(ready));
    }

    pub fn is_ready(&self) -> bool {
        self.0.get() != 0
    }
}
