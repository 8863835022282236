//! Types shared by the eBPF programs and the userspace proxy.
//!
//! Every spliced direction has a *source* socket (the one bytes arrive on) and a
//! peer (the one they leave from). Both halves of the protocol below are keyed by
//! the source socket's cookie, so the BPF side never re-derives 4-tuples.
//!
//! Ownership is split so that neither side overwrites the other's fields:
//! userspace writes [`FlowControl`], the verdict program writes [`FlowState`].
#![no_std]

/// The verdict program passes this direction's bytes up to the source socket's
/// own receive queue, where userspace reads and forwards them. Every direction
/// starts here, so bytes that arrived before the install are never overtaken.
pub const MODE_PASS: u32 = 0;
/// The verdict program redirects this direction's bytes out of the peer socket.
pub const MODE_REDIRECT: u32 = 1;

/// Written by userspace only, read by the verdict program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// Cookie of the socket this direction's bytes leave from.
    pub peer: u64,
    /// Bumped by userspace each time it asks the verdict to start redirecting.
    pub arm: u64,
    /// The arm request holds only if `FlowState::passed` still equals this:
    /// then every byte passed so far was read by userspace before it armed,
    /// and redirecting the next byte cannot overtake one userspace still holds.
    pub expect_passed: u64,
    /// Redirect only while `FlowState::redirected` stays at or below this
    /// (the bound on bytes in flight inside the kernel, as an absolute count).
    pub limit: u64,
    /// When `FlowState::redirected` reaches this, ask userspace (ring buffer)
    /// for more credit before the limit is hit.
    pub refill_at: u64,
}

/// Written by the verdict program only, read by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Bytes redirected out of the peer by the kernel.
    pub redirected: u64,
    /// Bytes passed up to the source socket for userspace to forward.
    pub passed: u64,
    /// `MODE_PASS` or `MODE_REDIRECT`.
    pub mode: u32,
    /// How many times the verdict fell back from redirect to pass.
    pub fallbacks: u32,
    /// The last `FlowControl::arm` the verdict acted on.
    pub seen_arm: u64,
    /// The `FlowControl::refill_at` already reported, so each is reported once.
    pub notified: u64,
}

/// What the verdict program tells userspace through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Cookie of the source socket.
    pub cookie: u64,
    /// `EVENT_REFILL` or `EVENT_PASSING`.
    pub kind: u32,
    pub _pad: u32,
}

/// Redirected bytes crossed `refill_at`: userspace should raise the limit.
pub const EVENT_REFILL: u32 = 1;
/// The direction switched to pass mode: userspace must read and forward.
pub const EVENT_PASSING: u32 = 2;

/// Capacity of the socket map and the flow maps: two sockets per spliced pair.
pub const MAX_SOCKETS: u32 = 65_536;
/// Ring buffer size for flow events.
pub const EVENTS_BYTES: u32 = 256 * 1024;

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::FlowControl {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::FlowEvent {}
}
