// Package compare runs bench loads against several endpoints, interleaved
// round by round, and reports medians side by side.
package compare

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"tester-go/internal/bench"
)

// Roles of endpoints: ours are judged against the best peer; the base
// (a direct connection) is context only.
const (
	RoleOurs = "ours"
	RolePeer = "peer"
	RoleBase = "base"
)

// Endpoint is a named address, optionally with the pid of the proxy
// serving it (for CPU and RSS), its role and the address that reaches the
// sockperf server through it.
type Endpoint struct {
	Name     string `json:"name"`
	Addr     string `json:"addr"`
	PID      int    `json:"pid,omitempty"`
	MorePIDs []int  `json:"more_pids,omitempty"` // the proxy's other processes (pid=A+B+...)
	Role     string `json:"role"`
	Sockperf string `json:"sockperf,omitempty"`
	Iperf3   string `json:"iperf3,omitempty"`
}

// ParseEndpoint parses NAME=HOST:PORT[,pid=PID[+PID...]][,role=ours|peer|base]
// [,sockperf=HOST:PORT][,iperf3=HOST:PORT]. The role defaults to base for "direct", else ours.
func ParseEndpoint(s string) (Endpoint, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok || name == "" || rest == "" {
		return Endpoint{}, fmt.Errorf("bad endpoint %q: want NAME=HOST:PORT[,pid=PID][,role=ours|peer|base][,sockperf=HOST:PORT]", s)
	}
	parts := strings.Split(rest, ",")
	e := Endpoint{Name: name, Addr: parts[0], Role: RoleOurs}
	if name == "direct" {
		e.Role = RoleBase
	}
	if _, _, err := splitHostPort(e.Addr); err != nil {
		return Endpoint{}, fmt.Errorf("bad endpoint %q: %v", s, err)
	}
	for _, p := range parts[1:] {
		k, v, _ := strings.Cut(p, "=")
		switch k {
		case "pid":
			for i, x := range strings.Split(v, "+") {
				pid, err := strconv.Atoi(x)
				if err != nil || pid <= 0 {
					return Endpoint{}, fmt.Errorf("bad endpoint %q: bad pid %q", s, x)
				}
				if i == 0 {
					e.PID = pid
				} else {
					e.MorePIDs = append(e.MorePIDs, pid)
				}
			}
		case "role":
			if v != RoleOurs && v != RolePeer && v != RoleBase {
				return Endpoint{}, fmt.Errorf("bad endpoint %q: role %q (want ours, peer or base)", s, v)
			}
			e.Role = v
		case "sockperf":
			if _, _, err := splitHostPort(v); err != nil {
				return Endpoint{}, fmt.Errorf("bad endpoint %q: sockperf: %v", s, err)
			}
			e.Sockperf = v
		case "iperf3":
			if _, _, err := splitHostPort(v); err != nil {
				return Endpoint{}, fmt.Errorf("bad endpoint %q: iperf3: %v", s, err)
			}
			e.Iperf3 = v
		default:
			return Endpoint{}, fmt.Errorf("bad endpoint %q: unknown option %q (pid=, role=, sockperf=, iperf3=)", s, p)
		}
	}
	return e, nil
}

func splitHostPort(a string) (string, int, error) {
	i := strings.LastIndexByte(a, ':')
	if i <= 0 {
		return "", 0, fmt.Errorf("address %q is not HOST:PORT", a)
	}
	p, err := strconv.Atoi(a[i+1:])
	if err != nil || p < 1 || p > 65535 {
		return "", 0, fmt.Errorf("address %q has a bad port", a)
	}
	return a[:i], p, nil
}

// Options configure a comparison.
type Options struct {
	Endpoints []Endpoint
	Loads     []string
	Duration  time.Duration
	Rounds    int
	Streams   int
	Conns     int
	RRConns   int
	Clients   int
	Hold      time.Duration // idle-mostly's hold (Duration if 0)
	Interval  time.Duration // idle-mostly's mean message gap
	Timeout   time.Duration
	Progress  io.Writer // one line per run, if set
	// Prev: an earlier report of the same endpoints and loads whose runs
	// this one continues (its rounds count first). The bench restarts the
	// proxies between rounds this way, so every round's memory per
	// connection is measured in a fresh process, not in memory an earlier
	// round's 2,000 connections left behind.
	Prev *Report
}

// Cell is one endpoint x load: every round's result and, per metric
// (LoadMetrics, Percentiles), the median, min and max over the rounds.
type Cell struct {
	Endpoint string          `json:"endpoint"`
	Load     string          `json:"load"`
	Client   string          `json:"client"`
	Runs     []*bench.Result `json:"runs"`
	Metrics  map[string]Stat `json:"metrics"`
	Errors   int64           `json:"errors"`
}

// Get returns the cell's stat for a metric key (zero if absent).
func (c *Cell) Get(key string) Stat {
	if c == nil {
		return Stat{}
	}
	return c.Metrics[key]
}

// Row is one endpoint's CPU cost over its byte-moving loads.
type Row struct {
	Endpoint      Endpoint `json:"endpoint"`
	ProxyCPUPerGB float64  `json:"proxy_cpu_s_per_gb,omitempty"`
	SysCPUPerGB   float64  `json:"sys_cpu_s_per_gb,omitempty"`
	Errors        int64    `json:"errors"`
}

// Report is the whole comparison.
type Report struct {
	Loads     []string `json:"loads"`
	Rounds    int      `json:"rounds"`
	DurationS float64  `json:"duration_s"`
	HoldS     float64  `json:"idle_mostly_hold_s,omitempty"`
	Conns     int      `json:"idle_conns,omitempty"`
	Rows      []*Row   `json:"endpoints"`
	Cells     []*Cell  `json:"results"`
	Goals     []Check  `json:"goals"`
	Verdict   string   `json:"verdict"`
	OK        bool     `json:"ok"`
}

// Run executes rounds x loads x endpoints, one load at a time for every
// endpoint (endpoint order reversed on odd rounds) so drift in machine
// noise spreads across endpoints.
func Run(o Options) *Report {
	if o.Rounds <= 0 {
		o.Rounds = 1
	}
	if o.Hold <= 0 {
		o.Hold = o.Duration
	}
	first := 0
	if o.Prev != nil {
		first = o.Prev.Rounds
	}
	rep := &Report{Loads: o.Loads, Rounds: first + o.Rounds, DurationS: o.Duration.Seconds(), OK: true}
	for _, l := range o.Loads {
		if l == "idle-mostly" {
			rep.HoldS = o.Hold.Seconds()
		}
		if l == "idle" || l == "idle-mostly" {
			rep.Conns = o.Conns
		}
	}
	cells := map[string]*Cell{}
	key := func(e, l string) string { return e + "\x00" + l }
	for _, e := range o.Endpoints {
		rep.Rows = append(rep.Rows, &Row{Endpoint: e})
		for _, l := range o.Loads {
			c := &Cell{Endpoint: e.Name, Load: l}
			if o.Prev != nil {
				if p := o.Prev.cell(e.Name, l); p != nil {
					c.Runs = p.Runs
				}
			}
			cells[key(e.Name, l)] = c
			rep.Cells = append(rep.Cells, c)
		}
	}
	for round := first; round < first+o.Rounds; round++ {
		for _, l := range o.Loads {
			eps := append([]Endpoint(nil), o.Endpoints...)
			if round%2 == 1 {
				for i, j := 0, len(eps)-1; i < j; i, j = i+1, j-1 {
					eps[i], eps[j] = eps[j], eps[i]
				}
			}
			for _, e := range eps {
				r, err := bench.Run(bench.Options{Target: e.Addr, Load: l, Duration: o.Duration,
					Streams: o.Streams, Conns: o.Conns, ProxyPID: e.PID, MorePIDs: e.MorePIDs, Timeout: o.Timeout,
					RRConns: o.RRConns, Clients: o.Clients, Hold: o.Hold, Interval: o.Interval,
					SockperfTarget: e.Sockperf, Iperf3Target: e.Iperf3})
				if err != nil {
					r = &bench.Result{Load: l, Target: e.Addr, Errors: 1, FirstError: err.Error()}
				}
				c := cells[key(e.Name, l)]
				c.Runs = append(c.Runs, r)
				if o.Progress != nil {
					fmt.Fprintf(o.Progress, "compare: round %d/%d %-8s %-10s %s\n", round+1, rep.Rounds, l, e.Name, r.Verdict())
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}
	for _, row := range rep.Rows {
		var pcpu, scpu float64
		var bytes int64
		for _, l := range o.Loads {
			c := cells[key(row.Endpoint.Name, l)]
			summarise(c)
			row.Errors += c.Errors
			for _, r := range c.Runs {
				if r.Bytes > 0 {
					pcpu += r.ProxyCPU
					scpu += r.SysCPU
					bytes += r.Bytes
				}
			}
		}
		if bytes > 0 {
			gb := float64(bytes) / 1e9
			row.SysCPUPerGB = scpu / gb
			if row.Endpoint.PID > 0 {
				row.ProxyCPUPerGB = pcpu / gb
			}
		}
		if row.Errors > 0 {
			rep.OK = false
		}
	}
	rep.Goals = Evaluate(rep)
	rep.Verdict = verdict(rep)
	return rep
}

func summarise(c *Cell) {
	c.Metrics = map[string]Stat{}
	for _, r := range c.Runs {
		c.Errors += r.Errors
		if r.IdleOK != r.IdleWanted {
			c.Errors++
		}
		if c.Client == "" {
			c.Client = r.Client
		}
	}
	ms := LoadMetrics(c.Load)
	if HasLatency(c.Load) {
		ms = append(ms, Percentiles...)
	}
	for _, m := range ms {
		if s, ok := statOf(c.Runs, m.of); ok {
			c.Metrics[m.Key] = s
		}
	}
}

// Median of v (mean of the middle two for even counts); 0 for none.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

func (rep *Report) cell(e, l string) *Cell {
	for _, c := range rep.Cells {
		if c.Endpoint == e && c.Load == l {
			return c
		}
	}
	return nil
}

func (rep *Report) has(l string) bool {
	for _, x := range rep.Loads {
		if x == l {
			return true
		}
	}
	return false
}

// ReadReport reads a report written by WriteJSON (to continue it, Prev).
func ReadReport(r io.Reader) (*Report, error) {
	var rep Report
	if err := json.NewDecoder(r).Decode(&rep); err != nil {
		return nil, fmt.Errorf("reading an earlier report: %v", err)
	}
	return &rep, nil
}

// Estimate is the wall time of a comparison: every load's duration (the
// hold for idle-mostly, plus a second or two to open and check
// connections) for every endpoint, every round.
func Estimate(loads []string, endpoints, rounds int, duration, hold time.Duration) time.Duration {
	var per time.Duration
	for _, l := range loads {
		switch l {
		case "idle-mostly":
			per += hold + 2*time.Second
		case "idle":
			per += duration + 2*time.Second
		case "sockperf-pp", "iperf3-bulk":
			per += duration.Round(time.Second) + time.Second
		default:
			per += duration + 100*time.Millisecond
		}
	}
	return per * time.Duration(endpoints*rounds)
}
