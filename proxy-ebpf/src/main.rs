//! The proxy's BPF programs, in one object:
//!
//! - the kernel fastpath: an `sk_skb` stream verdict (`splice`) that splices a
//!   client socket and its upstream socket together. Every byte a socket in
//!   `SOCKETS` receives is redirected out of its peer (found in `PEERS` by the
//!   cookie userspace wrote into `CONTROL`). It counts what it redirects and
//!   wakes userspace every so many bytes, so userspace can move a
//!   direction's `CONTROL.limit` along with what the peer's receiver
//!   acknowledged. An skb that would take the direction past its limit, or
//!   one more than `CONTROL.busy_skbs` in a window (a promoted connection
//!   that turned busy), or any skb once `CONTROL.pass` is set (the proxy
//!   does not set it today), is passed, `SK_PASS`, to the socket's own
//!   receive queue, and so is every later one: userspace carries that
//!   direction from then on. Before any of that it cuts the
//!   head of a retransmitted skb that overlaps bytes already handed on
//!   (`trim_retransmitted`), as `tcp_recvmsg` would skip it;
//! - port steering: an `sk_lookup` program (`steer`) that hands connections
//!   to any configured port to the proxy's one listening socket.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_NO_PREALLOC,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, sk_lookup, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash, SockMap},
    programs::{SkBuffContext, SkLookupContext},
};
use aya_log_ebpf::debug;
use core::ptr::{addr_of, read_volatile};
use proxy_common::{
    FlowControl, FlowEvent, FlowState, SteerConfig, EVENTS_BYTES, MAX_SOCKETS, SKB_CB_OFFSET,
    STEER_MATCH_ANY, STEER_MATCH_ANY4, STEER_MATCH_IP4, STEER_MATCH_IP6, STEER_MAX_PORTS,
};

// ------------------------------------------------------------------------
// Every map, in one place. Fastpath (`splice`): SOCKETS, PEERS,
// CONTROL, STATE, EVENTS. Steering (`steer`): PORTS, STEER_SOCKET,
// STEER_CONFIG.

/// Sockets whose received bytes the verdict sees; the verdict is attached
/// here. A socket stays in until its pair is torn down, even once its
/// direction is demoted (`FlowControl::pass`): the kernel clears the verdict
/// before it restores `data_ready` on removal, and an skb arriving in between
/// is dropped (`sk_psock_verdict_recv` starts from `__SK_DROP`). Userspace
/// never puts a socket back (re-adding one replayed stale bytes on 6.18).
#[map]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Every socket of every spliced pair, as a redirect target. Separate from
/// `SOCKETS` so a peer can receive redirected bytes before, and while, its own
/// received bytes are not (yet) forwarded by the verdict.
#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Per direction, keyed by source cookie: written by userspace.
#[map]
static CONTROL: HashMap<u64, FlowControl> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Per direction, keyed by source cookie: written by this program.
#[map]
static STATE: HashMap<u64, FlowState> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Byte-count checkpoints, so userspace needs no polling.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Destination port (host order) -> app index, for every steered port.
#[map]
static PORTS: HashMap<u32, u32> = HashMap::with_max_entries(STEER_MAX_PORTS, BPF_F_NO_PREALLOC);

/// Slot 0: the proxy's listening socket.
#[map]
static STEER_SOCKET: SockMap = SockMap::with_max_entries(1, 0);

/// Slot 0: which destination addresses are steered.
#[map]
static STEER_CONFIG: Array<SteerConfig> = Array::with_max_entries(1, 0);

// ------------------------------------------------------------------------
// The fastpath: every byte a socket in SOCKETS receives leaves from its peer.

#[stream_verdict]
pub fn splice(ctx: SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    // A bare FIN reaches the verdict as an empty skb. Redirected after the
    // peer's write side was shut, it would set EPIPE on the peer; the FIN
    // itself is already recorded by TCP and reaches userspace as EOF.
    if len == 0 {
        return SK_DROP;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // Userspace writes both entries before it puts a socket in SOCKETS and
    // removes them only after taking it out, so this is not expected; passing
    // leaves the bytes readable on the socket rather than losing them.
    let Some(read) = read_control(cookie) else {
        return SK_PASS;
    };
    let Some(state) = STATE.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    let control = &read.control;
    // Verdicts for one socket run one at a time under its lock, so this
    // read-modify-write of the socket's own state does not race.
    let state = unsafe { &mut *state };
    let len = match trim_retransmitted(&ctx, state, len) {
        Some(len) => len,
        None => return SK_DROP,
    };
    // Demoted: the skb goes to this socket's own receive queue, in order
    // behind the ones already there, where userspace reads it once every
    // byte redirected before it has left the peer. Passing is for good once
    // one skb was passed: redirecting a later one would overtake it.
    if !read.stable
        || control.pass != 0
        || state.passed != 0
        || state.redirected + len > control.limit
        || turned_busy(control, state)
    {
        if state.passed == 0 && (control.pass == 0 || !read.stable) {
            // The verdict demoted the direction itself (the bound, busy, or
            // a CONTROL entry that would not read the same twice):
            // wake userspace, which reads the passed bytes from now on.
            let _ = EVENTS.output::<FlowEvent>(&FlowEvent { cookie }, 0);
        }
        state.passed += len;
        return SK_PASS;
    }
    // Test-only fault (never set in service): one skb vanishes.
    if control.fault_drop_at != 0 && state.redirected >= control.fault_drop_at && state.faults == 0
    {
        state.faults = 1;
        return SK_DROP;
    }
    let mut peer = control.peer;
    if PEERS.redirect_skb(&ctx, &mut peer, 0) != i64::from(SK_PASS) {
        // The peer was closed: the pair is being torn down and there is no
        // one left to deliver to.
        state.dropped += len;
        debug!(&ctx, "peer of {} is gone; dropping {} bytes", cookie, len);
        return SK_DROP;
    }
    state.redirected += len;
    if state.redirected >= control.check_at && state.notified != control.check_at {
        state.notified = control.check_at;
        // A full ring loses this wake-up: the limit then stays where it is,
        // and the direction is demoted (losslessly) when it reaches it. The
        // ring holds 16 Ki events and userspace drains it as they come.
        let _ = EVENTS.output::<FlowEvent>(&FlowEvent { cookie }, 0);
    }
    SK_PASS
}

/// A copy of a direction's `CONTROL` entry; `stable` false if userspace
/// kept replacing it while it was read.
struct ControlRead {
    control: FlowControl,
    stable: bool,
}

/// Copies `CONTROL[cookie]` twice, each from its own lookup, and trusts the
/// copy only when the two agree. A map update swaps a new element in, and a
/// preallocated hash map hands the old one to the next update on that CPU,
/// for any key: one copy could come from an element that meanwhile took
/// another pair's values (a `peer` whose socket would send this pair's
/// bytes), a second lookup of this key cannot. Values are compared, not
/// pointers, which the verifier allows only with CAP_PERFMON. None: no
/// entry.
#[inline(always)]
fn read_control(cookie: u64) -> Option<ControlRead> {
    let mut first = unsafe { *CONTROL.get_ptr(&cookie)? };
    for _ in 0..2 {
        let again = unsafe { *CONTROL.get_ptr(&cookie)? };
        if again == first {
            return Some(ControlRead {
                control: again,
                stable: true,
            });
        }
        first = again;
    }
    // Changing under every read: demote (lossless) rather than trust a copy
    // that may be another pair's.
    Some(ControlRead {
        control: first,
        stable: false,
    })
}

/// Counts this skb in the direction's current `busy_skbs` window; true
/// (and `state.busy` set) once the window holds more than `busy_skbs`.
#[inline(always)]
fn turned_busy(control: &FlowControl, state: &mut FlowState) -> bool {
    if control.busy_skbs == 0 {
        return false;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(state.window_start) > control.busy_window_ns {
        state.window_start = now;
        state.window_skbs = 0;
    }
    state.window_skbs += 1;
    if state.window_skbs <= control.busy_skbs {
        return false;
    }
    state.busy = 1;
    true
}

/// Cuts from the head of this skb the bytes that arrived before (`TCP_SKB_CB`
/// `seq` below `state.next_seq`) and returns what is left of its length;
/// None if nothing new is left, or the cut failed: the skb is dropped.
///
/// TCP queues a retransmitted segment that partly overlaps bytes already
/// received as it is, starting before `rcv_nxt`; `tcp_recvmsg` skips the
/// overlap, but `tcp_read_skb` hands the verdict the whole skb, so without
/// this the overlap would be forwarded a second time (seen: 24 bytes
/// duplicated in a 1 GiB echo). The first skb after an install sets the
/// mark: userspace installs only once it read each queue to EAGAIN.
#[inline(always)]
fn trim_retransmitted(ctx: &SkBuffContext, state: &mut FlowState, len: u64) -> Option<u64> {
    // The context is the kernel's sk_buff; `seq` and `end_seq` are the first
    // two words of its cb. A probe read cannot fault, and the two words are
    // checked against the length before they are trusted.
    let cb = (ctx.skb.skb as usize + SKB_CB_OFFSET) as *const [u32; 2];
    let Ok([seq, end_seq]) = (unsafe { bpf_probe_read_kernel(cb) }) else {
        state.unreadable += 1;
        return Some(len);
    };
    // end_seq counts a FIN as one more.
    let span = u64::from(end_seq.wrapping_sub(seq));
    if span != len && span != len + 1 {
        state.unreadable += 1;
        return Some(len);
    }
    let new_end = seq.wrapping_add(len as u32);
    let known = state.next_seq >> 32 != 0;
    let overlap = (state.next_seq as u32).wrapping_sub(seq) as i32;
    if !known || overlap <= 0 {
        state.next_seq = (1 << 32) | u64::from(new_end);
        return Some(len);
    }
    // A segment wholly inside what arrived is cut to nothing: dropped with
    // bytes left, the kernel would count them as read a second time.
    let overlap = if overlap as u64 > len {
        len
    } else {
        overlap as u64
    };
    // adjust_room removes at most 0xfff bytes from the head per call.
    let mut left = overlap;
    for _ in 0..MAX_TRIM_CALLS {
        if left == 0 {
            break;
        }
        let step = if left > TRIM_STEP { TRIM_STEP } else { left };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    state.trimmed += overlap - left;
    if left != 0 {
        // Not all of it could be cut, and forwarding it would duplicate
        // bytes: the skb goes, and the FIN ledger, short by its new part,
        // resets both sides rather than let the stream pass as whole.
        return None;
    }
    if overlap == len {
        return None;
    }
    state.next_seq = (1 << 32) | u64::from(new_end);
    Some(len - overlap)
}

/// Largest head cut one `bpf_skb_adjust_room` call makes on an `sk_skb`.
const TRIM_STEP: u64 = 0xfff;
/// Enough calls for an overlap of 64 KiB (one loopback GSO segment) and more.
const MAX_TRIM_CALLS: usize = 32;

// ------------------------------------------------------------------------
// sk_lookup port steering (`--steering sk_lookup`), independent of `splice`:
// TCP connections to a configured port are handed to the proxy's one
// listening socket, however many ports there are. Userspace keeps `PORTS`
// in step with the config; the program is attached once per process.

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Volatile 4-byte reads: the verifier only allows whole-field context loads.
    let (protocol, family, port) = unsafe {
        (
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).family)),
            read_volatile(addr_of!((*l).local_port)),
        )
    };
    if protocol != IPPROTO_TCP || unsafe { PORTS.get(&port) }.is_none() {
        return SK_PASS;
    }
    let Some(cfg) = STEER_CONFIG.get(0) else {
        return SK_PASS;
    };
    let wanted = match cfg.mode {
        STEER_MATCH_ANY => true,
        STEER_MATCH_ANY4 => family == AF_INET,
        STEER_MATCH_IP4 => {
            family == AF_INET && unsafe { read_volatile(addr_of!((*l).local_ip4)) } == cfg.ip4
        }
        STEER_MATCH_IP6 => {
            family == AF_INET6
                && unsafe {
                    read_volatile(addr_of!((*l).local_ip6[0])) == cfg.ip6[0]
                        && read_volatile(addr_of!((*l).local_ip6[1])) == cfg.ip6[1]
                        && read_volatile(addr_of!((*l).local_ip6[2])) == cfg.ip6[2]
                        && read_volatile(addr_of!((*l).local_ip6[3])) == cfg.ip6[3]
                }
        }
        _ => false,
    };
    if wanted {
        // No listener in the slot (or another program already chose one):
        // fall through to the normal lookup, which refuses the connection.
        let _ = STEER_SOCKET.redirect_sk_lookup(&ctx, 0, 0);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
