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
	out, secs, err := runTool(o, o.SockperfTarget, "sockperf", true, func(host, port, secs string) []string {
		return []string{"pp", "--tcp", "-i", host, "-p", port, "-t", secs, "--full-rtt"}
	})
	r.Seconds = secs
	if err != nil {
		return fmt.Errorf("%v: %s", err, lastLines(string(out), 3))
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

// runTool runs a third-party client for the load's duration (whole
// seconds, at least 1) against target (HOST:PORT, the endpoint's route to
// that tool's server) and returns its output (stdout, or stdout and stderr
// when combined) and the wall time.
func runTool(o Options, target, program string, combined bool, args func(host, port, secs string) []string) ([]byte, float64, error) {
	if target == "" {
		return nil, 0, fmt.Errorf("%s: this endpoint has no %s route (--endpoint ...,%s=HOST:PORT)", program, program, program)
	}
	i := strings.LastIndexByte(target, ':')
	if i <= 0 {
		return nil, 0, fmt.Errorf("%s: %q is not HOST:PORT", program, target)
	}
	secs := int(math.Ceil(o.Duration.Seconds()))
	if secs < 1 {
		secs = 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+o.Timeout+5*time.Second)
	defer cancel()
	c := exec.CommandContext(ctx, program, args(target[:i], target[i+1:], strconv.Itoa(secs))...)
	start := time.Now()
	var out []byte
	var err error
	if combined {
		out, err = c.CombinedOutput()
	} else {
		out, err = c.Output()
	}
	if err != nil {
		err = fmt.Errorf("%s via %s: %v", program, target, err)
	}
	return out, time.Since(start).Seconds(), err
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
