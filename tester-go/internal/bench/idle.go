package bench

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// idleMsgSize is the small message each idle connection exchanges.
const idleMsgSize = 32

// fdMargin: descriptors beyond the held connections (listeners, files,
// the in-process backend's side when measuring direct in tests).
const fdMargin = 256

// ensureFDs raises the soft RLIMIT_NOFILE towards the hard limit so that
// need descriptors fit; an error names the limit and the fix.
func ensureFDs(need uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("getrlimit(RLIMIT_NOFILE): %v", err)
	}
	if lim.Cur >= need {
		return nil
	}
	if lim.Max < need {
		return fmt.Errorf("RLIMIT_NOFILE hard limit %d is below the %d descriptors needed: lower --conns or raise the limit (ulimit -Hn)", lim.Max, need)
	}
	lim.Cur = need
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("raising RLIMIT_NOFILE to %d: %v", need, err)
	}
	return nil
}

// exchange writes one idle message carrying seq and checks its echo; it
// returns the round trip.
func exchange(c *net.TCPConn, seq uint64, timeout time.Duration) (time.Duration, error) {
	var msg, reply [idleMsgSize]byte
	binary.BigEndian.PutUint64(msg[:], seq)
	copy(msg[8:], "idle-mostly message body")
	c.SetDeadline(time.Now().Add(timeout))
	t := time.Now()
	if _, err := c.Write(msg[:]); err != nil {
		return 0, fmt.Errorf("idle write: %v", err)
	}
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		return 0, fmt.Errorf("idle echo: %v", err)
	}
	rtt := time.Since(t)
	if !bytes.Equal(msg[:], reply[:]) {
		return rtt, fmt.Errorf("idle echo differs from message %d", seq)
	}
	return rtt, nil
}

// openIdle opens o.Conns 'I' (echo) connections, 64 at a time, each after
// one small exchange, so the proxy's per-connection state is what it keeps
// for a connection that has carried data. Failed slots are nil.
func openIdle(o Options, r *Result, mu *sync.Mutex) []*net.TCPConn {
	conns := make([]*net.TCPConn, o.Conns)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dial(o)
			if err != nil {
				r.fail(mu, err)
				return
			}
			if _, err := c.Write([]byte{'I'}); err != nil {
				r.fail(mu, err)
				c.Close()
				return
			}
			if _, err := exchange(c, 0, o.Timeout); err != nil {
				r.fail(mu, err)
				c.Close()
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	return conns
}

func rssOf(o Options) int64 {
	if o.ProxyPID <= 0 {
		return 0
	}
	var sum int64
	for _, pid := range append([]int{o.ProxyPID}, o.MorePIDs...) {
		v, _ := ReadRSSKiB(pid)
		sum += v
	}
	return sum
}

// runIdle: open Conns connections (one small exchange each), hold them for
// the duration, then check each still echoes.
func runIdle(o Options, r *Result) error {
	if err := ensureFDs(uint64(o.Conns + fdMargin)); err != nil {
		return err
	}
	var mu sync.Mutex
	r.RSSBeforeKiB = rssOf(o)
	start := time.Now()
	conns := openIdle(o, r, &mu)
	time.Sleep(o.Duration)
	r.RSSDuringKiB = rssOf(o)
	finishIdle(o, r, &mu, conns, start)
	r.Verified = fmt.Sprintf("%d/%d held connections still echo", r.IdleOK, o.Conns)
	return nil
}

// finishIdle checks that the held connections still echo, closes them and
// fills in the counts, RSS after and KiB per connection.
func finishIdle(o Options, r *Result, mu *sync.Mutex, conns []*net.TCPConn, start time.Time) {
	ok := closeChecked(o, r, mu, conns)
	r.Seconds = time.Since(start).Seconds()
	time.Sleep(200 * time.Millisecond) // let the proxy release them
	r.RSSAfterKiB = rssOf(o)
	r.IdleWanted, r.IdleOK, r.Conns = o.Conns, int(ok), ok
	if ok > 0 && r.RSSDuringKiB > 0 {
		r.KiBPerConn = float64(r.RSSDuringKiB-r.RSSBeforeKiB) / float64(ok)
	}
}

// closeChecked checks that every held connection still echoes, closes it,
// and returns how many did.
func closeChecked(o Options, r *Result, mu *sync.Mutex, conns []*net.TCPConn) int64 {
	var ok int64
	var wg sync.WaitGroup
	for _, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(c *net.TCPConn) {
			defer wg.Done()
			defer c.Close()
			if _, err := exchange(c, 1<<62, o.Timeout); err != nil {
				r.fail(mu, err)
				return
			}
			atomic.AddInt64(&ok, 1)
		}(c)
	}
	wg.Wait()
	return ok
}

// runIdleMostly: Conns long-lived connections, each sending a small message
// every Interval (jittered 0.5x..1.5x) for Hold and checking its echo. The
// proxy's CPU is read over the hold alone, its RSS before opening and at
// the end of the hold: the cost of keeping mostly idle connections.
func runIdleMostly(o Options, r *Result) error {
	if err := ensureFDs(uint64(o.Conns + fdMargin)); err != nil {
		return err
	}
	var mu sync.Mutex
	r.RSSBeforeKiB = rssOf(o)
	start := time.Now()
	conns := openIdle(o, r, &mu)
	var cpu0 float64
	if o.ProxyPID > 0 {
		cpu0, _ = o.proxyCPU()
	}
	holdStart := time.Now()
	until := holdStart.Add(o.Hold)
	// A histogram is 64 KiB: one per shard of connections, not per
	// connection (messages are rare, so the shard locks are uncontended).
	const shards = 16
	hs := make([]Histogram, shards)
	var locks [shards]sync.Mutex
	var msgs int64
	var wg sync.WaitGroup
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(c *net.TCPConn, shard int, seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for seq := uint64(1); ; seq++ {
				gap := time.Duration((0.5 + rng.Float64()) * float64(o.Interval))
				if time.Now().Add(gap).After(until) {
					return
				}
				time.Sleep(gap)
				rtt, err := exchange(c, seq, o.Timeout)
				if err != nil {
					r.fail(&mu, err)
					return
				}
				locks[shard].Lock()
				hs[shard].Record(rtt)
				locks[shard].Unlock()
				atomic.AddInt64(&msgs, 1)
			}
		}(c, i%shards, int64(i)+1)
	}
	wg.Wait()
	time.Sleep(time.Until(until))
	hold := time.Since(holdStart).Seconds()
	r.RSSDuringKiB = rssOf(o)
	if o.ProxyPID > 0 {
		cpu1, _ := o.proxyCPU()
		r.HoldCPU = cpu1 - cpu0
	}
	finishIdle(o, r, &mu, conns, start)
	for i := 1; i < len(hs); i++ {
		hs[0].Merge(&hs[i])
	}
	if len(hs) > 0 {
		r.Latency = hs[0].Summary()
	}
	if r.IdleOK > 0 && o.ProxyPID > 0 && hold > 0 {
		r.CPUPerConn = r.HoldCPU * 1e6 / float64(r.IdleOK) / hold
	}
	r.Verified = fmt.Sprintf("%d/%d connections echoed all %d messages, then still echo", r.IdleOK, o.Conns, msgs)
	return nil
}
