package bench

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"tester-go/internal/backend"
)

// runRR: RRConns kept 'P' connections, each a loop of 64-byte
// request/response for the duration; every reply is compared with its
// request. Reports requests per second and the round-trip percentiles.
func runRR(o Options, r *Result) error {
	var mu sync.Mutex
	conns := make([]*net.TCPConn, o.RRConns)
	for i := range conns {
		c, err := dial(o)
		if err == nil {
			_, err = c.Write([]byte{'P'})
		}
		if err != nil {
			for _, c := range conns[:i] {
				c.Close()
			}
			return fmt.Errorf("dial %s: %w", o.Target, err)
		}
		conns[i] = c
	}
	hs := make([]Histogram, len(conns))
	var bad int64
	var wg sync.WaitGroup
	start := time.Now()
	until := start.Add(o.Duration)
	for i, c := range conns {
		wg.Add(1)
		go func(c *net.TCPConn, h *Histogram, id uint64) {
			defer wg.Done()
			defer c.Close()
			msg := make([]byte, backend.PingSize)
			reply := make([]byte, backend.PingSize)
			binary.BigEndian.PutUint64(msg[8:], id)
			c.SetDeadline(until.Add(o.Timeout))
			for i := uint64(0); time.Now().Before(until); i++ {
				binary.BigEndian.PutUint64(msg, i)
				t := time.Now()
				if _, err := c.Write(msg); err != nil {
					r.fail(&mu, err)
					return
				}
				if _, err := io.ReadFull(c, reply); err != nil {
					r.fail(&mu, err)
					return
				}
				h.Record(time.Since(t))
				if !bytes.Equal(msg, reply) {
					atomic.AddInt64(&bad, 1)
				}
			}
		}(c, &hs[i], uint64(i))
	}
	wg.Wait()
	r.Seconds = time.Since(start).Seconds()
	for i := 1; i < len(hs); i++ {
		hs[0].Merge(&hs[i])
	}
	r.Latency = hs[0].Summary()
	r.Conns = int64(len(conns))
	r.ReqPerSec = float64(hs[0].Count()) / r.Seconds
	if bad == 0 {
		r.Verified = fmt.Sprintf("%d replies on %d connections equal their requests", hs[0].Count(), len(conns))
	} else {
		r.Verified = fmt.Sprintf("MISMATCH: %d/%d replies differ", bad, hs[0].Count())
		r.fail(&mu, fmt.Errorf("%s", r.Verified))
	}
	return nil
}

// runChurn: Clients concurrent clients, each a loop of: connect, send
// 'R'+64, read the 64 bytes and EOF, close. One short exchange per new
// connection. Reports connections per second, connect() percentiles
// (ConnectLatency) and connect-to-EOF percentiles (Latency).
func runChurn(o Options, r *Result) error {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var n, total int64
	hs := make([]Histogram, o.Clients)
	cs := make([]Histogram, o.Clients)
	start := time.Now()
	until := start.Add(o.Duration)
	req := []byte{'R', 0, 0, 0, 0, 0, 0, 0, backend.PingSize}
	for w := 0; w < o.Clients; w++ {
		wg.Add(1)
		go func(h, ch *Histogram) {
			defer wg.Done()
			buf := make([]byte, 2*backend.PingSize)
			for time.Now().Before(until) && atomic.AddInt64(&total, 1) <= maxConnRate {
				t := time.Now()
				c, err := dial(o)
				if err != nil {
					r.fail(&mu, err)
					time.Sleep(time.Millisecond)
					continue
				}
				ch.Record(time.Since(t))
				c.SetDeadline(time.Now().Add(o.Timeout))
				if _, err := c.Write(req); err != nil {
					r.fail(&mu, err)
					c.Close()
					continue
				}
				k, err := io.ReadFull(c, buf[:backend.PingSize])
				if err == nil {
					var extra int
					extra, err = c.Read(buf[backend.PingSize:])
					k += extra
				}
				c.Close()
				if err != io.EOF || k != backend.PingSize {
					r.fail(&mu, fmt.Errorf("churn reply: %d bytes then %v, want %d then EOF", k, err, backend.PingSize))
					continue
				}
				h.Record(time.Since(t))
				atomic.AddInt64(&n, 1)
			}
		}(&hs[w], &cs[w])
	}
	wg.Wait()
	r.Seconds = time.Since(start).Seconds()
	for i := 1; i < len(hs); i++ {
		hs[0].Merge(&hs[i])
		cs[0].Merge(&cs[i])
	}
	r.Latency = hs[0].Summary()
	r.ConnectLatency = cs[0].Summary()
	r.Conns = n
	r.Streams = o.Clients
	r.ConnsPerSec = float64(n) / r.Seconds
	r.Verified = fmt.Sprintf("%d connections got exactly %d bytes then EOF", n, backend.PingSize)
	return nil
}
