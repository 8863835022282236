//! Kernel fastpath: an `sk_skb` stream verdict that splices a client socket and
//! its upstream socket together. Userspace installs both sockets of a pair in
//! `SOCKETS` and describes each direction in `CONTROL`; this program decides,
//! per received skb, whether the kernel redirects it out of the peer or passes
//! it up for userspace to forward (before the install completes, and whenever
//! the peer is too far behind: that is how backpressure reaches the sender).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::debug;
use proxy_common::{
    FlowControl, FlowEvent, FlowState, EVENTS_BYTES, EVENT_PASSING, EVENT_REFILL, MAX_SOCKETS,
    MODE_PASS, MODE_REDIRECT,
};

/// Every spliced socket, keyed by its cookie.
#[map]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Per direction, keyed by source cookie: written by userspace.
#[map]
static CONTROL: HashMap<u64, FlowControl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Per direction, keyed by source cookie: written by this program.
#[map]
static STATE: HashMap<u64, FlowState> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Refill requests and pass-mode switches, so userspace needs no polling.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[stream_verdict]
pub fn splice(ctx: SkBuffContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // A socket without both entries is being installed or torn down: passing
    // keeps its bytes on the socket, where userspace reads them.
    let Some(control) = (unsafe { CONTROL.get(&cookie) }) else {
        return SK_PASS;
    };
    let Some(state) = STATE.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    // Verdicts for one socket run one at a time under its lock, so this
    // read-modify-write of the socket's own state does not race.
    let state = unsafe { &mut *state };
    let len = u64::from(ctx.len());
    // A bare FIN reaches the verdict as an empty skb. Redirected after the
    // peer's write side was shut, it would set EPIPE on the peer; the FIN
    // itself is already recorded by TCP and reaches userspace as EOF.
    if len == 0 {
        return SK_DROP;
    }

    if state.mode == MODE_PASS && control.arm != state.seen_arm {
        state.seen_arm = control.arm;
        if state.passed == control.expect_passed {
            state.mode = MODE_REDIRECT;
        }
    }

    if state.mode == MODE_REDIRECT {
        if state.redirected + len <= control.limit {
            let mut peer = control.peer;
            if SOCKETS.redirect_skb(&ctx, &mut peer, 0) == i64::from(SK_PASS) {
                state.redirected += len;
                if state.redirected >= control.refill_at && state.notified != control.refill_at {
                    state.notified = control.refill_at;
                    notify(cookie, EVENT_REFILL);
                }
                return SK_PASS;
            }
            debug!(&ctx, "peer of {} left the socket map; passing", cookie);
        }
        // Over the in-flight bound, or the peer is gone: stop redirecting and
        // let this socket's receive queue (and so its TCP window) fill up.
        state.mode = MODE_PASS;
        state.fallbacks += 1;
        notify(cookie, EVENT_PASSING);
    }

    state.passed += len;
    SK_PASS
}

fn notify(cookie: u64, kind: u32) {
    // A full ring only delays userspace: it also polls lagging directions.
    let _ = EVENTS.output::<FlowEvent>(
        &FlowEvent {
            cookie,
            kind,
            _pad: 0,
        },
        0,
    );
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
