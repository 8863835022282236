//! Types shared by the eBPF programs and the userspace proxy.
//! Everything here is `#[repr(C)]` plain data: it crosses the BPF map boundary.
#![no_std]

/// Per-socket accounting kept by the stream verdict program, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStats {
    /// Bytes this socket received that the kernel redirected to its peer.
    pub redirected: u64,
    /// Bytes this socket received that were passed to its own receive queue
    /// (userspace must forward them: backpressure or no peer).
    pub passed: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SockStats {}

/// Capacity of the socket map and the peer map: two sockets per spliced pair.
pub const MAX_SOCKETS: u32 = 65_536;
