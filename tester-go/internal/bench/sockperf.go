package bench

import (
	"context"
	"fmt"
	"math"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// runSockperf runs the third-party client `sockperf pp --tcp` (ping-pong,
// full round trip) against SockperfTarget, which reaches `sockperf sr
// --tcp` directly or through a proxy, and reports its percentiles.
func runSockperf(o Options, r *Result) error {
	if o.SockperfTarget == "" {
		return fmt.Errorf("sockperf-pp: this endpoint has no sockperf route (--endpoint ...,sockperf=HOST:PORT)")
	}
	i := strings.LastIndexByte(o.SockperfTarget, ':')
	if i <= 0 {
		return fmt.Errorf("sockperf-pp: %q is not HOST:PORT", o.SockperfTarget)
	}
	host, port := o.SockperfTarget[:i], o.SockperfTarget[i+1:]
	secs := int(math.Ceil(o.Duration.Seconds()))
	if secs < 1 {
		secs = 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+o.Timeout+5*time.Second)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, "sockperf", "pp", "--tcp", "-i", host, "-p", port,
		"-t", strconv.Itoa(secs), "--full-rtt").CombinedOutput()
	r.Seconds = time.Since(start).Seconds()
	if err != nil {
		return fmt.Errorf("sockperf pp via %s: %v: %s", o.SockperfTarget, err, lastLines(string(out), 3))
	}
	s, err := ParseSockperf(string(out))
	if err != nil {
		return fmt.Errorf("sockperf pp via %s: %v", o.SockperfTarget, err)
	}
	r.Latency = &s.Latency
	r.Conns = 1
	if s.Dropped+s.Duplicated+s.OutOfOrder > 0 {
		r.Errors++
		r.FirstError = fmt.Sprintf("sockperf: %d dropped, %d duplicated, %d out-of-order messages", s.Dropped, s.Duplicated, s.OutOfOrder)
	}
	r.Verified = fmt.Sprintf("sockperf: %d observations, %d dropped, %d duplicated, %d out of order", s.Latency.Count, s.Dropped, s.Duplicated, s.OutOfOrder)
	return nil
}

// Sockperf is what ParseSockperf reads from `sockperf pp` output.
type Sockperf struct {
	Latency                         Latency
	Dropped, Duplicated, OutOfOrder int64
}

var (
	ansi           = regexp.MustCompile("\x1b\\[[0-9;]*m")
	spPercentile   = regexp.MustCompile(`percentile\s+([0-9.]+)\s*=\s*([0-9.]+)`)
	spMax          = regexp.MustCompile(`<MAX> observation\s*=\s*([0-9.]+)`)
	spAvg          = regexp.MustCompile(`avg-(?:rtt|latency)=([0-9.]+)`)
	spObservations = regexp.MustCompile(`Total (\d+) observations`)
	spMessages     = regexp.MustCompile(`# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)`)
)

// ParseSockperf reads the summary of `sockperf pp` (µs; round trip with
// --full-rtt, half of it without): the observation count, avg, the 50, 90,
// 99 and 99.9 percentiles, the max and the message-loss counters. Missing
// percentiles are an error: a run that measured nothing must not read as 0 µs.
func ParseSockperf(out string) (*Sockperf, error) {
	out = ansi.ReplaceAllString(out, "")
	s := &Sockperf{}
	pct := map[string]float64{}
	for _, m := range spPercentile.FindAllStringSubmatch(out, -1) {
		v, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			return nil, fmt.Errorf("sockperf percentile %s: %v", m[1], err)
		}
		p, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			return nil, fmt.Errorf("sockperf percentile %q: %v", m[1], err)
		}
		pct[strconv.FormatFloat(p, 'f', 3, 64)] = v
	}
	want := []struct {
		key string
		dst *float64
	}{{"50.000", &s.Latency.P50US}, {"90.000", &s.Latency.P90US}, {"99.000", &s.Latency.P99US}, {"99.900", &s.Latency.P999US}}
	for _, w := range want {
		v, ok := pct[w.key]
		if !ok {
			return nil, fmt.Errorf("sockperf output has no percentile %s (was the run too short, or did it fail?): %s", w.key, lastLines(out, 3))
		}
		*w.dst = v
	}
	if m := spMax.FindStringSubmatch(out); m != nil {
		s.Latency.MaxUS, _ = strconv.ParseFloat(m[1], 64)
	}
	if m := spAvg.FindStringSubmatch(out); m != nil {
		s.Latency.MeanUS, _ = strconv.ParseFloat(m[1], 64)
	}
	if m := spObservations.FindStringSubmatch(out); m != nil {
		s.Latency.Count, _ = strconv.ParseUint(m[1], 10, 64)
	}
	if m := spMessages.FindStringSubmatch(out); m != nil {
		s.Dropped, _ = strconv.ParseInt(m[1], 10, 64)
		s.Duplicated, _ = strconv.ParseInt(m[2], 10, 64)
		s.OutOfOrder, _ = strconv.ParseInt(m[3], 10, 64)
	}
	return s, nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
