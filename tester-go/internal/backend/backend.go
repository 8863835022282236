// Package backend implements the test backends: identify, echo, sink,
// source and the bench protocol, with optional fault injection.
//
// Bench protocol (kind "bench"): the first byte of each connection selects
// the mode:
//
//	'S'            sink: read until EOF, reply the byte count as 8-byte big-endian, close
//	'E'            echo until EOF, then half-close and close
//	'R' + uint64BE source: send that many bytes, then close
//	'P'            ping-pong: read 64-byte messages, echo each, until EOF
//	'I'            idle: hold the connection open, echo whatever arrives
package backend

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tester-go/internal/data"
)

// Kinds of backend.
const (
	Identify = "identify"
	Echo     = "echo"
	Sink     = "sink"
	Source   = "source"
	Bench    = "bench"
)

// Faults at accept time.
const (
	FaultNone        = ""
	FaultAcceptClose = "accept-close"
	FaultAcceptRST   = "accept-rst"
)

// PingSize is the bench ping-pong message size.
const PingSize = 64

// SourceSeed seeds the deterministic data sent by the source kind.
const SourceSeed = 0x5eed

// Options configure a backend. Fault knobs apply to every connection.
type Options struct {
	Kind        string // identify (default), echo, sink, source, bench
	SourceBytes int64  // bytes sent by kind source
	Fault       string // "", accept-close, accept-rst
	ReadRate    int64  // bytes/s read from each client; 0 = unlimited
	StallAfter  int64  // stop reading/writing after this many bytes; 0 = off
	DieAfter    int64  // reset the connection after this many bytes; 0 = off
}

// Validate checks the option values.
func (o Options) Validate() error {
	switch o.Kind {
	case "", Identify, Echo, Sink, Source, Bench:
	default:
		return fmt.Errorf("unknown kind %q (want identify, echo, sink, source or bench)", o.Kind)
	}
	switch o.Fault {
	case FaultNone, FaultAcceptClose, FaultAcceptRST:
	default:
		return fmt.Errorf("unknown fault %q (want accept-close or accept-rst)", o.Fault)
	}
	if o.ReadRate < 0 || o.StallAfter < 0 || o.DieAfter < 0 || o.SourceBytes < 0 {
		return errors.New("negative fault/size value")
	}
	return nil
}

// Server is a set of listeners sharing one behaviour.
type Server struct {
	opts      atomic.Value // Options
	mu        sync.Mutex
	listeners []net.Listener
	labels    []string
	conns     map[net.Conn]struct{}
	accepted  map[string]*int64
	wg        sync.WaitGroup
	done      chan struct{}
	closeOnce sync.Once
}

// Listen binds every address in addrs. labels[i] is the name announced by
// the identify banner for addrs[i] (the target as written in the config);
// if labels is nil the bound address is used.
func Listen(addrs, labels []string, o Options) (*Server, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	var lns []net.Listener
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("listen %s: %w", a, err)
		}
		lns = append(lns, ln)
	}
	return Serve(lns, labels, o)
}

// Serve serves on listeners the caller created (labels as for Listen). The
// server owns them from now on.
func Serve(lns []net.Listener, labels []string, o Options) (*Server, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.Kind == "" {
		o.Kind = Identify
	}
	s := &Server{conns: map[net.Conn]struct{}{}, accepted: map[string]*int64{}, done: make(chan struct{})}
	s.opts.Store(o)
	for i, ln := range lns {
		label := ln.Addr().String()
		if labels != nil {
			label = labels[i]
		}
		s.listeners = append(s.listeners, ln)
		s.labels = append(s.labels, label)
		s.accepted[label] = new(int64)
	}
	for i, ln := range s.listeners {
		s.wg.Add(1)
		go s.serve(ln, s.labels[i])
	}
	return s, nil
}

// SetOptions changes the behaviour for connections accepted from now on.
func (s *Server) SetOptions(o Options) error {
	if err := o.Validate(); err != nil {
		return err
	}
	if o.Kind == "" {
		o.Kind = Identify
	}
	s.opts.Store(o)
	return nil
}

// Addrs returns the bound addresses, in Listen order.
func (s *Server) Addrs() []string {
	out := make([]string, len(s.listeners))
	for i, ln := range s.listeners {
		out[i] = ln.Addr().String()
	}
	return out
}

// Accepted returns connections accepted per label.
func (s *Server) Accepted() map[string]int64 {
	out := map[string]int64{}
	for k, v := range s.accepted {
		out[k] = atomic.LoadInt64(v)
	}
	return out
}

// Close stops the listeners, closes open connections and waits for handlers.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		close(s.done)
		for _, ln := range s.listeners {
			ln.Close()
		}
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	s.wg.Wait()
	return nil
}

func (s *Server) serve(ln net.Listener, label string) {
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			select {
			case <-s.done:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || strings.Contains(err.Error(), "too many open files") {
				if delay == 0 {
					delay = 5 * time.Millisecond
				} else if delay < time.Second {
					delay *= 2
				}
				time.Sleep(delay)
				continue
			}
			return
		}
		delay = 0
		atomic.AddInt64(s.accepted[label], 1)
		o := s.opts.Load().(Options)
		tc := c.(*net.TCPConn)
		switch o.Fault {
		case FaultAcceptClose:
			tc.Close()
			continue
		case FaultAcceptRST:
			tc.SetLinger(0)
			tc.Close()
			continue
		}
		s.mu.Lock()
		select {
		case <-s.done:
			s.mu.Unlock()
			tc.Close()
			return
		default:
		}
		s.conns[tc] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, tc)
				s.mu.Unlock()
				tc.Close()
			}()
			fc := &faultConn{TCPConn: tc, o: o, done: s.done}
			handle(fc, o, label)
		}()
	}
}

// errDied marks a connection killed by --die-after.
var errDied = errors.New("backend: die-after reached")

// faultConn applies read-rate, stall-after and die-after to a connection.
type faultConn struct {
	*net.TCPConn
	o         Options
	done      chan struct{}
	read, wr  int64
	start     time.Time
	dead      atomic.Bool // read and written by echo's reader and writer
	rateBytes int64
}

func (f *faultConn) limit(n int, count int64) (int, error) {
	if f.dead.Load() {
		return 0, errDied
	}
	if f.o.DieAfter > 0 && count >= f.o.DieAfter {
		f.dead.Store(true)
		f.TCPConn.SetLinger(0)
		f.TCPConn.Close()
		return 0, errDied
	}
	if f.o.StallAfter > 0 && count >= f.o.StallAfter {
		<-f.done // hold the connection open, doing nothing
		return 0, net.ErrClosed
	}
	for _, lim := range []int64{f.o.DieAfter, f.o.StallAfter} {
		if lim > 0 && int64(n) > lim-count {
			n = int(lim - count)
		}
	}
	return n, nil
}

func (f *faultConn) Read(p []byte) (int, error) {
	n, err := f.limit(len(p), f.read)
	if err != nil {
		return 0, err
	}
	p = p[:n]
	if f.o.ReadRate > 0 {
		chunk := int(f.o.ReadRate / 20)
		if chunk < 1 {
			chunk = 1
		}
		if len(p) > chunk {
			p = p[:chunk]
		}
		if f.start.IsZero() {
			f.start = time.Now()
		}
	}
	k, err := f.TCPConn.Read(p)
	f.read += int64(k)
	if f.o.ReadRate > 0 {
		f.rateBytes += int64(k)
		due := f.start.Add(time.Duration(float64(f.rateBytes) / float64(f.o.ReadRate) * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			select {
			case <-time.After(d):
			case <-f.done:
			}
		}
	}
	return k, err
}

func (f *faultConn) Write(p []byte) (int, error) {
	total := 0
	for len(p) > 0 {
		n, err := f.limit(len(p), f.wr)
		if err != nil {
			return total, err
		}
		k, err := f.TCPConn.Write(p[:n])
		f.wr += int64(k)
		total += k
		if err != nil {
			return total, err
		}
		p = p[k:]
	}
	return total, nil
}

func (f *faultConn) closeWrite() {
	if !f.dead.Load() {
		f.TCPConn.CloseWrite()
	}
}

func handle(c *faultConn, o Options, label string) {
	switch o.Kind {
	case Identify:
		if _, err := fmt.Fprintf(c, "TARGET %s\n", label); err != nil {
			return
		}
		echo(c)
	case Echo:
		echo(c)
	case Sink:
		cnt := data.NewCounter()
		if _, err := io.CopyBuffer(cnt, c, make([]byte, 64<<10)); err != nil {
			return
		}
		fmt.Fprintf(c, "SINK %d %s\n", cnt.N, cnt.Hex())
		c.closeWrite()
	case Source:
		if _, err := io.CopyBuffer(c, data.NewStream(SourceSeed, o.SourceBytes), make([]byte, 64<<10)); err != nil {
			return
		}
		c.closeWrite()
		drainBriefly(c)
	case Bench:
		benchHandle(c)
	}
}

// echo copies everything back until the client half-closes, then
// half-closes its own side. A reader goroutine keeps reading while a write
// waits, and holds what it read without a bound (at most what the client
// sent). An echo that stops reading while its write waits can wedge for
// good on Linux 6.18: after a memory squeeze the kernel retracts its
// receive window below what the proxy already sent, then drops the proxy's
// segments, ACKs included, until the echo reads again, which it never
// does while its write waits for those ACKs (NOTES.md §2). The proxy's
// tester must not wedge itself.
func echo(c *faultConn) {
	q := newChunks()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				q.put(append([]byte(nil), buf[:n]...))
			}
			if err != nil {
				q.close(err == io.EOF)
				return
			}
		}
	}()
	for {
		b, ok, eof := q.get()
		if !ok {
			if eof {
				c.closeWrite()
			}
			return // the caller closes the connection, which ends the reader
		}
		if _, err := c.Write(b); err != nil {
			return
		}
	}
}

// chunks is an unbounded queue of byte slices between echo's reader and
// writer.
type chunks struct {
	mu     sync.Mutex
	cond   *sync.Cond
	q      [][]byte
	closed bool
	eof    bool
}

func newChunks() *chunks {
	c := &chunks{}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *chunks) put(b []byte) {
	c.mu.Lock()
	c.q = append(c.q, b)
	c.mu.Unlock()
	c.cond.Signal()
}

// close ends the queue once drained; eof says the reader saw a clean EOF.
func (c *chunks) close(eof bool) {
	c.mu.Lock()
	c.closed, c.eof = true, eof
	c.mu.Unlock()
	c.cond.Signal()
}

// get returns the next chunk, or ok false once the queue is closed and
// drained (with eof as close set it).
func (c *chunks) get() (b []byte, ok bool, eof bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.q) == 0 && !c.closed {
		c.cond.Wait()
	}
	if len(c.q) == 0 {
		return nil, false, c.eof
	}
	b = c.q[0]
	c.q[0] = nil
	c.q = c.q[1:]
	return b, true, false
}

// drainBriefly reads until the peer closes (or a short timeout), so Close
// does not turn unread input into a reset.
func drainBriefly(c *faultConn) {
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	io.Copy(io.Discard, c.TCPConn)
}

var benchBlock = data.Block(1, 256<<10)

func benchHandle(c *faultConn) {
	br := bufio.NewReaderSize(c, 64<<10)
	mode, err := br.ReadByte()
	if err != nil {
		return
	}
	switch mode {
	case 'S':
		n, err := io.CopyBuffer(io.Discard, br, make([]byte, 256<<10))
		if err != nil {
			return
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(n))
		c.Write(b[:])
		c.closeWrite()
	case 'E', 'I':
		buf := make([]byte, 64<<10)
		for {
			n, err := br.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				if err == io.EOF {
					c.closeWrite()
				}
				return
			}
		}
	case 'R':
		var b [8]byte
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return
		}
		left := int64(binary.BigEndian.Uint64(b[:]))
		for left > 0 {
			chunk := benchBlock
			if int64(len(chunk)) > left {
				chunk = chunk[:left]
			}
			n, err := c.Write(chunk)
			left -= int64(n)
			if err != nil {
				return
			}
		}
		c.closeWrite()
		drainBriefly(c)
	case 'P':
		var msg [PingSize]byte
		for {
			if _, err := io.ReadFull(br, msg[:]); err != nil {
				if err == io.EOF {
					c.closeWrite()
				}
				return
			}
			if _, err := c.Write(msg[:]); err != nil {
				return
			}
		}
	}
}
