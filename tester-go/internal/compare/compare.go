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
	"tester-go/internal/report"
)

// Endpoint is a named address, optionally with the pid of the proxy
// serving it (for CPU and RSS).
type Endpoint struct {
	Name string `json:"name"`
	Addr string `json:"addr"`
	PID  int    `json:"pid,omitempty"`
}

// ParseEndpoint parses NAME=HOST:PORT[,pid=PID].
func ParseEndpoint(s string) (Endpoint, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok || name == "" || rest == "" {
		return Endpoint{}, fmt.Errorf("bad endpoint %q: want NAME=HOST:PORT[,pid=PID]", s)
	}
	parts := strings.Split(rest, ",")
	e := Endpoint{Name: name, Addr: parts[0]}
	if _, _, err := splitHostPort(e.Addr); err != nil {
		return Endpoint{}, fmt.Errorf("bad endpoint %q: %v", s, err)
	}
	for _, p := range parts[1:] {
		k, v, _ := strings.Cut(p, "=")
		if k != "pid" {
			return Endpoint{}, fmt.Errorf("bad endpoint %q: unknown option %q (only pid=PID)", s, p)
		}
		pid, err := strconv.Atoi(v)
		if err != nil || pid <= 0 {
			return Endpoint{}, fmt.Errorf("bad endpoint %q: bad pid %q", s, v)
		}
		e.PID = pid
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
	Timeout   time.Duration
	Progress  io.Writer // one line per run, if set
}

// Cell is one endpoint x load: every round's result and the medians.
type Cell struct {
	Endpoint    string          `json:"endpoint"`
	Load        string          `json:"load"`
	Runs        []*bench.Result `json:"runs"`
	GBps        float64         `json:"median_gb_per_s,omitempty"`
	P50US       float64         `json:"median_p50_us,omitempty"`
	P99US       float64         `json:"median_p99_us,omitempty"`
	ConnsPerSec float64         `json:"median_conns_per_s,omitempty"`
	IdleOK      float64         `json:"median_idle_ok,omitempty"`
	KiBPerConn  float64         `json:"median_proxy_kib_per_conn,omitempty"`
	Errors      int64           `json:"errors"`
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
	Rows      []*Row   `json:"endpoints"`
	Cells     []*Cell  `json:"results"`
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
	rep := &Report{Loads: o.Loads, Rounds: o.Rounds, DurationS: o.Duration.Seconds(), OK: true}
	cells := map[string]*Cell{}
	key := func(e, l string) string { return e + "\x00" + l }
	for _, e := range o.Endpoints {
		rep.Rows = append(rep.Rows, &Row{Endpoint: e})
		for _, l := range o.Loads {
			c := &Cell{Endpoint: e.Name, Load: l}
			cells[key(e.Name, l)] = c
			rep.Cells = append(rep.Cells, c)
		}
	}
	for round := 0; round < o.Rounds; round++ {
		for _, l := range o.Loads {
			eps := append([]Endpoint(nil), o.Endpoints...)
			if round%2 == 1 {
				for i, j := 0, len(eps)-1; i < j; i, j = i+1, j-1 {
					eps[i], eps[j] = eps[j], eps[i]
				}
			}
			for _, e := range eps {
				r, err := bench.Run(bench.Options{Target: e.Addr, Load: l, Duration: o.Duration,
					Streams: o.Streams, Conns: o.Conns, ProxyPID: e.PID, Timeout: o.Timeout})
				if err != nil {
					r = &bench.Result{Load: l, Target: e.Addr, Errors: 1, FirstError: err.Error()}
				}
				c := cells[key(e.Name, l)]
				c.Runs = append(c.Runs, r)
				if o.Progress != nil {
					fmt.Fprintf(o.Progress, "compare: round %d/%d %-8s %-10s %s\n", round+1, o.Rounds, l, e.Name, r.Verdict())
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
	rep.Verdict = verdict(rep)
	return rep
}

func summarise(c *Cell) {
	pick := func(f func(*bench.Result) float64) float64 {
		var v []float64
		for _, r := range c.Runs {
			v = append(v, f(r))
		}
		return Median(v)
	}
	for _, r := range c.Runs {
		c.Errors += r.Errors
		if r.IdleOK != r.IdleWanted {
			c.Errors++
		}
	}
	c.GBps = pick(func(r *bench.Result) float64 { return r.GBps })
	c.ConnsPerSec = pick(func(r *bench.Result) float64 { return r.ConnsPerSec })
	c.IdleOK = pick(func(r *bench.Result) float64 { return float64(r.IdleOK) })
	c.KiBPerConn = pick(func(r *bench.Result) float64 { return r.KiBPerConn })
	if c.Load == "pingpong" {
		c.P50US = pick(func(r *bench.Result) float64 { return lat(r).P50US })
		c.P99US = pick(func(r *bench.Result) float64 { return lat(r).P99US })
	}
}

func lat(r *bench.Result) *bench.Latency {
	if r.Latency == nil {
		return &bench.Latency{}
	}
	return r.Latency
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

func verdict(rep *Report) string {
	var parts []string
	best := func(load, what string, val func(*Cell) float64, lower bool, unit string) {
		if !rep.has(load) {
			return
		}
		bestName, bestV := "", 0.0
		for _, row := range rep.Rows {
			c := rep.cell(row.Endpoint.Name, load)
			v := val(c)
			if v <= 0 || c.Errors > 0 {
				continue
			}
			if bestName == "" || (lower && v < bestV) || (!lower && v > bestV) {
				bestName, bestV = row.Endpoint.Name, v
			}
		}
		if bestName != "" {
			parts = append(parts, fmt.Sprintf("%s: %s (%s)", what, bestName, fmtNum(bestV, unit)))
		}
	}
	best("bulk", "fastest bulk", func(c *Cell) float64 { return c.GBps }, false, "GB/s")
	best("bidi", "fastest bidi", func(c *Cell) float64 { return c.GBps }, false, "GB/s")
	best("parallel", "fastest parallel", func(c *Cell) float64 { return c.GBps }, false, "GB/s")
	best("pingpong", "lowest p50", func(c *Cell) float64 { return c.P50US }, true, "µs")
	best("connrate", "highest conn rate", func(c *Cell) float64 { return c.ConnsPerSec }, false, "conn/s")
	best("idle", "least proxy memory", func(c *Cell) float64 { return c.KiBPerConn }, true, "KiB/conn")
	cheapest, cheapV := "", 0.0
	for _, row := range rep.Rows {
		if row.ProxyCPUPerGB > 0 && (cheapest == "" || row.ProxyCPUPerGB < cheapV) {
			cheapest, cheapV = row.Endpoint.Name, row.ProxyCPUPerGB
		}
	}
	if cheapest != "" {
		parts = append(parts, fmt.Sprintf("lowest proxy CPU: %s (%.3f s/GB)", cheapest, cheapV))
	}
	var bad []string
	for _, row := range rep.Rows {
		if row.Errors > 0 {
			bad = append(bad, fmt.Sprintf("%s (%d)", row.Endpoint.Name, row.Errors))
		}
	}
	s := "verdict: " + strings.Join(parts, "; ")
	if len(bad) > 0 {
		s += "; ERRORS: " + strings.Join(bad, ", ")
	}
	return s
}

func fmtNum(v float64, unit string) string {
	switch unit {
	case "GB/s":
		return fmt.Sprintf("%.2f GB/s", v)
	case "µs", "KiB/conn":
		return fmt.Sprintf("%.1f %s", v, unit)
	}
	return fmt.Sprintf("%.0f %s", v, unit)
}

type column struct {
	head  string
	load  string
	val   func(*Cell) float64
	fmt   string
	ratio bool
}

func (rep *Report) columns() []column {
	var cols []column
	for _, l := range rep.Loads {
		switch l {
		case "bulk", "bidi", "parallel":
			cols = append(cols, column{l + " GB/s", l, func(c *Cell) float64 { return c.GBps }, "%.2f", true})
		case "pingpong":
			cols = append(cols, column{"p50 µs", l, func(c *Cell) float64 { return c.P50US }, "%.1f", true},
				column{"p99 µs", l, func(c *Cell) float64 { return c.P99US }, "%.1f", false})
		case "connrate":
			cols = append(cols, column{"conn/s", l, func(c *Cell) float64 { return c.ConnsPerSec }, "%.0f", true})
		case "idle":
			cols = append(cols, column{"idle held", l, func(c *Cell) float64 { return c.IdleOK }, "%.0f", false},
				column{"KiB/conn", l, func(c *Cell) float64 { return c.KiBPerConn }, "%.1f", false})
		}
	}
	return cols
}

func (rep *Report) table() (head []string, rows [][]string) {
	cols := rep.columns()
	head = []string{"ENDPOINT"}
	for _, c := range cols {
		head = append(head, c.head)
	}
	head = append(head, "proxy CPU s/GB", "sys CPU s/GB", "errors")
	var direct string
	for _, row := range rep.Rows {
		if row.Endpoint.Name == "direct" {
			direct = row.Endpoint.Name
		}
	}
	for _, row := range rep.Rows {
		cells := []string{row.Endpoint.Name}
		for _, col := range cols {
			c := rep.cell(row.Endpoint.Name, col.load)
			v := col.val(c)
			s := fmt.Sprintf(col.fmt, v)
			if v == 0 {
				s = "-"
			}
			if col.ratio && direct != "" && row.Endpoint.Name != direct && v > 0 {
				if d := col.val(rep.cell(direct, col.load)); d > 0 {
					s += fmt.Sprintf(" (%.2fx)", v/d)
				}
			}
			cells = append(cells, s)
		}
		p := "-"
		if row.Endpoint.PID > 0 && row.SysCPUPerGB > 0 {
			p = fmt.Sprintf("%.3f", row.ProxyCPUPerGB)
		}
		sy := "-"
		if row.SysCPUPerGB > 0 {
			sy = fmt.Sprintf("%.3f", row.SysCPUPerGB)
		}
		cells = append(cells, p, sy, strconv.FormatInt(row.Errors, 10))
		rows = append(rows, cells)
	}
	return head, rows
}

// WriteText prints the comparison table and verdict.
func (rep *Report) WriteText(w io.Writer) {
	head, rows := rep.table()
	fmt.Fprintf(w, "medians over %d round(s) of %s per load; (x) = ratio vs \"direct\"\n", rep.Rounds, report.Dur(time.Duration(rep.DurationS*float64(time.Second))))
	tw := report.Table(w)
	report.Row(tw, toIface(head)...)
	for _, r := range rows {
		report.Row(tw, toIface(r)...)
	}
	tw.Flush()
	fmt.Fprintln(w, rep.Verdict)
}

// WriteMarkdown writes the same table as Markdown.
func (rep *Report) WriteMarkdown(w io.Writer) {
	head, rows := rep.table()
	fmt.Fprintf(w, "Medians over %d round(s) of %.1f s per load; (x) = ratio vs `direct`.\n\n", rep.Rounds, rep.DurationS)
	fmt.Fprintf(w, "| %s |\n", strings.Join(head, " | "))
	seps := make([]string, len(head))
	for i := range seps {
		seps[i] = "---"
		if i > 0 {
			seps[i] = "---:"
		}
	}
	fmt.Fprintf(w, "| %s |\n", strings.Join(seps, " | "))
	for _, r := range rows {
		fmt.Fprintf(w, "| %s |\n", strings.Join(r, " | "))
	}
	fmt.Fprintf(w, "\n%s\n", rep.Verdict)
}

// WriteJSON writes the full report, including every run.
func (rep *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

func toIface(s []string) []interface{} {
	out := make([]interface{}, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}
