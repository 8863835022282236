package compare

import (
	"fmt"
	"strings"
)

// What a goal compares against.
const (
	VsBestPeer   = "best peer"         // best of HAProxy and nginx, any config
	VsHAProxy    = "HAProxy"           // best HAProxy config
	VsBestForced = "best forced plane" // best of our endpoints other than auto
)

// Goal is one target from issues 13 and 14: Metric of Load against a
// reference, scaled by Factor (at least Factor x the reference when more
// is better, at most Factor x when less is).
type Goal struct {
	Load   string  `json:"load"`
	Metric string  `json:"metric"`
	Versus string  `json:"versus"`
	Factor float64 `json:"factor"`
	// AutoOnly goals are checked for "auto" alone.
	AutoOnly bool `json:"auto_only,omitempty"`
}

// Goals are the targets. Every load's headline also gets "auto at least
// the best forced plane" and "auto at least the best peer" (Evaluate).
var Goals = []Goal{
	{Load: "bulk", Metric: "gb_per_s", Versus: VsBestPeer, Factor: 1.5},
	{Load: "iperf3-bulk", Metric: "gb_per_s", Versus: VsBestPeer, Factor: 1.5},
	{Load: "bidi", Metric: "gb_per_s", Versus: VsBestPeer, Factor: 1},
	{Load: "parallel", Metric: "gb_per_s", Versus: VsBestPeer, Factor: 1},
	{Load: "pingpong", Metric: "p99_us", Versus: VsBestPeer, Factor: 1},
	{Load: "pingpong", Metric: "p50_us", Versus: VsBestPeer, Factor: 1},
	{Load: "sockperf-pp", Metric: "p99_us", Versus: VsBestPeer, Factor: 1},
	{Load: "sockperf-pp", Metric: "p50_us", Versus: VsBestPeer, Factor: 1},
	{Load: "rr50", Metric: "req_per_s", Versus: VsBestPeer, Factor: 1.2},
	{Load: "churn", Metric: "conns_per_s", Versus: VsHAProxy, Factor: 1.2},
	{Load: "churn", Metric: "conns_per_s", Versus: VsBestPeer, Factor: 1},
	{Load: "connrate", Metric: "conns_per_s", Versus: VsBestPeer, Factor: 1},
	{Load: "idle", Metric: "kib_per_conn", Versus: VsHAProxy, Factor: 1},
	{Load: "idle-mostly", Metric: "kib_per_conn", Versus: VsHAProxy, Factor: 1},
}

// Check is one goal evaluated for one of our endpoints.
type Check struct {
	Goal
	Endpoint string  `json:"endpoint"`
	Value    float64 `json:"value"`
	RefName  string  `json:"ref_name"`
	Ref      float64 `json:"ref"`
	Ratio    float64 `json:"ratio"`
	Pass     bool    `json:"pass"`
}

func metricOf(load, key string) (Metric, bool) {
	for _, m := range append(LoadMetrics(load), Percentiles...) {
		if m.Key == key {
			return m, true
		}
	}
	return Metric{}, false
}

// goalsFor lists the goals of the report's loads: the fixed targets plus,
// for auto, its headline against the best forced plane and the best peer.
func goalsFor(loads []string) []Goal {
	var gs []Goal
	for _, l := range loads {
		ms := LoadMetrics(l)
		if len(ms) == 0 {
			continue
		}
		head := ms[0].Key
		hasPeerHead := false
		for _, g := range Goals {
			if g.Load == l {
				gs = append(gs, g)
				hasPeerHead = hasPeerHead || (g.Metric == head && g.Versus == VsBestPeer)
			}
		}
		if !hasPeerHead {
			gs = append(gs, Goal{Load: l, Metric: head, Versus: VsBestPeer, Factor: 1, AutoOnly: true})
		}
		gs = append(gs, Goal{Load: l, Metric: head, Versus: VsBestForced, Factor: 1, AutoOnly: true})
	}
	return gs
}

// reference picks the goal's reference endpoint and value for ours: the
// best median among the candidates.
func (rep *Report) reference(g Goal, m Metric) (string, Stat) {
	var name string
	var best Stat
	for _, row := range rep.Rows {
		e := row.Endpoint
		switch g.Versus {
		case VsBestPeer:
			if e.Role != RolePeer {
				continue
			}
		case VsHAProxy:
			if e.Role != RolePeer || !strings.HasPrefix(e.Name, "haproxy") {
				continue
			}
		case VsBestForced:
			if e.Role != RoleOurs || e.Name == "auto" {
				continue
			}
		}
		c := rep.cell(e.Name, g.Load)
		if c == nil || c.Errors > 0 {
			continue
		}
		s, ok := c.Metrics[g.Metric]
		if !ok {
			continue
		}
		if name == "" || (m.Higher && s.Median > best.Median) || (!m.Higher && s.Median < best.Median) {
			name, best = e.Name, s
		}
	}
	return name, best
}

// Evaluate checks every goal for each of our endpoints (AutoOnly goals for
// auto alone). Against the best forced plane, auto passes when its median
// is within or beyond that plane's range over the rounds (the spread);
// every other goal compares medians. A cell with errors fails.
func Evaluate(rep *Report) []Check {
	var out []Check
	for _, g := range goalsFor(rep.Loads) {
		m, ok := metricOf(g.Load, g.Metric)
		if !ok {
			continue
		}
		refName, ref := rep.reference(g, m)
		if refName == "" {
			continue
		}
		for _, row := range rep.Rows {
			e := row.Endpoint
			if e.Role != RoleOurs || (g.AutoOnly && e.Name != "auto") {
				continue
			}
			c := rep.cell(e.Name, g.Load)
			if c == nil {
				continue
			}
			v := c.Metrics[g.Metric]
			ch := Check{Goal: g, Endpoint: e.Name, Value: v.Median, RefName: refName, Ref: ref.Median}
			if ref.Median > 0 {
				ch.Ratio = v.Median / ref.Median
			}
			bound := g.Factor * ref.Median
			if g.Versus == VsBestForced {
				bound = ref.Min
				if !m.Higher {
					bound = ref.Max
				}
			}
			ch.Pass = c.Errors == 0 && v.Median > 0 &&
				((m.Higher && v.Median >= bound) || (!m.Higher && v.Median <= bound))
			out = append(out, ch)
		}
	}
	return out
}

// Describe is the goal as a sentence: "rr50 req/s ≥ 1.2× best peer".
func (g Goal) Describe() string {
	m, _ := metricOf(g.Load, g.Metric)
	op := "≥"
	if !m.Higher {
		op = "≤"
	}
	f := ""
	if g.Factor != 1 {
		f = fmt.Sprintf("%.1f× ", g.Factor)
	}
	return fmt.Sprintf("%s %s %s %s%s", g.Load, m.Head, op, f, g.Versus)
}

// verdict is the one summary line: the default plane (auto, else the first
// of ours) against its goals, failures named.
func verdict(rep *Report) string {
	who := ""
	for _, row := range rep.Rows {
		if row.Endpoint.Role == RoleOurs && (who == "" || row.Endpoint.Name == "auto") {
			who = row.Endpoint.Name
		}
	}
	var bad []string
	for _, row := range rep.Rows {
		if row.Errors > 0 {
			bad = append(bad, fmt.Sprintf("%s (%d)", row.Endpoint.Name, row.Errors))
		}
	}
	errs := ""
	if len(bad) > 0 {
		errs = "; ERRORS: " + strings.Join(bad, ", ")
	}
	if who == "" {
		return "no endpoint of ours measured" + errs
	}
	pass, total := 0, 0
	var fails []string
	for _, c := range rep.Goals {
		if c.Endpoint != who {
			continue
		}
		total++
		if c.Pass {
			pass++
		} else {
			fails = append(fails, fmt.Sprintf("%s (%.2f× %s)", c.Describe(), c.Ratio, c.RefName))
		}
	}
	if total == 0 {
		return fmt.Sprintf("%s: no peer measured, no target checked%s", who, errs)
	}
	s := fmt.Sprintf("%s meets %d of %d targets against the best peer", who, pass, total)
	if len(fails) > 0 {
		s += "; misses " + strings.Join(fails, ", ")
	}
	return s + errs
}
