// Package brokenproxy is a small in-process TCP proxy with deliberate bugs,
// used only by tests to prove that the checks catch them.
package brokenproxy

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tester-go/internal/tcpinfo"
)

// Variant selects the behaviour.
type Variant string

// Variants.
const (
	Correct   Variant = "correct"     // half-close aware, retries another target
	DropTail  Variant = "drop-tail"   // closes everything when the client half-closes
	Corrupt   Variant = "corrupt"     // flips one byte (offset 1000) client->backend
	OneTarget Variant = "one-target"  // always uses the app's first target
	IgnoreFIN Variant = "ignore-fin"  // never propagates the client's half-close
	KeepOnRST Variant = "keep-on-rst" // backend reset leaves the client connection open
	FinOnRST  Variant = "fin-on-rst"  // a backend reset reaches the client as a clean FIN: the cut looks finished
	// The next three rewrite the client->backend stream but keep its byte
	// count exact: a check of counts (or of a FIN ledger) misses them.
	Replay    Variant = "replay"    // overwrites ReplayLen bytes at ReplayAt with bytes from ReplayFrom
	Duplicate Variant = "duplicate" // sends [DupAt-DupLen, DupAt) twice, in place of [DupAt, DupAt+DupLen)
	DropPad   Variant = "drop-pad"  // drops [DropAt, DropAt+DropLen), pads as many zeros before the FIN
)

// Where the broken variants strike, in client->backend stream offsets. The
// sizes are those of the fastpath's silent failures in issue 13.
const (
	CorruptOffset = 1000 // the byte Corrupt flips

	ReplayAt   = 200_001
	ReplayFrom = ReplayAt - 130_966
	ReplayLen  = 65_483

	DupAt  = 131_072
	DupLen = 65_483

	DropAt  = 100_000
	DropLen = 22_736
)

// Proxy listens on some ports per app and forwards to the app's targets.
type Proxy struct {
	// Ports[i] are the ports listening for app i.
	Ports [][]int

	v     Variant
	lns   []net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
	done  chan struct{}
	once  sync.Once
}

// Start listens on portsPerApp ephemeral loopback ports for each app;
// apps[i] lists app i's targets.
func Start(v Variant, apps [][]string, portsPerApp int) (*Proxy, error) {
	p := &Proxy{v: v, conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	for _, targets := range apps {
		var ports []int
		rr := new(uint32)
		for i := 0; i < portsPerApp; i++ {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				p.Close()
				return nil, err
			}
			p.lns = append(p.lns, ln)
			ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
			p.wg.Add(1)
			go p.serve(ln, targets, rr)
		}
		p.Ports = append(p.Ports, ports)
	}
	return p, nil
}

// Close stops listening and closes all connections.
func (p *Proxy) Close() {
	p.once.Do(func() {
		close(p.done)
		for _, ln := range p.lns {
			ln.Close()
		}
		p.mu.Lock()
		for c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
	})
	p.wg.Wait()
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return false
	default:
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) serve(ln net.Listener, targets []string, rr *uint32) {
	defer p.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			c.Close()
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			b := p.dial(targets, rr)
			if b == nil {
				return
			}
			if !p.track(b) {
				b.Close()
				return
			}
			defer p.untrack(b)
			p.pipe(c.(*net.TCPConn), b.(*net.TCPConn))
		}()
	}
}

func (p *Proxy) dial(targets []string, rr *uint32) net.Conn {
	if p.v == OneTarget {
		b, err := net.DialTimeout("tcp", targets[0], 2*time.Second)
		if err != nil {
			return nil
		}
		return b
	}
	start := atomic.AddUint32(rr, 1)
	for i := 0; i < len(targets); i++ {
		t := targets[(int(start)+i)%len(targets)]
		b, err := net.DialTimeout("tcp", t, 2*time.Second)
		if err == nil {
			return b
		}
	}
	return nil
}

func (p *Proxy) pipe(client, backend *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(2)
	closeBoth := func() { client.Close(); backend.Close() }
	// A stream that failed on one side is cut on both: a close with
	// SO_LINGER 0 sends RST, so neither peer takes what it got for the
	// whole stream. FinOnRST closes cleanly instead.
	cutBoth := func() {
		client.SetLinger(0)
		backend.SetLinger(0)
		closeBoth()
	}
	// Set before this proxy half-closes the backend: from then on a clean
	// close can leave the backend socket in TCP_CLOSE too (see reset).
	var shutBackend atomic.Bool
	go func() { // client -> backend
		defer wg.Done()
		var src io.Reader = client
		switch p.v {
		case Corrupt:
			src = &corrupter{r: client}
		case Replay:
			src = &replayer{r: client, from: ReplayFrom, at: ReplayAt, saved: make([]byte, ReplayLen)}
		case Duplicate:
			src = &replayer{r: client, from: DupAt - DupLen, at: DupAt, saved: make([]byte, DupLen)}
		case DropPad:
			src = &dropPadder{r: client, at: DropAt, end: DropAt + DropLen}
		}
		_, err := io.Copy(backend, src)
		switch {
		case err != nil && p.v == KeepOnRST:
		case err != nil && p.v == FinOnRST:
			// A FIN to the client, and whatever it still sends is read and
			// dropped, so that closing sends no RST either.
			client.CloseWrite()
			io.Copy(io.Discard, client)
			closeBoth()
		case err != nil:
			cutBoth()
		case p.v == DropTail:
			closeBoth()
		case p.v == IgnoreFIN:
			// swallow the FIN
		default:
			shutBackend.Store(true)
			backend.CloseWrite()
		}
	}()
	go func() { // backend -> client
		defer wg.Done()
		_, err := io.Copy(client, backend)
		// The backend's reset reads as EOF here once the other goroutine's
		// write took its error: passed on as a FIN, the cut would look
		// finished.
		if err == nil && !shutBackend.Load() && reset(backend) {
			err = syscall.ECONNRESET
		}
		if err != nil && p.v == FinOnRST {
			// The other goroutine, reading the client, ends it (above).
			client.CloseWrite()
			return
		}
		if err != nil && p.v == KeepOnRST {
			backend.Close() // forget the backend, leave the client hanging
			<-p.done
			return
		}
		if err != nil {
			cutBoth()
			return
		}
		client.CloseWrite()
		if p.v == IgnoreFIN {
			closeBoth()
		}
	}()
	wg.Wait()
}

type corrupter struct {
	r   io.Reader
	off int64
}

func (c *corrupter) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	if c.off <= CorruptOffset && CorruptOffset < c.off+int64(n) {
		b[CorruptOffset-c.off] ^= 0x55
	}
	c.off += int64(n)
	return n, err
}

// span returns the part of [start, start+n) that a read covering
// [off, off+len) sees, as indices into the read's buffer.
func span(off int64, l int, start, n int64) (lo, hi int, ok bool) {
	a, b := start, start+n
	if a < off {
		a = off
	}
	if e := off + int64(l); b > e {
		b = e
	}
	if a >= b {
		return 0, 0, false
	}
	return int(a - off), int(b - off), true
}

// replayer overwrites len(saved) bytes at offset at with the bytes that
// passed at offset from (from+len(saved) <= at): a replay with the exact
// byte count.
type replayer struct {
	r        io.Reader
	off      int64
	from, at int64
	saved    []byte
}

func (c *replayer) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	l := int64(len(c.saved))
	if lo, hi, ok := span(c.off, n, c.from, l); ok {
		copy(c.saved[c.off+int64(lo)-c.from:], b[lo:hi])
	}
	if lo, hi, ok := span(c.off, n, c.at, l); ok {
		copy(b[lo:hi], c.saved[c.off+int64(lo)-c.at:])
	}
	c.off += int64(n)
	return n, err
}

// dropPadder leaves out the bytes at offsets [at, end) and, when the
// client half-closes, sends as many zero bytes as it left out.
type dropPadder struct {
	r       io.Reader
	off     int64 // offset of the next byte read from r
	at, end int64
	pad     int64
	eof     bool
}

func (c *dropPadder) Read(b []byte) (int, error) {
	for !c.eof {
		n, err := c.r.Read(b)
		read := n
		if lo, hi, ok := span(c.off, n, c.at, c.end-c.at); ok {
			copy(b[lo:], b[hi:n])
			n -= hi - lo
			c.pad += int64(hi - lo)
		}
		c.off += int64(read)
		switch {
		case err == io.EOF:
			c.eof = true
			if n > 0 {
				return n, nil
			}
		case err != nil || n > 0:
			return n, err
		}
	}
	if c.pad == 0 {
		return 0, io.EOF
	}
	k := len(b)
	if int64(k) > c.pad {
		k = int(c.pad)
	}
	for i := range b[:k] {
		b[i] = 0
	}
	c.pad -= int64(k)
	return k, nil
}

// reset reports whether c's connection is gone (TCP_CLOSE): reset by the
// peer, where a half-close would leave it in CLOSE_WAIT.
func reset(c *net.TCPConn) bool {
	info, err := tcpinfo.Of(c)
	return err == nil && info.State == tcpinfo.Close
}
