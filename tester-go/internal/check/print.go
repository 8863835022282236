package check

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"

	"tester-go/internal/report"
)

// maxPortRows bounds the per-port table; larger configs are summarised per
// app (the JSON always has every port).
const maxPortRows = 64

// WriteText prints the human report: per-port routing, cases with evidence,
// per-app summary, verdict.
func (rep *Report) WriteText(w io.Writer) {
	nports := 0
	for _, a := range rep.Apps {
		nports += len(a.Ports)
	}
	for _, a := range rep.Apps {
		var names []string
		for t := range a.Skipped {
			names = append(names, t)
		}
		sort.Strings(names)
		for _, t := range names {
			fmt.Fprintf(w, "note: app %s target %s not served locally: %s\n", a.Name, t, a.Skipped[t])
		}
	}
	tw := report.Table(w)
	if nports <= maxPortRows {
		report.Row(tw, "APP", "PORT", "CONNS", "FAILED", "TARGETS (conns)")
		for _, a := range rep.Apps {
			for _, p := range a.Ports {
				report.Row(tw, a.Name, p.Port, p.Conns, p.Failures, report.Counts(p.Targets))
			}
		}
	} else {
		fmt.Fprintf(w, "(%d ports: per-port rows omitted, see --json)\n", nports)
	}
	tw.Flush()
	fmt.Fprintln(w)

	tw = report.Table(w)
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

	tw = report.Table(w)
	report.Row(tw, "APP", "CONNS", "FAILED", "VERIFIED", "TARGETS SERVED (conns)", "NOT SERVED LOCALLY")
	for _, a := range rep.Apps {
		var sk []string
		for t := range a.Skipped {
			sk = append(sk, t)
		}
		sort.Strings(sk)
		skipped := strings.Join(sk, " ")
		if skipped == "" {
			skipped = "-"
		}
		report.Row(tw, a.Name, a.Conns, a.Failures, report.Bytes(a.BytesVerified), report.Counts(a.Targets), skipped)
	}
	tw.Flush()
	fmt.Fprintln(w)
	fmt.Fprintln(w, rep.Verdict)
}

// WriteJSON writes the report as one indented JSON document.
func (rep *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}
