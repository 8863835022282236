//! Types shared by the eBPF programs and the userspace proxy.
//!
//! Every spliced direction has a *source* socket (the one bytes arrive on) and a
//! peer (the one they leave from). Both flow maps are keyed by the source
//! socket's cookie, so the BPF side never re-derives 4-tuples. Ownership is
//! split so neither side overwrites the other's fields: userspace writes
//! [`FlowControl`], the verdict program writes [`FlowState`].
#![no_std]

/// Written by userspace only, read by the verdict program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// Cookie of the socket this direction's bytes leave from.
    pub peer: u64,
    /// When `FlowState::redirected` reaches this, wake userspace (ring buffer)
    /// to compare what was redirected with what the peer acknowledged.
    pub check_at: u64,
    /// The verdict redirects while `FlowState::redirected` stays within this;
    /// the first skb that would cross it is passed (see `pass`), and so is
    /// every skb after it. Userspace moves it to what the receiver has
    /// acknowledged plus the in-flight bound at every check, so the kernel
    /// itself holds the bound: a late or starved userspace cannot let the
    /// source's rmem grow past what its TCP can take (past about twice
    /// SO_RCVBUF, every segment that arrives while the socket is busy, ACKs
    /// included, is dropped at the backlog).
    pub limit: u64,
    /// Nonzero: demote the direction now. The verdict returns `SK_PASS` for
    /// its bytes, which then wait on the source socket's own receive queue
    /// (charged to its rmem, so TCP's window closes) until userspace reads
    /// them. The socket stays in `SOCKETS`: taking it out could drop an skb.
    /// The proxy writes 0: every demotion is the verdict's own (the limit,
    /// busy, a `CONTROL` entry that would not read the same twice), with no
    /// round trip through userspace. The field stays, since map sets move
    /// between processes of different builds at an upgrade.
    pub pass: u64,
    /// Fault injection for the tests that prove the checks catch a loss
    /// (`--fastpath-fault-drop-at`, hidden): nonzero, the verdict drops the
    /// first skb that arrives once this many bytes were redirected, and
    /// counts it nowhere, as the kernel's own loss would be. 0 in service.
    pub fault_drop_at: u64,
    /// Nonzero (`--mode auto`'s promoted pairs): the verdict demotes the
    /// direction itself, as at `limit`, once more than this many skbs
    /// arrive within one `busy_window_ns`. Each redirected skb crosses a
    /// kernel worker, which makes busy small messages slower in the kernel
    /// than in userspace; a connection promoted while it was light leaves
    /// when it turns busy. 0: never (`--mode fastpath`).
    pub busy_skbs: u64,
    /// The window `busy_skbs` is counted in, in nanoseconds.
    pub busy_window_ns: u64,
}

/// Written by the verdict program only, read by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Bytes redirected out of the peer by the kernel.
    pub redirected: u64,
    /// Bytes dropped because the peer had already left the map (torn down).
    pub dropped: u64,
    /// The `FlowControl::check_at` already reported, so each is reported once.
    pub notified: u64,
    /// Bytes left on the source's receive queue for userspace (demoted: at
    /// the limit, busy, or `pass` set).
    pub passed: u64,
    /// Skbs dropped by `FlowControl::fault_drop_at` (0 or 1).
    pub faults: u64,
    /// The TCP sequence number after the last byte the verdict handed on,
    /// with bit 32 set once known (0: no skb seen since the install).
    pub next_seq: u64,
    /// Bytes cut from the head of skbs that began before `next_seq`: a
    /// retransmitted segment that overlaps what already arrived is queued
    /// whole, and the verdict is handed whole skbs (`tcp_read_skb` ignores
    /// the overlap `tcp_recvmsg` would skip), so its head would go out twice.
    pub trimmed: u64,
    /// Skbs whose `TCP_SKB_CB` did not match their length (a kernel whose
    /// `struct sk_buff` differs from `SKB_CB_OFFSET`): not trimmed. 0 here.
    pub unreadable: u64,
    /// When the current `busy_skbs` window began (`bpf_ktime_get_ns`).
    pub window_start: u64,
    /// Skbs that arrived in the current window.
    pub window_skbs: u64,
    /// 1: the direction was demoted for `busy_skbs`, not for `limit`.
    pub busy: u64,
}

/// What the verdict program tells userspace through the ring buffer: this
/// direction crossed its `check_at`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Cookie of the source socket.
    pub cookie: u64,
}

/// Where `cb` (which holds `TCP_SKB_CB`: `seq`, then `end_seq`) sits in
/// `struct sk_buff`: 40 on x86_64 kernels since 5.x, and on 6.18.44 (BTF).
/// The verdict checks what it reads against the skb's length and trims
/// nothing when they disagree (`FlowState::unreadable`).
pub const SKB_CB_OFFSET: usize = 40;

/// Capacity of each socket map and flow map: two sockets per spliced pair.
pub const MAX_SOCKETS: u32 = 65_536;
/// Ring buffer size for flow events.
pub const EVENTS_BYTES: u32 = 256 * 1024;

// ------------------------------------------------------------ sk_lookup steering

/// Which local (destination) addresses the `steer` sk_lookup program takes;
/// the one entry of `STEER_CONFIG`, written by userspace before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// One of the `STEER_MATCH_*` values.
    pub mode: u32,
    /// `STEER_MATCH_IP4`: the address, in network byte order (as `local_ip4`).
    pub ip4: u32,
    /// `STEER_MATCH_IP6`: the address, as the four network-order words of `local_ip6`.
    pub ip6: [u32; 4],
}

/// Any local IPv4 address (`--listen-address 0.0.0.0`).
pub const STEER_MATCH_ANY4: u32 = 0;
/// Any local IPv4 or IPv6 address (`--listen-address ::`).
pub const STEER_MATCH_ANY: u32 = 1;
/// Only `SteerConfig::ip4`.
pub const STEER_MATCH_IP4: u32 = 2;
/// Only `SteerConfig::ip6`.
pub const STEER_MATCH_IP6: u32 = 3;
/// Capacity of `PORTS`: every TCP port.
pub const STEER_MAX_PORTS: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::FlowControl {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::SteerConfig {}
}
