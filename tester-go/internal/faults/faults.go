// Package faults checks how a proxy handles failing backends. Unlike
// package check it owns the backends: it serves every local target of one
// app itself and switches their behaviour between cases, so no other
// backend may be listening on those addresses.
package faults

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/check"
	"tester-go/internal/config"
	"tester-go/internal/data"
	"tester-go/internal/report"
	"tester-go/internal/tcpinfo"
)

// Case names.
const (
	CaseDieMidStream  = "die-mid-stream"
	CaseAcceptReset   = "accept-reset"
	CaseAcceptClose   = "accept-close"
	CaseSlowBackend   = "slow-backend"
	CaseOneTargetDown = "one-target-down"
)

// Options configure a run.
type Options struct {
	Config    *config.Config
	App       string // app to use; "" = first app with the most local targets
	ProxyHost string
	Timeout   time.Duration
	// Listeners optionally supplies already-bound listeners per target
	// (tests use port 0); missing targets are bound by address.
	Listeners map[string]net.Listener
	Progress  io.Writer
}

// Report is the outcome.
type Report struct {
	App     string              `json:"app"`
	Port    int                 `json:"port"`
	Targets []string            `json:"targets"`
	Cases   []*check.CaseResult `json:"cases"`
	Pass    bool                `json:"pass"`
	Verdict string              `json:"verdict"`
}

// Case returns the named case or nil.
func (r *Report) Case(name string) *check.CaseResult {
	for _, c := range r.Cases {
		if c.Name == name {
			return c
		}
	}
	return nil
}

type runner struct {
	o       Options
	port    int
	targets []string
	servers map[string]*backend.Server
	tags    uint64 // last stream tag used; every connection sends its own stream
}

// Run serves the chosen app's targets and runs every case against the
// proxy. The error is for setup problems (no such app, address in use).
func Run(o Options) (*Report, error) {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	var app *config.App
	best := -1
	for i := range o.Config.Apps {
		a := &o.Config.Apps[i]
		local, _ := a.LocalTargets()
		if o.App != "" {
			if a.Name == o.App {
				app = a
			}
			continue
		}
		if len(local) > best {
			app, best = a, len(local)
		}
	}
	if app == nil {
		return nil, fmt.Errorf("no app named %q in the config", o.App)
	}
	local, _ := app.LocalTargets()
	if len(local) == 0 {
		return nil, fmt.Errorf("app %q has no local targets to serve", app.Name)
	}
	r := &runner{o: o, port: app.Ports[0], targets: local, servers: map[string]*backend.Server{}}
	defer r.closeAll()
	for _, t := range local {
		var s *backend.Server
		var err error
		if ln := o.Listeners[t]; ln != nil {
			s, err = backend.Serve([]net.Listener{ln}, []string{t}, backend.Options{})
		} else {
			s, err = backend.Listen([]string{config.ListenAddr(t)}, []string{t}, backend.Options{})
		}
		if err != nil {
			return nil, fmt.Errorf("serving %s: %w (stop other backends on this app's targets first)", t, err)
		}
		r.servers[t] = s
	}
	rep := &Report{App: app.Name, Port: r.port, Targets: local}
	cases := []struct {
		name string
		fn   func() (string, string, []string)
	}{
		{CaseDieMidStream, r.dieMidStream},
		{CaseAcceptReset, func() (string, string, []string) { return r.acceptFault(backend.FaultAcceptRST) }},
		{CaseAcceptClose, func() (string, string, []string) { return r.acceptFault(backend.FaultAcceptClose) }},
		{CaseSlowBackend, r.slowBackend},
		{CaseOneTargetDown, r.oneTargetDown},
	}
	for _, c := range cases {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "faults: %s ...\n", c.name)
		}
		t0 := time.Now()
		st, ev, fails := c.fn()
		r.setAll(backend.Options{})
		rep.Cases = append(rep.Cases, &check.CaseResult{Name: c.name, Status: st, Evidence: ev, Failures: fails, Seconds: time.Since(t0).Seconds()})
	}
	var failed []string
	for _, c := range rep.Cases {
		if c.Status == check.Fail {
			failed = append(failed, c.Name)
		}
	}
	rep.Pass = len(failed) == 0
	if rep.Pass {
		rep.Verdict = fmt.Sprintf("PASS: %d/%d fault cases passed (app %s, port %d)", len(rep.Cases), len(rep.Cases), app.Name, r.port)
	} else {
		rep.Verdict = fmt.Sprintf("FAIL: %d/%d fault cases failed (%s)", len(failed), len(rep.Cases), strings.Join(failed, ", "))
	}
	return rep, nil
}

func (r *runner) closeAll() {
	for _, s := range r.servers {
		s.Close()
	}
}

func (r *runner) setAll(o backend.Options) {
	for _, s := range r.servers {
		s.SetOptions(o)
	}
}

func (r *runner) addr() string {
	return net.JoinHostPort(r.o.ProxyHost, strconv.Itoa(r.port))
}

// outcome of pumping data through one connection.
type outcome struct {
	target   string
	size     int64 // bytes the client meant to send
	sent     int64
	wrote    error // the writer's error, nil when all size bytes went out
	received int64
	end      error // nil = clean EOF
	timedOut bool
	elapsed  time.Duration
	content  *data.Mismatch // first echoed byte out of sequence, or nil
	match    bool           // all sent, clean EOF, received == sent, every byte in sequence
}

func (o outcome) String() string {
	how := "EOF"
	switch {
	case o.timedOut:
		how = "HUNG (no EOF or reset)"
	case o.end != nil:
		how = "reset/error: " + o.end.Error()
	}
	s := fmt.Sprintf("via %s: sent %s, echoed %s, then %s after %s", o.target, report.Bytes(o.sent),
		report.Bytes(o.received), how, report.Dur(o.elapsed))
	if o.content != nil {
		s += "; " + o.content.String()
	}
	return s
}

// pump dials the proxy, reads the banner if any, writes size bytes of a
// sequence-numbered stream of its own while reading, half-closes, and reads
// until EOF, error or timeout, checking every echoed byte against its
// position in the stream (data.Verifier).
func (r *runner) pump(size int64, wantBanner bool) (outcome, error) {
	out := outcome{size: size}
	to := r.o.Timeout
	start := time.Now()
	nc, err := net.DialTimeout("tcp", r.addr(), to)
	if err != nil {
		return out, fmt.Errorf("dial %s: %w", r.addr(), err)
	}
	c := nc.(*net.TCPConn)
	defer c.Close()
	br := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(to))
	var banner int
	if wantBanner {
		line, err := br.ReadString('\n')
		banner = len(line)
		if err != nil {
			return out, fmt.Errorf("no banner: %v", errText(err))
		}
		out.target = strings.TrimPrefix(strings.TrimSpace(line), "TARGET ")
	}
	tag := atomic.AddUint64(&r.tags, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.SetWriteDeadline(time.Now().Add(to))
		n, err := io.Copy(c, data.NewSeq(tag, size))
		out.sent, out.wrote = n, err
		if err == nil {
			c.CloseWrite()
		}
	}()
	ver := data.NewVerifier(tag)
	buf := make([]byte, 64<<10)
	for {
		c.SetReadDeadline(time.Now().Add(to))
		n, err := br.Read(buf)
		ver.Write(buf[:n])
		out.received += int64(n)
		if err != nil {
			if err != io.EOF {
				out.end = err
				var ne net.Error
				out.timedOut = errors.As(err, &ne) && ne.Timeout()
			}
			break
		}
	}
	out.elapsed = time.Since(start)
	if out.end == nil && !finReceived(c, int64(banner)+out.received) {
		// The writer's failed write took the reset's error, and the read
		// then saw a plain EOF: the kernel counted no FIN.
		out.end = fmt.Errorf("reset (no FIN arrived): %w", syscall.ECONNRESET)
	}
	c.Close() // unblock the writer
	wg.Wait()
	out.content = ver.Mismatch()
	out.match = out.wrote == nil && out.sent == out.size && out.end == nil &&
		out.received == out.sent && out.content == nil
	return out, nil
}

// finReceived reports whether c's peer sent a FIN after the read bytes:
// the kernel counts the FIN in tcpi_bytes_received, a reset adds nothing.
// True when it cannot tell.
func finReceived(c *net.TCPConn, read int64) bool {
	info, err := tcpinfo.Of(c)
	return err != nil || info.BytesReceived != uint64(read)
}

func errText(err error) string {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return err.Error()
}

const faultConns = 3

type pumped struct {
	o   outcome
	err error
}

// pumpN runs n pumps concurrently.
func (r *runner) pumpN(n int, size int64, banner bool) []pumped {
	out := make([]pumped, n)
	var wg sync.WaitGroup
	for i := range out {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			out[i].o, out[i].err = r.pump(size, banner)
		}(i)
	}
	wg.Wait()
	return out
}

func (r *runner) dieMidStream() (string, string, []string) {
	const die = 64 << 10
	r.setAll(backend.Options{DieAfter: die})
	var fails, ev []string
	for i, p := range r.pumpN(faultConns, 4<<20, true) {
		o, err := p.o, p.err
		switch {
		case err != nil:
			fails = append(fails, fmt.Sprintf("conn %d: %v", i, err))
		case o.content != nil:
			fails = append(fails, fmt.Sprintf("conn %d %v: the echo before the reset is out of sequence", i, o))
		case o.timedOut:
			fails = append(fails, fmt.Sprintf("conn %d %v: the backend reset after %s but the client connection was not ended", i, o, report.Bytes(die)))
		case o.end == nil && o.received >= o.sent && o.sent > 0:
			fails = append(fails, fmt.Sprintf("conn %d %v: full echo despite the backend dying (fault not applied?)", i, o))
		case !errors.Is(o.end, syscall.ECONNRESET):
			// The client has part of its echo and a clean end: it would
			// take that part for the whole answer.
			fails = append(fails, fmt.Sprintf("conn %d %v: the backend reset after %s but the client's connection ended without a reset: a cut stream that looks finished", i, o, report.Bytes(die)))
		default:
			ev = append(ev, report.Dur(o.elapsed))
		}
	}
	if len(fails) > 0 {
		return check.Fail, fmt.Sprintf("%d/%d connections not reset when the backend died", len(fails), faultConns), fails
	}
	return check.Pass, fmt.Sprintf("backend resets after %s: %d/%d client connections reset in %s",
		report.Bytes(die), faultConns, faultConns, strings.Join(ev, ", ")), nil
}

func (r *runner) acceptFault(fault string) (string, string, []string) {
	r.setAll(backend.Options{Fault: fault})
	var fails, ev []string
	for i, p := range r.pumpN(faultConns, 1024, false) {
		o, err := p.o, p.err
		switch {
		case errors.Is(err, syscall.ECONNRESET):
			// Reset before the dial returned: every target failed at once.
			ev = append(ev, "reset at connect")
		case err != nil:
			fails = append(fails, fmt.Sprintf("conn %d: %v", i, err))
		case o.content != nil:
			fails = append(fails, fmt.Sprintf("conn %d %v: bytes that are not its echo", i, o))
		case o.timedOut:
			fails = append(fails, fmt.Sprintf("conn %d %v: every target %s but the client connection hangs", i, o, fault))
		default:
			ev = append(ev, report.Dur(o.elapsed))
		}
	}
	if len(fails) > 0 {
		return check.Fail, fmt.Sprintf("%d/%d connections hung", len(fails), faultConns), fails
	}
	return check.Pass, fmt.Sprintf("all targets %s: %d/%d client connections ended promptly (%s)",
		fault, faultConns, faultConns, strings.Join(ev, ", ")), nil
}

func (r *runner) slowBackend() (string, string, []string) {
	const size, rate = 512 << 10, 2 << 20
	r.setAll(backend.Options{ReadRate: rate})
	o, err := r.pump(size, true)
	if err != nil {
		return check.Fail, "could not connect", []string{err.Error()}
	}
	if !o.match {
		return check.Fail, "slow backend: echo incomplete or out of sequence", []string{o.String()}
	}
	return check.Pass, fmt.Sprintf("backend reads at %s/s: %s echoed, every byte in sequence, via %s in %s", report.Bytes(rate),
		report.Bytes(size), o.target, report.Dur(o.elapsed)), nil
}

func (r *runner) oneTargetDown() (string, string, []string) {
	if len(r.targets) < 2 {
		return check.Skip, "app has a single local target", nil
	}
	down := r.targets[0]
	r.servers[down].Close() // now refusing: nothing listens there
	delete(r.servers, down)
	n := 4 * len(r.targets)
	var fails []string
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		o, err := r.pump(4096, true)
		switch {
		case err != nil:
			fails = append(fails, fmt.Sprintf("conn %d: %v (proxy did not fall back to a live target?)", i, err))
		case o.target == down:
			fails = append(fails, fmt.Sprintf("conn %d: banner from %s, which is down?", i, down))
		case !o.match:
			fails = append(fails, fmt.Sprintf("conn %d %v", i, o))
		default:
			seen[o.target]++
		}
	}
	if len(fails) > 0 {
		return check.Fail, fmt.Sprintf("%s refusing: %d/%d connections failed", down, len(fails), n), fails
	}
	return check.Pass, fmt.Sprintf("%s refusing: %d/%d connections served by the others (%s)", down, n, n, report.Counts(seen)), nil
}

// WriteText prints the case table and verdict.
func (rep *Report) WriteText(w io.Writer) {
	fmt.Fprintf(w, "faults: app %s via proxy port %d; tester-go serves %s\n\n", rep.App, rep.Port, strings.Join(rep.Targets, " "))
	tw := report.Table(w)
	report.Row(tw, "CASE", "RESULT", "TIME", "EVIDENCE")
	for _, c := range rep.Cases {
		report.Row(tw, c.Name, c.Status, fmt.Sprintf("%.2fs", c.Seconds), c.Evidence)
	}
	tw.Flush()
	for _, c := range rep.Cases {
		for _, f := range c.Failures {
			fmt.Fprintf(w, "  %s: %s\n", c.Name, f)
		}
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, rep.Verdict)
}
