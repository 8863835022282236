package compare

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// Palettes: ours in blues, peers in oranges, the direct baseline grey, so
// the two sides read apart at a glance.
var (
	oursColours = []string{"#0b3d91", "#1c7ed6", "#4dabf7", "#15aabf", "#3b5bdb", "#74c0fc"}
	peerColours = []string{"#d9480f", "#f59f00", "#c2255c", "#e8590c"}
	baseColour  = "#868e96"
)

// colours assigns each endpoint its colour by role and order.
func (rep *Report) colours() map[string]string {
	out := map[string]string{}
	var o, p int
	for _, row := range rep.Rows {
		switch row.Endpoint.Role {
		case RoleOurs:
			out[row.Endpoint.Name] = oursColours[o%len(oursColours)]
			o++
		case RolePeer:
			out[row.Endpoint.Name] = peerColours[p%len(peerColours)]
			p++
		default:
			out[row.Endpoint.Name] = baseColour
		}
	}
	return out
}

// Charts returns the SVG files by name: a bar chart per load (headline,
// min–max whiskers, the best peer dashed), latency percentile lines per
// latency load, and proxy CPU per GB for the byte-moving loads.
func (rep *Report) Charts() map[string]string {
	out := map[string]string{}
	for _, l := range rep.Loads {
		ms := LoadMetrics(l)
		if len(ms) == 0 {
			continue
		}
		out[l+".svg"] = rep.barChart([]panel{{l, ms[0]}}, fmt.Sprintf("%s: %s", l, LoadTitles[l]))
		if HasLatency(l) {
			out["latency-"+l+".svg"] = rep.latencyChart(l)
		}
	}
	var cpu []panel
	for _, l := range bulkLoads(rep) {
		cpu = append(cpu, panel{l, mCPUGB})
	}
	if len(cpu) > 0 {
		out["cpu-per-gb.svg"] = rep.barChart(cpu, "proxy CPU per GB moved (utime+stime / bytes)")
	}
	return out
}

type panel struct {
	load   string
	metric Metric
}

const (
	chartW    = 840.0
	labelW    = 150.0
	valueW    = 270.0
	rowH      = 22.0
	legendH   = 24.0
	panelHead = 26.0
)

func svgOpen(w, h float64, title string) string {
	return fmt.Sprintf("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" font-family=\"sans-serif\" font-size=\"12\">\n"+
		"<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n<text x=\"8\" y=\"18\" font-size=\"14\" font-weight=\"bold\">%s</text>\n",
		w, h, w, h, html.EscapeString(title))
}

// legend draws the role key at y: ours, peers, direct, and what a whisker
// or a dashed line means.
func legend(y float64, extra string) string {
	var b strings.Builder
	items := []struct{ colour, text string }{{oursColours[1], "ours"}, {peerColours[0], "peers (HAProxy, nginx)"}, {baseColour, "direct (no proxy)"}}
	x := 8.0
	for _, it := range items {
		fmt.Fprintf(&b, "<rect x=\"%.0f\" y=\"%.0f\" width=\"12\" height=\"12\" fill=\"%s\"/><text x=\"%.0f\" y=\"%.0f\">%s</text>\n", x, y, it.colour, x+16, y+11, it.text)
		x += 30 + 7*float64(len(it.text))
	}
	if extra != "" {
		fmt.Fprintf(&b, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#495057\">%s</text>\n", x, y+11, html.EscapeString(extra))
	}
	return b.String()
}

// barChart draws one horizontal bar per endpoint per panel: the median,
// a whisker from min to max, and the best peer's median as a dashed line.
func (rep *Report) barChart(panels []panel, title string) string {
	colours := rep.colours()
	n := float64(len(rep.Rows))
	h := 30 + legendH + float64(len(panels))*(panelHead+n*rowH+8)
	var b strings.Builder
	b.WriteString(svgOpen(chartW, h, title))
	b.WriteString(legend(28, "whisker: min–max over rounds; dashed: best peer"))
	y := 30 + legendH
	plotW := chartW - labelW - valueW
	for _, p := range panels {
		better := "higher is better"
		if !p.metric.Higher {
			better = "lower is better"
		}
		fmt.Fprintf(&b, "<text x=\"8\" y=\"%.0f\" font-weight=\"bold\">%s, %s (%s)</text>\n", y+16, p.load, html.EscapeString(p.metric.Head), better)
		y += panelHead
		max := 0.0
		for _, row := range rep.Rows {
			max = math.Max(max, rep.cell(row.Endpoint.Name, p.load).Get(p.metric.Key).Max)
		}
		if max <= 0 {
			max = 1
		}
		scale := plotW / max
		for i, row := range rep.Rows {
			s := rep.cell(row.Endpoint.Name, p.load).Get(p.metric.Key)
			ry := y + float64(i)*rowH
			weight := "normal"
			if row.Endpoint.Role == RoleOurs {
				weight = "bold"
			}
			fmt.Fprintf(&b, "<text x=\"8\" y=\"%.0f\" font-weight=\"%s\">%s</text>\n", ry+14, weight, html.EscapeString(row.Endpoint.Name))
			if s.Median <= 0 {
				fmt.Fprintf(&b, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#868e96\">no data</text>\n", labelW, ry+14)
				continue
			}
			fmt.Fprintf(&b, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.1f\" height=\"16\" fill=\"%s\"/>\n", labelW, ry+2, s.Median*scale, colours[row.Endpoint.Name])
			if s.Max > s.Min {
				fmt.Fprintf(&b, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/><line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/><line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.0f\" y2=\"%.0f\" stroke=\"black\"/>\n",
					labelW+s.Min*scale, labelW+s.Max*scale, ry+10, ry+10,
					labelW+s.Min*scale, labelW+s.Min*scale, ry+6, ry+14,
					labelW+s.Max*scale, labelW+s.Max*scale, ry+6, ry+14)
			}
			fmt.Fprintf(&b, "<text x=\"%.0f\" y=\"%.0f\">%s %s</text>\n", labelW+plotW+8, ry+14, html.EscapeString(fmtStat(p.metric, s)), html.EscapeString(p.metric.Unit))
		}
		if name, ref := rep.reference(Goal{Load: p.load, Metric: p.metric.Key, Versus: VsBestPeer}, p.metric); name != "" {
			x := labelW + ref.Median*scale
			fmt.Fprintf(&b, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-dasharray=\"4 3\"/>\n", x, x, y, y+n*rowH, peerColours[0])
		}
		y += n*rowH + 8
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// latencyChart draws percentile lines: x is the percentile (p50 .. max,
// evenly spaced), y the round trip on a log scale, one line per endpoint.
func (rep *Report) latencyChart(load string) string {
	colours := rep.colours()
	const left, top, plotH = 70.0, 60.0, 300.0
	plotW := chartW - left - 170
	h := top + plotH + 50
	lo, hi := math.Inf(1), 0.0
	for _, row := range rep.Rows {
		c := rep.cell(row.Endpoint.Name, load)
		for _, m := range Percentiles {
			if v := c.Get(m.Key).Median; v > 0 {
				lo, hi = math.Min(lo, v), math.Max(hi, v)
			}
		}
	}
	var b strings.Builder
	b.WriteString(svgOpen(chartW, h, fmt.Sprintf("%s: round-trip percentiles (µs, log scale, lower is better)", load)))
	b.WriteString(legend(28, ""))
	if hi == 0 {
		fmt.Fprintf(&b, "<text x=\"%.0f\" y=\"%.0f\">no data</text>\n</svg>\n", left, top+20)
		return b.String()
	}
	lmin, lmax := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if lmax == lmin {
		lmax++
	}
	yOf := func(v float64) float64 { return top + plotH - (math.Log10(v)-lmin)/(lmax-lmin)*plotH }
	xOf := func(i int) float64 { return left + float64(i)*plotW/float64(len(Percentiles)-1) }
	for d := lmin; d <= lmax; d++ {
		y := yOf(math.Pow(10, d))
		fmt.Fprintf(&b, "<line x1=\"%.0f\" x2=\"%.0f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#dee2e6\"/><text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%s µs</text>\n",
			left, left+plotW, y, y, left-6, y+4, fmtPow(d))
	}
	for i, m := range Percentiles {
		fmt.Fprintf(&b, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n", xOf(i), top+plotH+18, strings.TrimSuffix(m.Head, " µs"))
	}
	for k, row := range rep.Rows {
		c := rep.cell(row.Endpoint.Name, load)
		var pts []string
		for i, m := range Percentiles {
			if v := c.Get(m.Key).Median; v > 0 {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", xOf(i), yOf(v)))
			}
		}
		if len(pts) == 0 {
			continue
		}
		dash := ""
		if row.Endpoint.Role == RolePeer {
			dash = " stroke-dasharray=\"6 3\""
		}
		fmt.Fprintf(&b, "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s/>\n", strings.Join(pts, " "), colours[row.Endpoint.Name], dash)
		ly := top + float64(k)*18
		fmt.Fprintf(&b, "<line x1=\"%.0f\" x2=\"%.0f\" y1=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" stroke-width=\"2\"%s/><text x=\"%.0f\" y=\"%.0f\">%s</text>\n",
			left+plotW+12, left+plotW+36, ly, ly, colours[row.Endpoint.Name], dash, left+plotW+40, ly+4, html.EscapeString(row.Endpoint.Name))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// fmtPow labels a log-scale gridline: 1, 10, 100, 1k, 10k ...
func fmtPow(d float64) string {
	v := math.Pow(10, d)
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%gk", v/1e3)
	}
	return fmt.Sprintf("%g", v)
}
