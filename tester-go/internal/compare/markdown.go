package compare

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// WriteMarkdown writes the report: title, the caller's preamble (machine,
// versions, peer configs), the verdict once, the targets, one table and
// chart per load, the latency distributions and the CPU per GB. Charts
// named in the text are written to svgDir by WriteCharts.
func (rep *Report) WriteMarkdown(w io.Writer, preamble string) {
	fmt.Fprintf(w, "# Benchmark results\n\n")
	if p := strings.TrimSpace(preamble); p != "" {
		fmt.Fprintf(w, "%s\n\n", p)
	}
	fmt.Fprintf(w, "## Verdict\n\n%s.\n\n", rep.Verdict)
	fmt.Fprintf(w, "Each cell is the median over %d interleaved round(s) of %.1f s per load", rep.Rounds, rep.DurationS)
	if rep.HoldS > 0 {
		fmt.Fprintf(w, " (idle-mostly: %d connections held %.0f s)", rep.Conns, rep.HoldS)
	}
	fmt.Fprintf(w, ", with the min–max over the rounds in brackets. Colours in the charts: blues are ours, oranges the peers, grey the direct connection (no proxy). Ratios are against the best peer (the best of HAProxy and nginx in any config, per load).\n\n")
	rep.writeTargets(w)
	fmt.Fprintf(w, "## Loads\n\n")
	for _, l := range rep.Loads {
		rep.writeLoad(w, l)
	}
	var lat []string
	for _, l := range rep.Loads {
		if HasLatency(l) {
			lat = append(lat, fmt.Sprintf("![%s latency percentiles](latency-%s.svg)", l, l))
		}
	}
	if len(lat) > 0 {
		fmt.Fprintf(w, "## Latency distribution\n\nRound-trip percentiles (p50, p90, p99, p99.9, max) per endpoint, medians over the rounds, log scale.\n\n%s\n\n", strings.Join(lat, "\n"))
	}
	if rep.hasBulk() {
		fmt.Fprintf(w, "## Proxy CPU per GB\n\nThe proxy process's utime+stime over the load divided by the bytes moved (lower is better; whiskers are min–max over the rounds).\n\n![proxy CPU per GB](cpu-per-gb.svg)\n\n")
	}
	rep.writeErrors(w)
	fmt.Fprintf(w, "## How each load checks its data\n\n")
	for _, l := range rep.Loads {
		for _, row := range rep.Rows {
			c := rep.cell(row.Endpoint.Name, l)
			if c == nil || len(c.Runs) == 0 {
				continue
			}
			r := c.Runs[len(c.Runs)-1]
			line := fmt.Sprintf("- %s via %s (%s): %s", l, row.Endpoint.Name, r.Client, r.Verified)
			if r.FirstError != "" {
				line += "; first error: " + r.FirstError
			}
			fmt.Fprintln(w, line)
			break
		}
	}
	fmt.Fprintln(w)
}

func (rep *Report) hasBulk() bool {
	return len(bulkLoads(rep)) > 0
}

// writeTargets: one row per goal for the default plane (auto), the others'
// checks are in the per-load tables.
func (rep *Report) writeTargets(w io.Writer) {
	if len(rep.Goals) == 0 {
		fmt.Fprintf(w, "No targets checked (no peer, or none of ours, measured).\n\n")
		return
	}
	who := rep.Goals[0].Endpoint
	for _, c := range rep.Goals {
		if c.Endpoint == "auto" {
			who = "auto"
		}
	}
	fmt.Fprintf(w, "## Targets (issues 13 and 14), %s\n\n| target | %s | reference | ratio | result |\n|---|---:|---|---:|---|\n", who, who)
	for _, c := range rep.Goals {
		if c.Endpoint != who {
			continue
		}
		m, _ := metricOf(c.Load, c.Metric)
		fmt.Fprintf(w, "| %s | %s %s | %s: %s %s | %.2f× | %s |\n", c.Describe(),
			fmt.Sprintf(m.Fmt, c.Value), m.Unit, c.RefName, fmt.Sprintf(m.Fmt, c.Ref), m.Unit, c.Ratio, passMark(c.Pass))
	}
	fmt.Fprintf(w, "\nAgainst the best forced plane, auto passes when its median is within or beyond that plane's min–max over the rounds; every other target compares medians.\n\n")
}

func (rep *Report) writeLoad(w io.Writer, l string) {
	ms := LoadMetrics(l)
	if len(ms) == 0 {
		return
	}
	better := "higher is better"
	if !ms[0].Higher {
		better = "lower is better"
	}
	fmt.Fprintf(w, "### %s: %s\n\nHeadline: %s (%s).\n\n![%s](%s.svg)\n\n", l, LoadTitles[l], ms[0].Head, better, l, l)
	head := []string{"endpoint", "role", "client"}
	for _, m := range ms {
		head = append(head, m.Head)
	}
	head = append(head, "× best peer ("+ms[0].Unit+")", "targets", "errors")
	fmt.Fprintf(w, "| %s |\n|%s\n", strings.Join(head, " | "), strings.Repeat("---|", len(head)))
	for _, row := range rep.Rows {
		e := row.Endpoint
		c := rep.cell(e.Name, l)
		if c == nil {
			continue
		}
		cells := []string{"**" + e.Name + "**", roleLabel(e.Role), c.Client}
		if e.Role != RoleOurs {
			cells[0] = e.Name
		}
		for _, m := range ms {
			cells = append(cells, fmtStat(m, c.Get(m.Key)))
		}
		checks := "-"
		if e.Role == RoleOurs {
			checks = rep.checksOf(e.Name, l)
		}
		cells = append(cells, rep.vsBestPeer(e, l), checks, fmt.Sprint(c.Errors))
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
	fmt.Fprintln(w)
}

// WriteFiles writes results.md, results.json and the charts into dir.
func (rep *Report) WriteFiles(dir, preamble string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var md strings.Builder
	rep.WriteMarkdown(&md, preamble)
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	var js strings.Builder
	if err := rep.WriteJSON(&js); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), []byte(js.String()), 0o644); err != nil {
		return err
	}
	for name, svg := range rep.Charts() {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(svg), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// bulkLoads are the report's byte-moving loads, whose proxy CPU per GB is
// charted.
func bulkLoads(rep *Report) []string {
	var out []string
	for _, l := range []string{"bulk", "iperf3-bulk", "bidi", "parallel"} {
		if rep.has(l) {
			out = append(out, l)
		}
	}
	return out
}

// writeErrors lists every endpoint and load whose runs had errors, with the
// first error of each failing run.
func (rep *Report) writeErrors(w io.Writer) {
	var lines []string
	for _, c := range rep.Cells {
		for i, r := range c.Runs {
			if r.Errors > 0 || r.IdleOK != r.IdleWanted {
				lines = append(lines, fmt.Sprintf("- %s, %s, round %d: %d error(s); first: %s", c.Endpoint, c.Load, i+1, r.Errors, r.FirstError))
			}
		}
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintf(w, "## Errors\n\nA cell with errors fails its targets and is never a reference.\n\n%s\n\n", strings.Join(lines, "\n"))
}
