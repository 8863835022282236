// Package check runs correctness cases against a running proxy whose
// targets are served by identify backends (banner "TARGET <addr>\n", then
// echo until the client half-closes).
package check

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tester-go/internal/config"
	"tester-go/internal/data"
	"tester-go/internal/report"
)

// Case names, as printed and as used in JSON.
const (
	CaseRouting     = "routing"
	CaseBalancing   = "balancing"
	CaseBadTarget   = "avoid-bad-target"
	CaseIntegrity   = "integrity"
	CaseHalfClose   = "half-close"
	CaseConcurrency = "concurrency"
	CaseSlowReader  = "slow-reader"
)

// Options configure a run.
type Options struct {
	Config     *config.Config
	ProxyHost  string
	Conns      int           // concurrent connections in the concurrency case
	MaxSize    int64         // largest integrity payload
	Timeout    time.Duration // dial timeout and idle timeout per read/write
	PerPort    int           // connections per port in the routing case
	SlowBytes  int64         // bytes echoed to the slow reader
	SlowRate   int64         // slow reader's rate, bytes/s
	HalfBytes  int64         // payload of the half-close case
	Parallel   int           // concurrent connections for per-port probes and integrity
	Progress   io.Writer     // if set, one line per case as it starts
	ConcurrBuf int64         // bytes each concurrent connection exchanges
}

// Defaults returns the normal-mode options (quick selects the short run).
func Defaults(quick bool) Options {
	o := Options{Conns: 1000, MaxSize: 64 << 20, Timeout: 10 * time.Second, PerPort: 4,
		SlowBytes: 1 << 20, SlowRate: 2 << 20, HalfBytes: 1 << 20, Parallel: 32, ConcurrBuf: 16 << 10}
	if quick {
		o.Conns, o.MaxSize, o.PerPort, o.SlowRate, o.HalfBytes = 100, 1<<20, 2, 8<<20, 256<<10
	}
	return o
}

// Status of a case.
const (
	Pass = "PASS"
	Fail = "FAIL"
	Skip = "SKIP"
)

// CaseResult is one case's outcome with its evidence.
type CaseResult struct {
	Name     string   `json:"name"`
	Status   string   `json:"status"`
	Evidence string   `json:"evidence"`
	Failures []string `json:"failures,omitempty"`
	Seconds  float64  `json:"seconds"`
}

// PortResult tallies the connections made to one proxy port.
type PortResult struct {
	Port     int            `json:"port"`
	Conns    int            `json:"conns"`
	Failures int            `json:"failures"`
	Targets  map[string]int `json:"targets"`
}

// AppResult tallies one app over all cases.
type AppResult struct {
	Name          string            `json:"name"`
	LocalTargets  []string          `json:"local_targets"`
	Skipped       map[string]string `json:"skipped_targets,omitempty"`
	Conns         int               `json:"conns"`
	Failures      int               `json:"failures"`
	BytesVerified int64             `json:"bytes_verified"`
	Targets       map[string]int    `json:"targets_served"`
	Ports         []*PortResult     `json:"ports"`
}

// Report is the whole run.
type Report struct {
	Proxy   string        `json:"proxy_host"`
	Pass    bool          `json:"pass"`
	Verdict string        `json:"verdict"`
	Seconds float64       `json:"seconds"`
	Cases   []*CaseResult `json:"cases"`
	Apps    []*AppResult  `json:"apps"`
}

// Failed returns the names of failed cases.
func (r *Report) Failed() []string {
	var out []string
	for _, c := range r.Cases {
		if c.Status == Fail {
			out = append(out, c.Name)
		}
	}
	return out
}

// Case returns the named case result, or nil.
func (r *Report) Case(name string) *CaseResult {
	for _, c := range r.Cases {
		if c.Name == name {
			return c
		}
	}
	return nil
}

type app struct {
	cfg     config.App
	local   map[string]bool
	skipped map[string]string
	res     *AppResult
	ports   map[int]*PortResult
}

type endpoint struct {
	app  *app
	port int
}

func (e endpoint) String() string { return fmt.Sprintf("%s port %d", e.app.cfg.Name, e.port) }

type runner struct {
	o       Options
	apps    []*app
	owner   map[string]string // target -> app name
	eps     []endpoint        // every (app, port)
	mu      sync.Mutex
	seedCtr uint64
}

// orDefault sets an unset (zero or negative) option to its default.
func orDefault[T int | int64 | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// Run executes all cases and returns the report. It never panics on proxy
// misbehaviour; everything is bounded by Options.Timeout.
func Run(o Options) *Report {
	d := Defaults(false)
	orDefault(&o.Conns, d.Conns)
	orDefault(&o.MaxSize, d.MaxSize)
	orDefault(&o.Timeout, d.Timeout)
	orDefault(&o.PerPort, d.PerPort)
	orDefault(&o.SlowBytes, d.SlowBytes)
	orDefault(&o.SlowRate, d.SlowRate)
	orDefault(&o.HalfBytes, d.HalfBytes)
	orDefault(&o.Parallel, d.Parallel)
	orDefault(&o.ConcurrBuf, d.ConcurrBuf)
	r := &runner{o: o, owner: map[string]string{}}
	for _, ca := range o.Config.Apps {
		local, skipped := ca.LocalTargets()
		a := &app{cfg: ca, local: map[string]bool{}, skipped: skipped, ports: map[int]*PortResult{},
			res: &AppResult{Name: ca.Name, LocalTargets: local, Targets: map[string]int{}}}
		if len(skipped) > 0 {
			a.res.Skipped = skipped
		}
		for _, t := range local {
			a.local[t] = true
		}
		for _, t := range ca.Targets {
			r.owner[t] = ca.Name
		}
		for _, p := range ca.Ports {
			pr := &PortResult{Port: p, Targets: map[string]int{}}
			a.ports[p] = pr
			a.res.Ports = append(a.res.Ports, pr)
			r.eps = append(r.eps, endpoint{a, p})
		}
		r.apps = append(r.apps, a)
	}
	rep := &Report{Proxy: o.ProxyHost}
	start := time.Now()
	cases := []struct {
		name string
		fn   func(*collector) (string, string)
	}{
		{CaseRouting, r.routing},
		{CaseBalancing, r.balancing},
		{CaseBadTarget, r.badTarget},
		{CaseIntegrity, r.integrity},
		{CaseHalfClose, r.halfClose},
		{CaseConcurrency, r.concurrency},
		{CaseSlowReader, r.slowReader},
	}
	for _, c := range cases {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "check: %s ...\n", c.name)
		}
		t0 := time.Now()
		col := &collector{}
		status, ev := c.fn(col)
		if status == Pass && len(col.msgs) > 0 {
			status = Fail
		}
		rep.Cases = append(rep.Cases, &CaseResult{Name: c.name, Status: status, Evidence: ev,
			Failures: col.list(), Seconds: time.Since(t0).Seconds()})
	}
	rep.Seconds = time.Since(start).Seconds()
	var conns int
	var bytesOK int64
	for _, a := range r.apps {
		rep.Apps = append(rep.Apps, a.res)
		conns += a.res.Conns
		bytesOK += a.res.BytesVerified
	}
	failed := rep.Failed()
	rep.Pass = len(failed) == 0
	if rep.Pass {
		rep.Verdict = fmt.Sprintf("PASS: %d/%d cases passed, %d connections, %s verified, %.1fs",
			len(rep.Cases), len(rep.Cases), conns, report.Bytes(bytesOK), rep.Seconds)
	} else {
		rep.Verdict = fmt.Sprintf("FAIL: %d/%d cases failed (%s), %d connections, %.1fs",
			len(failed), len(rep.Cases), strings.Join(failed, ", "), conns, rep.Seconds)
	}
	return rep
}

// collector gathers failure messages (bounded).
type collector struct {
	mu    sync.Mutex
	msgs  []string
	extra int
}

const maxFailures = 20

func (c *collector) add(format string, args ...interface{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.msgs) >= maxFailures {
		c.extra++
		return
	}
	c.msgs = append(c.msgs, fmt.Sprintf(format, args...))
}

func (c *collector) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.msgs) + c.extra
}

func (c *collector) list() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := append([]string(nil), c.msgs...)
	if c.extra > 0 {
		out = append(out, fmt.Sprintf("... and %d more", c.extra))
	}
	return out
}

func (r *runner) record(ep endpoint, target string, verified int64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pr := ep.app.ports[ep.port]
	pr.Conns++
	ep.app.res.Conns++
	if target != "" {
		pr.Targets[target]++
		ep.app.res.Targets[target]++
	}
	if err != nil {
		pr.Failures++
		ep.app.res.Failures++
	}
	ep.app.res.BytesVerified += verified
}

func (r *runner) seed() uint64 { return atomic.AddUint64(&r.seedCtr, 1) }

// sess is one connection through the proxy, after its banner.
type sess struct {
	r      *runner
	ep     endpoint
	c      *net.TCPConn
	br     *bufio.Reader
	target string
}

// open dials the endpoint and validates the identify banner.
func (r *runner) open(ep endpoint) (*sess, error) {
	addr := net.JoinHostPort(r.o.ProxyHost, strconv.Itoa(ep.port))
	nc, err := net.DialTimeout("tcp", addr, r.o.Timeout)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %v", addr, err)
	}
	c := nc.(*net.TCPConn)
	s := &sess{r: r, ep: ep, c: c, br: bufio.NewReaderSize(c, 64<<10)}
	c.SetReadDeadline(time.Now().Add(r.o.Timeout))
	line, err := s.br.ReadString('\n')
	if err != nil {
		c.Close()
		if len(line) == 0 {
			return nil, fmt.Errorf("no banner: %v (connection accepted, then nothing forwarded)", describe(err, r.o.Timeout))
		}
		return nil, fmt.Errorf("partial banner %q: %v", line, describe(err, r.o.Timeout))
	}
	line = strings.TrimRight(line, "\r\n")
	t := strings.TrimPrefix(line, "TARGET ")
	if t == line {
		c.Close()
		return nil, fmt.Errorf("bad banner %q (want \"TARGET <addr>\"; is an identify backend serving the targets?)", line)
	}
	s.target = t
	switch {
	case ep.app.local[t]:
	case ep.app.skipped[t] != "":
		c.Close()
		return s, fmt.Errorf("banner names skipped target %s", t)
	case r.owner[t] != "":
		c.Close()
		return s, fmt.Errorf("routed to %s, a target of app %q, not of %q", t, r.owner[t], ep.app.cfg.Name)
	default:
		c.Close()
		return s, fmt.Errorf("routed to %s, which is not in the config", t)
	}
	return s, nil
}

func describe(err error, timeout time.Duration) string {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Sprintf("timeout (no data for %v)", timeout)
	}
	if err == io.EOF {
		return "EOF"
	}
	return err.Error()
}

// deadlineWriter refreshes the write deadline before each write.
type deadlineWriter struct {
	c *net.TCPConn
	d time.Duration
}

func (w deadlineWriter) Write(p []byte) (int, error) {
	w.c.SetWriteDeadline(time.Now().Add(w.d))
	return w.c.Write(p)
}

type xferResult struct {
	received int64
	sentSHA  string
	recvSHA  string
}

// exchange sends size bytes of the sequence-numbered stream seed (see
// data.Seq) while concurrently reading the echo and checking every byte
// against its position in that stream, and (if halfClose) half-closes after
// sending and requires EOF after the full echo. readRate > 0 reads slowly.
// Pass or fail is decided by count and sequence; the SHA-256 of both
// directions is evidence only.
func (s *sess) exchange(seed uint64, size int64, halfClose bool, readRate int64) (xferResult, error) {
	var res xferResult
	to := s.r.o.Timeout
	werr := make(chan error, 1)
	sentH := sha256.New()
	go func() {
		buf := make([]byte, 64<<10)
		_, err := io.CopyBuffer(io.MultiWriter(deadlineWriter{s.c, to}, sentH), data.NewSeq(seed, size), buf)
		if err == nil && halfClose {
			err = s.c.CloseWrite()
		}
		werr <- err
	}()
	recvH := sha256.New()
	ver := data.NewVerifier(seed)
	buf := make([]byte, 64<<10)
	var rerr error
	var rateStart time.Time
	for {
		chunk := buf
		if readRate > 0 {
			if rateStart.IsZero() {
				rateStart = time.Now()
			}
			if n := int(readRate / 50); n > 0 && n < len(chunk) {
				chunk = chunk[:n]
			}
		}
		if !halfClose && res.received >= size {
			break
		}
		if !halfClose && int64(len(chunk)) > size-res.received {
			chunk = chunk[:size-res.received]
		}
		s.c.SetReadDeadline(time.Now().Add(to))
		n, err := s.br.Read(chunk)
		if n > 0 {
			got := chunk[:n]
			recvH.Write(got)
			ver.Write(got)
			res.received += int64(n)
			if res.received > size {
				rerr = fmt.Errorf("received more bytes than sent (%d > %d)", res.received, size)
				break
			}
			if readRate > 0 {
				due := rateStart.Add(time.Duration(float64(res.received) / float64(readRate) * float64(time.Second)))
				time.Sleep(time.Until(due))
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			rerr = fmt.Errorf("read: %s", describe(err, to))
			break
		}
	}
	if rerr != nil {
		s.c.Close() // unblock the writer
	}
	we := <-werr
	res.sentSHA = hex.EncodeToString(sentH.Sum(nil))
	res.recvSHA = hex.EncodeToString(recvH.Sum(nil))
	content := ""
	if m := ver.Mismatch(); m != nil {
		content = "; " + m.String()
	}
	switch {
	case rerr != nil:
		return res, fmt.Errorf("%s payload: got %d of %d bytes echoed, then %v%s", report.Bytes(size), res.received, size, rerr, content)
	case we != nil:
		return res, fmt.Errorf("%s payload: write after %d bytes received: %v%s", report.Bytes(size), res.received, describe(we, to), content)
	case res.received != size:
		return res, fmt.Errorf("%s payload: got %d of %d bytes echoed, then EOF (tail dropped)%s", report.Bytes(size), res.received, size, content)
	case !ver.OK():
		return res, fmt.Errorf("%s payload: byte count exact, but %s; sha256 sent %.12s… echoed %.12s…",
			report.Bytes(size), ver.Mismatch(), res.sentSHA, res.recvSHA)
	}
	return res, nil
}

func (s *sess) close() { s.c.Close() }

// forEach runs fn over items with at most par in flight.
func forEach(n, par int, fn func(i int)) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, par)
	for i := 0; i < n; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			fn(i)
		}(i)
	}
	wg.Wait()
}

// probe opens one connection, checks the banner and a short echo.
func (r *runner) probe(ep endpoint) (string, error) {
	s, err := r.open(ep)
	if err != nil {
		t := ""
		if s != nil {
			t = s.target
		}
		r.record(ep, t, 0, err)
		return t, err
	}
	defer s.close()
	size := int64(100 + r.seed()%400)
	_, err = s.exchange(r.seed(), size, true, 0)
	if err != nil {
		r.record(ep, s.target, 0, err)
		return s.target, err
	}
	r.record(ep, s.target, size, nil)
	return s.target, nil
}

func (r *runner) routing(col *collector) (string, string) {
	forEach(len(r.eps)*r.o.PerPort, r.o.Parallel, func(i int) {
		ep := r.eps[i/r.o.PerPort]
		if _, err := r.probe(ep); err != nil {
			col.add("%s: %v", ep, err)
		}
	})
	n := len(r.eps) * r.o.PerPort
	if f := col.count(); f > 0 {
		return Fail, fmt.Sprintf("%d/%d connections over %d ports failed or were misrouted", f, n, len(r.eps))
	}
	return Pass, fmt.Sprintf("%d ports x %d conns: every banner names a target of the port's app", len(r.eps), r.o.PerPort)
}

func (r *runner) balancing(col *collector) (string, string) {
	const want = 32
	var ev []string
	checked := 0
	for _, a := range r.apps {
		if len(a.res.LocalTargets) < 2 {
			ev = append(ev, fmt.Sprintf("%s: 1 local target, n/a", a.cfg.Name))
			continue
		}
		checked++
		seen := r.distinct(a)
		var eps []endpoint
		for _, ep := range r.eps {
			if ep.app == a {
				eps = append(eps, ep)
			}
		}
		// top up so the decision rests on at least `want` connections
		for i := 0; i < want && seen < 2; i++ {
			r.probe(eps[i%len(eps)])
			seen = r.distinct(a)
		}
		r.mu.Lock()
		counts := report.Counts(a.res.Targets)
		r.mu.Unlock()
		if seen < 2 {
			col.add("%s: all connections went to one target (%s); %d local targets configured", a.cfg.Name, counts, len(a.res.LocalTargets))
		}
		ev = append(ev, fmt.Sprintf("%s: %s", a.cfg.Name, counts))
	}
	if checked == 0 {
		return Skip, "no app has 2 or more local targets"
	}
	return Pass, strings.Join(ev, "; ")
}

func (r *runner) distinct(a *app) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, c := range a.res.Targets {
		if c > 0 {
			n++
		}
	}
	return n
}

func (r *runner) badTarget(col *collector) (string, string) {
	var ev []string
	for _, a := range r.apps {
		if len(a.skipped) == 0 {
			continue
		}
		var names []string
		for t := range a.skipped {
			names = append(names, t)
		}
		sort.Strings(names)
		r.mu.Lock()
		conns, fails := a.res.Conns, a.res.Failures
		r.mu.Unlock()
		if fails > 0 {
			col.add("%s: %d/%d connections failed; the proxy may be sending them to %s", a.cfg.Name, fails, conns, strings.Join(names, ", "))
		}
		ev = append(ev, fmt.Sprintf("%s: %d/%d conns ok, never %s", a.cfg.Name, conns-fails, conns, strings.Join(names, ", ")))
	}
	if len(ev) == 0 {
		return Skip, "config has no unresolvable or non-local targets"
	}
	return Pass, strings.Join(ev, "; ")
}

// integritySizes returns 1 B up to max, always including max.
func integritySizes(max int64) []int64 {
	var out []int64
	for _, s := range []int64{1, 1500, 64<<10 + 3, 1 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30} {
		if s < max {
			out = append(out, s)
		}
	}
	return append(out, max)
}

func (r *runner) integrity(col *collector) (string, string) {
	sizes := integritySizes(r.o.MaxSize)
	var total int64
	var mu sync.Mutex
	var shas []string
	forEach(len(sizes), 3, func(i int) {
		size := sizes[i]
		ep := r.eps[i%len(r.eps)]
		s, err := r.open(ep)
		if err != nil {
			r.record(ep, "", 0, err)
			col.add("%s: %s: %v", ep, report.Bytes(size), err)
			return
		}
		defer s.close()
		res, err := s.exchange(r.seed(), size, true, 0)
		if err != nil {
			r.record(ep, s.target, 0, err)
			col.add("%s via %s: %v", ep, s.target, err)
			return
		}
		r.record(ep, s.target, size, nil)
		mu.Lock()
		total += size
		if size == r.o.MaxSize {
			shas = append(shas, fmt.Sprintf("sha256 %.12s… both ways", res.sentSHA))
		}
		mu.Unlock()
	})
	var names []string
	for _, s := range sizes {
		names = append(names, report.Bytes(s))
	}
	ev := fmt.Sprintf("%d sizes (%s), written and read concurrently, every byte in sequence (byte count exact, no replay, loss or reorder); %s",
		len(sizes), strings.Join(names, ", "), strings.Join(shas, ""))
	if col.count() > 0 {
		return Fail, fmt.Sprintf("%d/%d transfers failed verification", col.count(), len(sizes))
	}
	return Pass, ev
}

func (r *runner) halfClose(col *collector) (string, string) {
	// One endpoint per app: (a) send then half-close immediately, the whole
	// echo must still arrive, then EOF; (b) exchange, pause, half-close,
	// expect a prompt EOF with no extra bytes.
	var eps []endpoint
	seen := map[*app]bool{}
	for _, ep := range r.eps {
		if !seen[ep.app] {
			seen[ep.app] = true
			eps = append(eps, ep)
		}
	}
	const per = 3
	forEach(len(eps)*per, r.o.Parallel, func(i int) {
		ep := eps[i/per]
		s, err := r.open(ep)
		if err != nil {
			r.record(ep, "", 0, err)
			col.add("%s: %v", ep, err)
			return
		}
		defer s.close()
		if i%per < 2 {
			size := int64(1024)
			if i%per == 1 {
				size = r.o.HalfBytes
			}
			if _, err := s.exchange(r.seed(), size, true, 0); err != nil {
				r.record(ep, s.target, 0, err)
				col.add("%s via %s: write+CloseWrite: %v", ep, s.target, err)
				return
			}
			r.record(ep, s.target, size, nil)
			return
		}
		const small = 4096
		if _, err := s.exchange(r.seed(), small, false, 0); err != nil {
			r.record(ep, s.target, 0, err)
			col.add("%s via %s: echo before CloseWrite: %v", ep, s.target, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
		if err := s.c.CloseWrite(); err != nil {
			r.record(ep, s.target, 0, err)
			col.add("%s via %s: CloseWrite: %v", ep, s.target, err)
			return
		}
		s.c.SetReadDeadline(time.Now().Add(r.o.Timeout))
		var one [1]byte
		n, err := s.br.Read(one[:])
		if n > 0 || err != io.EOF {
			err2 := fmt.Errorf("after CloseWrite wanted EOF, got %d bytes, %s (FIN not propagated?)", n, describe(err, r.o.Timeout))
			r.record(ep, s.target, 0, err2)
			col.add("%s via %s: %v", ep, s.target, err2)
			return
		}
		r.record(ep, s.target, small, nil)
	})
	if col.count() > 0 {
		return Fail, fmt.Sprintf("%d/%d half-close connections failed", col.count(), len(eps)*per)
	}
	return Pass, fmt.Sprintf("%d apps: 1 KiB and %s sent then CloseWrite -> full echo + EOF; idle CloseWrite -> prompt EOF",
		len(eps), report.Bytes(r.o.HalfBytes))
}

func (r *runner) concurrency(col *collector) (string, string) {
	n := r.o.Conns
	sessions := make([]*sess, n)
	var open int64
	dialPar := 256
	forEach(n, dialPar, func(i int) {
		ep := r.eps[i%len(r.eps)]
		s, err := r.open(ep)
		if err != nil {
			t := ""
			if s != nil {
				t = s.target
			}
			r.record(ep, t, 0, err)
			col.add("%s conn %d: %v", ep, i, err)
			return
		}
		sessions[i] = s
		atomic.AddInt64(&open, 1)
	})
	// all connections that opened are now simultaneously open
	var wg sync.WaitGroup
	var ok int64
	for i, s := range sessions {
		if s == nil {
			continue
		}
		wg.Add(1)
		go func(i int, s *sess) {
			defer wg.Done()
			defer s.close()
			if _, err := s.exchange(r.seed(), r.o.ConcurrBuf, true, 0); err != nil {
				r.record(s.ep, s.target, 0, err)
				col.add("%s conn %d via %s: %v", s.ep, i, s.target, err)
				return
			}
			r.record(s.ep, s.target, r.o.ConcurrBuf, nil)
			atomic.AddInt64(&ok, 1)
		}(i, s)
	}
	wg.Wait()
	if ok != int64(n) {
		return Fail, fmt.Sprintf("%d/%d connections verified (%d were open at once)", ok, n, open)
	}
	return Pass, fmt.Sprintf("%d connections open at once over %d ports, each echoed %s verified",
		n, len(r.eps), report.Bytes(r.o.ConcurrBuf))
}

func (r *runner) slowReader(col *collector) (string, string) {
	ep := r.eps[0]
	s, err := r.open(ep)
	if err != nil {
		r.record(ep, "", 0, err)
		col.add("%s: %v", ep, err)
		return Fail, "could not connect"
	}
	defer s.close()
	t0 := time.Now()
	if _, err := s.exchange(r.seed(), r.o.SlowBytes, true, r.o.SlowRate); err != nil {
		r.record(ep, s.target, 0, err)
		col.add("%s via %s: %v", ep, s.target, err)
		return Fail, "slow reader: echo incomplete or out of sequence"
	}
	r.record(ep, s.target, r.o.SlowBytes, nil)
	return Pass, fmt.Sprintf("%s echoed while reading at %s/s (%.2fs), every byte in sequence",
		report.Bytes(r.o.SlowBytes), report.Bytes(r.o.SlowRate), time.Since(t0).Seconds())
}
