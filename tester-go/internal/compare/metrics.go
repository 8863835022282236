package compare

import "tester-go/internal/bench"

// Metric is one number a load reports, with its unit and direction.
type Metric struct {
	Key    string // JSON key in Cell.Metrics
	Head   string // column head, unit included
	Unit   string
	Higher bool   // more is better
	Fmt    string // printf verb for one value
	of     func(*bench.Result) float64
}

func lat(r *bench.Result) *bench.Latency {
	if r.Latency == nil {
		return &bench.Latency{}
	}
	return r.Latency
}

func connectLat(r *bench.Result) *bench.Latency {
	if r.ConnectLatency == nil {
		return &bench.Latency{}
	}
	return r.ConnectLatency
}

var (
	mGBps   = Metric{"gb_per_s", "GB/s", "GB/s", true, "%.2f", func(r *bench.Result) float64 { return r.GBps }}
	mCPUGB  = Metric{"proxy_cpu_s_per_gb", "proxy CPU s/GB", "s/GB", false, "%.3f", func(r *bench.Result) float64 { return r.ProxyCPUPerGB }}
	mP50    = Metric{"p50_us", "p50 µs", "µs", false, "%.1f", func(r *bench.Result) float64 { return lat(r).P50US }}
	mP90    = Metric{"p90_us", "p90 µs", "µs", false, "%.1f", func(r *bench.Result) float64 { return lat(r).P90US }}
	mP99    = Metric{"p99_us", "p99 µs", "µs", false, "%.1f", func(r *bench.Result) float64 { return lat(r).P99US }}
	mP999   = Metric{"p999_us", "p99.9 µs", "µs", false, "%.1f", func(r *bench.Result) float64 { return lat(r).P999US }}
	mMax    = Metric{"max_us", "max µs", "µs", false, "%.1f", func(r *bench.Result) float64 { return lat(r).MaxUS }}
	mReqs   = Metric{"req_per_s", "req/s", "req/s", true, "%.0f", func(r *bench.Result) float64 { return r.ReqPerSec }}
	mConns  = Metric{"conns_per_s", "conn/s", "conn/s", true, "%.0f", func(r *bench.Result) float64 { return r.ConnsPerSec }}
	mConn99 = Metric{"connect_p99_us", "connect p99 µs", "µs", false, "%.1f", func(r *bench.Result) float64 { return connectLat(r).P99US }}
	mKiB    = Metric{"kib_per_conn", "proxy KiB/conn", "KiB/conn", false, "%.1f", func(r *bench.Result) float64 { return r.KiBPerConn }}
	mCPUC   = Metric{"cpu_us_per_conn_s", "proxy CPU µs/conn/s", "µs/conn/s", false, "%.2f", func(r *bench.Result) float64 { return r.CPUPerConn }}
	mHeld   = Metric{"idle_ok", "held conns", "conns", true, "%.0f", func(r *bench.Result) float64 { return float64(r.IdleOK) }}
)

// LoadMetrics lists what each load reports; the first is its headline.
func LoadMetrics(load string) []Metric {
	switch load {
	case "bulk", "bidi", "parallel", "iperf3-bulk":
		return []Metric{mGBps, mCPUGB}
	case "pingpong", "sockperf-pp":
		return []Metric{mP99, mP50, mP999}
	case "rr50":
		return []Metric{mReqs, mP50, mP99, mP999}
	case "churn":
		return []Metric{mConns, mConn99, mP99}
	case "connrate":
		return []Metric{mConns, mP99}
	case "idle":
		return []Metric{mKiB, mHeld}
	case "idle-mostly":
		return []Metric{mKiB, mCPUC, mP99, mHeld}
	}
	return nil
}

// Percentiles are the latency points drawn per endpoint (percentile lines).
var Percentiles = []Metric{mP50, mP90, mP99, mP999, mMax}

// HasLatency reports whether a load measures round-trip latency worth a
// percentile chart.
func HasLatency(load string) bool {
	switch load {
	case "pingpong", "sockperf-pp", "rr50", "churn":
		return true
	}
	return false
}

// Stat is one metric over the rounds of a cell.
type Stat struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

// statOf summarises one metric over runs; runs that did not produce it
// (0, e.g. a failed run) are left out.
func statOf(runs []*bench.Result, of func(*bench.Result) float64) (Stat, bool) {
	var v []float64
	for _, r := range runs {
		if x := of(r); x > 0 {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return Stat{}, false
	}
	s := Stat{Median: Median(v), Min: v[0], Max: v[0]}
	for _, x := range v {
		if x < s.Min {
			s.Min = x
		}
		if x > s.Max {
			s.Max = x
		}
	}
	return s, true
}
