package compare

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"tester-go/internal/report"
)

// LoadTitles say what each load does, for tables and charts.
var LoadTitles = map[string]string{
	"bulk":        "one stream, one way",
	"bidi":        "one echo stream, both ways",
	"parallel":    "parallel one-way streams",
	"pingpong":    "one connection, 64-byte ping-pong",
	"rr50":        "request/response (64 B) on 50 kept connections",
	"churn":       "a new connection per 64-byte exchange, 50 concurrent clients",
	"connrate":    "connect + first byte, 8 workers",
	"idle":        "connections held idle after one small exchange",
	"idle-mostly": "long-lived connections, a 32-byte message every few seconds each",
	"sockperf-pp": "sockperf ping-pong (third-party client), one connection",
	"iperf3-bulk": "iperf3 (third-party client), one stream, one way",
}

// fmtStat is "median (min–max)", or the median alone for one round.
func fmtStat(m Metric, s Stat) string {
	if s.Median == 0 {
		return "-"
	}
	med := fmt.Sprintf(m.Fmt, s.Median)
	lo, hi := fmt.Sprintf(m.Fmt, s.Min), fmt.Sprintf(m.Fmt, s.Max)
	if lo == hi {
		return med
	}
	return fmt.Sprintf("%s (%s–%s)", med, lo, hi)
}

// vsBestPeer is the headline ratio against the best peer, "-" without one.
func (rep *Report) vsBestPeer(e Endpoint, load string) string {
	ms := LoadMetrics(load)
	if len(ms) == 0 || e.Role == RolePeer {
		return "-"
	}
	name, ref := rep.reference(Goal{Load: load, Metric: ms[0].Key, Versus: VsBestPeer}, ms[0])
	v := rep.cell(e.Name, load).Get(ms[0].Key).Median
	if name == "" || ref.Median == 0 || v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f×", v/ref.Median)
}

// WriteText prints one table per load (medians with the min–max over the
// rounds, the ratio to the best peer) and the verdict, once.
func (rep *Report) WriteText(w io.Writer) {
	fmt.Fprintf(w, "medians (min–max) over %d round(s) of %s per load\n", rep.Rounds, report.Dur(time.Duration(rep.DurationS*float64(time.Second))))
	for _, l := range rep.Loads {
		ms := LoadMetrics(l)
		fmt.Fprintf(w, "\n%s: %s\n", l, LoadTitles[l])
		tw := report.Table(w)
		head := []interface{}{"ENDPOINT"}
		for _, m := range ms {
			head = append(head, m.Head)
		}
		head = append(head, "vs best peer", "errors")
		report.Row(tw, head...)
		for _, row := range rep.Rows {
			c := rep.cell(row.Endpoint.Name, l)
			cells := []interface{}{row.Endpoint.Name}
			for _, m := range ms {
				cells = append(cells, fmtStat(m, c.Get(m.Key)))
			}
			cells = append(cells, rep.vsBestPeer(row.Endpoint, l), c.Errors)
			report.Row(tw, cells...)
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "\nverdict: %s\n", rep.Verdict)
}

// WriteJSON writes the full report, including every run.
func (rep *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// roleLabel is how a role reads in a table.
func roleLabel(role string) string {
	switch role {
	case RoleOurs:
		return "ours"
	case RolePeer:
		return "peer"
	}
	return "no proxy"
}

func passMark(p bool) string {
	if p {
		return "PASS"
	}
	return "FAIL"
}

// checksOf lists the checks of one endpoint on one load as "PASS goal".
func (rep *Report) checksOf(endpoint, load string) string {
	var s []string
	for _, c := range rep.Goals {
		if c.Endpoint == endpoint && c.Load == load {
			s = append(s, fmt.Sprintf("%s %s %s", passMark(c.Pass), strings.TrimPrefix(c.Describe(), load+" "), ratioText(c)))
		}
	}
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, "; ")
}

func ratioText(c Check) string {
	return fmt.Sprintf("(%.2f× %s)", c.Ratio, c.RefName)
}
