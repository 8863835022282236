// Package bench generates load against an endpoint that reaches a bench
// backend (see package backend for the protocol) and measures throughput,
// latency, connection rate, idle-connection capacity and CPU cost.
package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/data"
)

// Loads, in their canonical order.
var Loads = []string{"bulk", "bidi", "parallel", "pingpong", "rr50", "churn", "connrate", "idle", "idle-mostly", "sockperf-pp", "iperf3-bulk"}

// ValidLoad reports whether name is a known load.
func ValidLoad(name string) bool {
	for _, l := range Loads {
		if l == name {
			return true
		}
	}
	return false
}

// Options configure one run.
type Options struct {
	Target   string        // host:port
	Load     string        // one of Loads
	Duration time.Duration // how long to generate load
	Streams  int           // parallel streams (parallel), workers (connrate)
	Conns    int           // idle and idle-mostly connections
	ProxyPID int           // 0 = none; else sample its CPU and RSS
	// MorePIDs: the proxy's other processes (nginx's workers besides
	// ProxyPID), whose CPU and RSS are added to ProxyPID's.
	MorePIDs []int
	Timeout  time.Duration // dial / idle I/O timeout
	// RRConns: kept connections of rr50 (50 unless set).
	RRConns int
	// Clients: concurrent connecting clients of churn (50 unless set).
	Clients int
	// Hold: how long idle-mostly holds its connections (Duration if 0).
	Hold time.Duration
	// Interval: idle-mostly's mean gap between one connection's messages
	// (2 s unless set); each gap is drawn uniformly from 0.5x to 1.5x.
	Interval time.Duration
	// SockperfTarget: host:port that reaches `sockperf sr --tcp` (sockperf-pp).
	SockperfTarget string
	// Iperf3Target: host:port that reaches `iperf3 -s` (iperf3-bulk).
	Iperf3Target string
}

// Result of one run. Zero fields do not apply to the load.
type Result struct {
	Load        string   `json:"load"`
	Target      string   `json:"target"`
	Seconds     float64  `json:"seconds"`
	Bytes       int64    `json:"bytes"`
	GBps        float64  `json:"gb_per_s,omitempty"`
	Client      string   `json:"client"`
	Streams     int      `json:"streams,omitempty"`
	Conns       int64    `json:"conns,omitempty"`
	ConnsPerSec float64  `json:"conns_per_s,omitempty"`
	ReqPerSec   float64  `json:"req_per_s,omitempty"`
	Latency     *Latency `json:"latency,omitempty"`
	// ConnectLatency: churn's connect() alone (Latency is connect+exchange).
	ConnectLatency *Latency `json:"connect_latency,omitempty"`
	IdleWanted     int      `json:"idle_wanted,omitempty"`
	IdleOK         int      `json:"idle_ok,omitempty"`
	RSSBeforeKiB   int64    `json:"proxy_rss_before_kib,omitempty"`
	RSSDuringKiB   int64    `json:"proxy_rss_during_kib,omitempty"`
	RSSAfterKiB    int64    `json:"proxy_rss_after_kib,omitempty"`
	KiBPerConn     float64  `json:"proxy_kib_per_conn,omitempty"`
	// HoldCPU: idle-mostly's proxy CPU over the hold alone (connections
	// open, messages now and then); CPUPerConn is that per connection and
	// per second of hold, in µs.
	HoldCPU       float64 `json:"proxy_hold_cpu_s,omitempty"`
	CPUPerConn    float64 `json:"proxy_cpu_us_per_conn_s,omitempty"`
	ProxyCPU      float64 `json:"proxy_cpu_s,omitempty"`
	ProxyCPUPerGB float64 `json:"proxy_cpu_s_per_gb,omitempty"`
	SysCPU        float64 `json:"sys_cpu_s"`
	SysCPUPerGB   float64 `json:"sys_cpu_s_per_gb,omitempty"`
	Verified      string  `json:"verified"`
	Errors        int64   `json:"errors"`
	FirstError    string  `json:"first_error,omitempty"`
}

// Run executes one load. It returns an error only when nothing could be
// measured (e.g. the endpoint refuses connections).
func Run(o Options) (*Result, error) {
	if o.Duration <= 0 {
		o.Duration = 3 * time.Second
	}
	if o.Streams <= 0 {
		o.Streams = 8
	}
	if o.Conns <= 0 {
		o.Conns = 1000
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.RRConns <= 0 {
		o.RRConns = 50
	}
	if o.Clients <= 0 {
		o.Clients = 50
	}
	if o.Hold <= 0 {
		o.Hold = o.Duration
	}
	if o.Interval <= 0 {
		o.Interval = 2 * time.Second
	}
	if !ValidLoad(o.Load) {
		return nil, fmt.Errorf("unknown load %q", o.Load)
	}
	r := &Result{Load: o.Load, Target: o.Target, Client: "tester-go"}
	if o.ProxyPID > 0 {
		if _, err := o.proxyCPU(); err != nil {
			return nil, fmt.Errorf("proxy pid %d %v: %v", o.ProxyPID, o.MorePIDs, err)
		}
	}
	sys0, _ := ReadSysCPU()
	var p0 float64
	if o.ProxyPID > 0 {
		p0, _ = o.proxyCPU()
	}
	t0 := time.Now()
	var err error
	switch o.Load {
	case "bulk":
		err = runBulk(o, r, 1)
	case "parallel":
		err = runBulk(o, r, o.Streams)
	case "bidi":
		err = runBidi(o, r)
	case "pingpong":
		// rr50's loop on one connection: latency without queueing.
		o.RRConns = 1
		err = runRR(o, r)
	case "connrate":
		err = runConnRate(o, r)
	case "rr50":
		err = runRR(o, r)
	case "churn":
		err = runChurn(o, r)
	case "idle":
		err = runIdle(o, r)
	case "idle-mostly":
		err = runIdleMostly(o, r)
	case "sockperf-pp":
		r.Client = "sockperf"
		r.Target = o.SockperfTarget
		err = runSockperf(o, r)
	case "iperf3-bulk":
		r.Client = "iperf3"
		r.Target = o.Iperf3Target
		err = runIperf3(o, r)
	}
	if r.Seconds == 0 {
		r.Seconds = time.Since(t0).Seconds()
	}
	sys1, _ := ReadSysCPU()
	r.SysCPU = sys1.Busy - sys0.Busy
	if o.ProxyPID > 0 {
		p1, _ := o.proxyCPU()
		r.ProxyCPU = p1 - p0
	}
	if r.Bytes > 0 {
		gb := float64(r.Bytes) / 1e9
		r.GBps = gb / r.Seconds
		r.SysCPUPerGB = r.SysCPU / gb
		if o.ProxyPID > 0 {
			r.ProxyCPUPerGB = r.ProxyCPU / gb
		}
	}
	return r, err
}

func (r *Result) fail(mu *sync.Mutex, err error) {
	mu.Lock()
	defer mu.Unlock()
	r.Errors++
	if r.FirstError == "" {
		r.FirstError = err.Error()
	}
}

func dial(o Options) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", o.Target, o.Timeout)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

var block = data.Block(99, 256<<10)

// sendFor writes block repeatedly until the deadline, returns bytes written.
func sendFor(c *net.TCPConn, until time.Time, timeout time.Duration) (int64, error) {
	var n int64
	for time.Now().Before(until) {
		c.SetWriteDeadline(time.Now().Add(timeout))
		k, err := c.Write(block)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// runBulk: each stream sends 'S' + data for the duration, half-closes, and
// checks the sink's 8-byte count equals what it sent.
func runBulk(o Options, r *Result, streams int) error {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var total, okStreams int64
	conns := make([]*net.TCPConn, streams)
	for i := range conns {
		c, err := dial(o)
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			return fmt.Errorf("dial %s: %w", o.Target, err)
		}
		conns[i] = c
	}
	r.Streams = streams
	start := time.Now()
	until := start.Add(o.Duration)
	for _, c := range conns {
		wg.Add(1)
		go func(c *net.TCPConn) {
			defer wg.Done()
			defer c.Close()
			if _, err := c.Write([]byte{'S'}); err != nil {
				r.fail(&mu, err)
				return
			}
			n, err := sendFor(c, until, o.Timeout)
			if err != nil {
				r.fail(&mu, fmt.Errorf("send: %v", err))
				return
			}
			c.CloseWrite()
			c.SetReadDeadline(time.Now().Add(o.Timeout))
			var b [8]byte
			if _, err := io.ReadFull(c, b[:]); err != nil {
				r.fail(&mu, fmt.Errorf("sink count reply: %v", err))
				return
			}
			if got := int64(binary.BigEndian.Uint64(b[:])); got != n {
				r.fail(&mu, fmt.Errorf("sink counted %d bytes, sent %d", got, n))
				return
			}
			atomic.AddInt64(&total, n)
			atomic.AddInt64(&okStreams, 1)
		}(c)
	}
	wg.Wait()
	r.Seconds = time.Since(start).Seconds()
	r.Bytes = total
	r.Verified = fmt.Sprintf("%d/%d streams: sink byte count matches", okStreams, streams)
	return nil
}

// runBidi: one 'E' connection, writer and reader concurrently; bytes counts
// both directions; the echoed count must equal the sent count.
func runBidi(o Options, r *Result) error {
	c, err := dial(o)
	if err != nil {
		return fmt.Errorf("dial %s: %w", o.Target, err)
	}
	defer c.Close()
	var mu sync.Mutex
	start := time.Now()
	sent := make(chan int64, 1)
	go func() {
		if _, err := c.Write([]byte{'E'}); err != nil {
			r.fail(&mu, err)
			sent <- 0
			return
		}
		n, err := sendFor(c, start.Add(o.Duration), o.Timeout)
		if err != nil {
			r.fail(&mu, fmt.Errorf("send: %v", err))
		}
		c.CloseWrite()
		sent <- n
	}()
	buf := make([]byte, 256<<10)
	var recv int64
	for {
		c.SetReadDeadline(time.Now().Add(o.Timeout))
		n, err := c.Read(buf)
		recv += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			r.fail(&mu, fmt.Errorf("receive: %v", err))
			break
		}
	}
	s := <-sent
	r.Seconds = time.Since(start).Seconds()
	r.Bytes = s + recv
	r.Streams = 1
	if s == recv {
		r.Verified = "echoed byte count matches"
	} else {
		r.Verified = fmt.Sprintf("MISMATCH: sent %d, echoed %d", s, recv)
		r.fail(&mu, errors.New(r.Verified))
	}
	return nil
}

// maxConnRate bounds connections per connrate run (ephemeral ports).
const maxConnRate = 40000

// runConnRate: Streams workers loop: connect, send 'R'+64, read 64 bytes and
// EOF (the backend closes first, so TIME_WAIT stays off the client), close.
func runConnRate(o Options, r *Result) error {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var n, total int64
	hs := make([]Histogram, o.Streams)
	start := time.Now()
	until := start.Add(o.Duration)
	req := []byte{'R', 0, 0, 0, 0, 0, 0, 0, backend.PingSize}
	for w := 0; w < o.Streams; w++ {
		wg.Add(1)
		go func(h *Histogram) {
			defer wg.Done()
			buf := make([]byte, backend.PingSize+1)
			for time.Now().Before(until) && atomic.AddInt64(&total, 1) <= maxConnRate {
				t := time.Now()
				c, err := dial(o)
				if err != nil {
					r.fail(&mu, err)
					time.Sleep(time.Millisecond)
					continue
				}
				c.SetDeadline(time.Now().Add(o.Timeout))
				if _, err := c.Write(req); err != nil {
					r.fail(&mu, err)
					c.Close()
					continue
				}
				k, err := io.ReadAtLeast(c, buf, 1)
				if err != nil {
					r.fail(&mu, fmt.Errorf("first byte: %v", err))
					c.Close()
					continue
				}
				h.Record(time.Since(t))
				rest, err := io.ReadAll(c)
				c.Close()
				if err != nil || k+len(rest) != backend.PingSize {
					r.fail(&mu, fmt.Errorf("reply: %d bytes, %v", k+len(rest), err))
					continue
				}
				atomic.AddInt64(&n, 1)
			}
		}(&hs[w])
	}
	wg.Wait()
	r.Seconds = time.Since(start).Seconds()
	for i := 1; i < len(hs); i++ {
		hs[0].Merge(&hs[i])
	}
	r.Latency = hs[0].Summary()
	r.Conns = n
	r.Streams = o.Streams
	r.ConnsPerSec = float64(n) / r.Seconds
	r.Verified = fmt.Sprintf("%d connections got exactly %d bytes then EOF", n, backend.PingSize)
	return nil
}
