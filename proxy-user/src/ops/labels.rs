//! Fixed label values of the proxy's own series: which limit refused a
//! client, why a PROXY header was refused.

/// Which connection limit refused a client (`limit` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    PerApp,
    Global,
    /// `--max-connections-per-client`, over all apps.
    PerClient,
    /// The app's `MaxConnectionsPerClient`.
    PerAppClient,
}

impl Limit {
    pub(super) const ALL: [Limit; 4] = [
        Limit::PerApp,
        Limit::Global,
        Limit::PerClient,
        Limit::PerAppClient,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PerApp => "per_app",
            Limit::Global => "global",
            Limit::PerClient => "per_client",
            Limit::PerAppClient => "per_app_client",
        }
    }
}

/// Why a client of an app with `AcceptProxyProtocol` was cut before its
/// PROXY header was read (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderFailure {
    /// Not from one of the app's `TrustedSources`.
    Untrusted,
    Malformed,
    /// Closed (or reset) before the header ended.
    Closed,
    /// The header took longer than the app's `Timeout`.
    Timeout,
}

impl HeaderFailure {
    pub(super) const ALL: [HeaderFailure; 4] = [
        HeaderFailure::Untrusted,
        HeaderFailure::Malformed,
        HeaderFailure::Closed,
        HeaderFailure::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HeaderFailure::Untrusted => "untrusted",
            HeaderFailure::Malformed => "malformed",
            HeaderFailure::Closed => "closed",
            HeaderFailure::Timeout => "timeout",
        }
    }
}
