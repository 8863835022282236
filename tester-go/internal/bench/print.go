package bench

import (
	"encoding/json"
	"fmt"
	"io"

	"tester-go/internal/report"
)

// WriteText prints one result as an aligned metric/value table and a
// one-line verdict.
func (r *Result) WriteText(w io.Writer) {
	tw := report.Table(w)
	report.Row(tw, "METRIC", "VALUE")
	report.Row(tw, "load", r.Load)
	report.Row(tw, "target", r.Target)
	report.Row(tw, "client", r.Client)
	report.Row(tw, "duration", fmt.Sprintf("%.2f s", r.Seconds))
	if r.Streams > 0 {
		report.Row(tw, "streams", r.Streams)
	}
	if r.Bytes > 0 {
		report.Row(tw, "bytes", report.Bytes(r.Bytes))
		report.Row(tw, "throughput", fmt.Sprintf("%.3f GB/s (%.2f Gbit/s)", r.GBps, r.GBps*8))
	}
	if r.Latency != nil {
		l := r.Latency
		label := "round trip"
		switch r.Load {
		case "connrate":
			label = "connect+first byte"
		case "churn":
			label = "connect+exchange+EOF"
		case "idle-mostly":
			label = "idle message round trip"
		}
		report.Row(tw, label+" p50/p90/p99/p99.9", fmt.Sprintf("%.1f / %.1f / %.1f / %.1f µs", l.P50US, l.P90US, l.P99US, l.P999US))
		report.Row(tw, label+" mean/max", fmt.Sprintf("%.1f / %.1f µs (%d samples)", l.MeanUS, l.MaxUS, l.Count))
	}
	if l := r.ConnectLatency; l != nil {
		report.Row(tw, "connect p50/p99/p99.9", fmt.Sprintf("%.1f / %.1f / %.1f µs", l.P50US, l.P99US, l.P999US))
	}
	if r.ReqPerSec > 0 {
		report.Row(tw, "request rate", fmt.Sprintf("%.0f req/s on %d connections", r.ReqPerSec, r.Conns))
	}
	if r.ConnsPerSec > 0 {
		report.Row(tw, "connection rate", fmt.Sprintf("%.0f conn/s (%d conns)", r.ConnsPerSec, r.Conns))
	}
	if r.IdleWanted > 0 {
		report.Row(tw, "idle conns held", fmt.Sprintf("%d/%d", r.IdleOK, r.IdleWanted))
	}
	if r.RSSBeforeKiB > 0 {
		report.Row(tw, "proxy RSS before/during/after", fmt.Sprintf("%d / %d / %d KiB", r.RSSBeforeKiB, r.RSSDuringKiB, r.RSSAfterKiB))
		report.Row(tw, "proxy memory per conn", fmt.Sprintf("%.2f KiB/conn", r.KiBPerConn))
	}
	if r.CPUPerConn > 0 {
		report.Row(tw, "proxy CPU per held conn", fmt.Sprintf("%.2f µs/conn/s (%.2f s over the hold)", r.CPUPerConn, r.HoldCPU))
	}
	if r.ProxyCPU > 0 || r.ProxyCPUPerGB > 0 {
		report.Row(tw, "proxy CPU", fmt.Sprintf("%.2f s%s", r.ProxyCPU, perGB(r.ProxyCPUPerGB)))
	}
	report.Row(tw, "system CPU (busy)", fmt.Sprintf("%.2f s%s", r.SysCPU, perGB(r.SysCPUPerGB)))
	report.Row(tw, "verified", r.Verified)
	report.Row(tw, "errors", r.Errors)
	if r.FirstError != "" {
		report.Row(tw, "first error", r.FirstError)
	}
	tw.Flush()
	fmt.Fprintln(w, r.Verdict())
}

func perGB(v float64) string {
	if v == 0 {
		return ""
	}
	return fmt.Sprintf(" (%.3f s/GB)", v)
}

// Headline is the load's main number with its unit.
func (r *Result) Headline() string {
	switch r.Load {
	case "bulk", "bidi", "parallel", "iperf3-bulk":
		return fmt.Sprintf("%.3f GB/s", r.GBps)
	case "pingpong", "sockperf-pp":
		if r.Latency != nil {
			return fmt.Sprintf("p50 %.1f µs, p99 %.1f µs, p99.9 %.1f µs", r.Latency.P50US, r.Latency.P99US, r.Latency.P999US)
		}
	case "rr50":
		if r.Latency != nil {
			return fmt.Sprintf("%.0f req/s, p99 %.1f µs", r.ReqPerSec, r.Latency.P99US)
		}
	case "churn":
		if r.ConnectLatency != nil {
			return fmt.Sprintf("%.0f conn/s, connect p99 %.1f µs", r.ConnsPerSec, r.ConnectLatency.P99US)
		}
	case "connrate":
		return fmt.Sprintf("%.0f conn/s", r.ConnsPerSec)
	case "idle":
		return fmt.Sprintf("%d/%d idle conns held, %.1f KiB/conn", r.IdleOK, r.IdleWanted, r.KiBPerConn)
	case "idle-mostly":
		return fmt.Sprintf("%d/%d conns held, %.1f KiB/conn, %.2f µs CPU/conn/s", r.IdleOK, r.IdleWanted, r.KiBPerConn, r.CPUPerConn)
	}
	return "-"
}

// OK reports whether the run had no errors and held every idle connection.
func (r *Result) OK() bool {
	return r.Errors == 0 && r.IdleOK == r.IdleWanted
}

// Verdict is the one-line summary.
func (r *Result) Verdict() string {
	st := "OK"
	if !r.OK() {
		st = fmt.Sprintf("ERRORS (%d)", r.Errors)
	}
	return fmt.Sprintf("%s: %s %s via %s", st, r.Load, r.Headline(), r.Target)
}

// WriteJSON writes the result as JSON.
func (r *Result) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
