package compare

import (
	"strings"
	"testing"

	"tester-go/internal/bench"
)

// synthetic builds a report from medians (min = max = median unless a
// spread is given) without running anything.
func synthetic(loads []string, eps []Endpoint, vals map[string]map[string]Stat) *Report {
	rep := &Report{Loads: loads, Rounds: 1, OK: true}
	for _, e := range eps {
		rep.Rows = append(rep.Rows, &Row{Endpoint: e})
		for _, l := range loads {
			c := &Cell{Endpoint: e.Name, Load: l, Client: "tester-go", Metrics: map[string]Stat{},
				Runs: []*bench.Result{{Load: l, Client: "tester-go", Verified: "synthetic"}}}
			for k, s := range vals[e.Name+"/"+l] {
				c.Metrics[k] = s
			}
			rep.Cells = append(rep.Cells, c)
		}
	}
	rep.Goals = Evaluate(rep)
	rep.Verdict = verdict(rep)
	return rep
}

func at(v float64) Stat { return Stat{Median: v, Min: v, Max: v} }

func TestEvaluateGoals(t *testing.T) {
	eps := []Endpoint{{Name: "direct", Role: RoleBase}, {Name: "auto", Role: RoleOurs}, {Name: "splice", Role: RoleOurs},
		{Name: "haproxy", Role: RolePeer}, {Name: "haproxy-splice", Role: RolePeer}, {Name: "nginx", Role: RolePeer}}
	tests := []struct {
		name  string
		load  string
		key   string
		vals  map[string]float64 // endpoint -> median
		goal  string             // Describe() of the checked goal
		who   string
		pass  bool
		ratio float64
	}{
		{"bulk 1.5x passes", "bulk", "gb_per_s", map[string]float64{"auto": 3, "splice": 2, "haproxy": 1, "nginx": 2}, "bulk GB/s ≥ 1.5× best peer", "auto", true, 1.5},
		{"bulk 1.4x fails", "bulk", "gb_per_s", map[string]float64{"auto": 2.8, "splice": 2, "haproxy": 1, "nginx": 2}, "bulk GB/s ≥ 1.5× best peer", "auto", false, 1.4},
		{"rr50 1.2x fails on splice", "rr50", "req_per_s", map[string]float64{"auto": 130, "splice": 110, "nginx": 100}, "rr50 req/s ≥ 1.2× best peer", "splice", false, 1.1},
		{"pingpong p99 lower passes", "pingpong", "p99_us", map[string]float64{"auto": 90, "splice": 95, "haproxy": 100, "nginx": 120}, "pingpong p99 µs ≤ best peer", "auto", true, 0.9},
		{"pingpong p99 picks the lowest peer", "pingpong", "p99_us", map[string]float64{"auto": 110, "splice": 95, "haproxy": 100, "nginx": 120}, "pingpong p99 µs ≤ best peer", "auto", false, 1.1},
		{"churn vs HAProxy ignores nginx", "churn", "conns_per_s", map[string]float64{"auto": 1300, "splice": 1, "haproxy": 1000, "haproxy-splice": 1080, "nginx": 2000}, "churn conn/s ≥ 1.2× HAProxy", "auto", true, 1300.0 / 1080},
		{"idle KiB vs HAProxy", "idle", "kib_per_conn", map[string]float64{"auto": 4, "splice": 6, "haproxy": 3.5, "nginx": 9}, "idle proxy KiB/conn ≤ HAProxy", "splice", false, 6 / 3.5},
		{"auto under the best forced plane fails", "parallel", "gb_per_s", map[string]float64{"auto": 1, "splice": 2, "nginx": 0.5}, "parallel GB/s ≥ best forced plane", "auto", false, 0.5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vals := map[string]map[string]Stat{}
			for e, v := range tt.vals {
				vals[e+"/"+tt.load] = map[string]Stat{tt.key: at(v)}
			}
			rep := synthetic([]string{tt.load}, eps, vals)
			var found *Check
			for i, c := range rep.Goals {
				if c.Endpoint == tt.who && c.Describe() == tt.goal {
					found = &rep.Goals[i]
				}
			}
			if found == nil {
				t.Fatalf("no check %q for %s in %+v", tt.goal, tt.who, rep.Goals)
			}
			if found.Pass != tt.pass || abs(found.Ratio-tt.ratio) > 1e-9 {
				t.Errorf("%s: pass %v ratio %v, want %v %v", tt.goal, found.Pass, found.Ratio, tt.pass, tt.ratio)
			}
			if !tt.pass && tt.who == "auto" && !strings.Contains(rep.Verdict, "misses "+tt.goal) {
				t.Errorf("verdict does not name the miss: %s", rep.Verdict)
			}
		})
	}
}

// Against the best forced plane, auto passes within that plane's spread.
func TestAutoWithinForcedSpread(t *testing.T) {
	eps := []Endpoint{{Name: "auto", Role: RoleOurs}, {Name: "splice", Role: RoleOurs}, {Name: "nginx", Role: RolePeer}}
	tests := []struct {
		auto float64
		pass bool
	}{{1.9, true}, {1.7, false}}
	for _, tt := range tests {
		rep := synthetic([]string{"bidi"}, eps, map[string]map[string]Stat{
			"auto/bidi":   {"gb_per_s": at(tt.auto)},
			"splice/bidi": {"gb_per_s": {Median: 2, Min: 1.8, Max: 2.2}},
			"nginx/bidi":  {"gb_per_s": at(1)},
		})
		for _, c := range rep.Goals {
			if c.Versus == VsBestForced && c.Pass != tt.pass {
				t.Errorf("auto %.1f vs splice 2 (1.8–2.2): pass %v, want %v", tt.auto, c.Pass, tt.pass)
			}
		}
	}
}

func TestFmtStat(t *testing.T) {
	tests := []struct {
		m    Metric
		s    Stat
		want string
	}{
		{mGBps, Stat{Median: 1.234, Min: 1.1, Max: 1.3}, "1.23 (1.10–1.30)"},
		{mGBps, at(2), "2.00"},
		{mConns, Stat{Median: 5000.4, Min: 4999.6, Max: 5000.2}, "5000"},
		{mP99, Stat{}, "-"},
	}
	for _, tt := range tests {
		if got := fmtStat(tt.m, tt.s); got != tt.want {
			t.Errorf("fmtStat(%s, %+v) = %q, want %q", tt.m.Key, tt.s, got, tt.want)
		}
	}
}

func TestStatOf(t *testing.T) {
	runs := []*bench.Result{{ReqPerSec: 30}, {ReqPerSec: 10}, {ReqPerSec: 0}, {ReqPerSec: 20}}
	s, ok := statOf(runs, mReqs.of)
	if !ok || s != (Stat{Median: 20, Min: 10, Max: 30}) {
		t.Fatalf("statOf = %+v %v (a run without the metric must be left out)", s, ok)
	}
	if _, ok := statOf([]*bench.Result{{}}, mReqs.of); ok {
		t.Fatal("statOf of no values reported one")
	}
}

func TestMarkdownUnitsAndRoles(t *testing.T) {
	eps := []Endpoint{{Name: "direct", Role: RoleBase}, {Name: "auto", Role: RoleOurs}, {Name: "nginx", Role: RolePeer}}
	rep := synthetic([]string{"rr50", "idle-mostly"}, eps, map[string]map[string]Stat{
		"auto/rr50":         {"req_per_s": {Median: 120, Min: 110, Max: 125}, "p99_us": at(300)},
		"nginx/rr50":        {"req_per_s": at(100), "p99_us": at(400)},
		"auto/idle-mostly":  {"kib_per_conn": at(3), "cpu_us_per_conn_s": at(0.5)},
		"nginx/idle-mostly": {"kib_per_conn": at(9), "cpu_us_per_conn_s": at(0.2)},
	})
	var md strings.Builder
	rep.WriteMarkdown(&md, "")
	out := md.String()
	for _, want := range []string{"| endpoint | role | client | req/s | p50 µs | p99 µs | p99.9 µs | × best peer (req/s)", "120 (110–125)", "1.20×",
		"PASS req/s ≥ 1.2× best peer (1.20× nginx)", "proxy CPU µs/conn/s", "| nginx | peer |", "| **auto** | ours |", "![rr50](rr50.svg)", "latency-rr50.svg"} {
		if !strings.Contains(out, want) {
			t.Errorf("markdown lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "verdict") > 0 || strings.Count(out, rep.Verdict) != 1 {
		t.Errorf("verdict duplicated or prefixed:\n%s", out)
	}
}

func abs(v float64) float64 {
	if v < 0 {
		return -v
	}
	return v
}
