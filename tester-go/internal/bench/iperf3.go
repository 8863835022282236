package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// runIperf3 runs the third-party client `iperf3 -c` (one stream, one way,
// JSON output) against Iperf3Target, which reaches `iperf3 -s` directly or
// through a proxy, and reports the bytes the server received.
func runIperf3(o Options, r *Result) error {
	if o.Iperf3Target == "" {
		return fmt.Errorf("iperf3-bulk: this endpoint has no iperf3 route (--endpoint ...,iperf3=HOST:PORT)")
	}
	i := strings.LastIndexByte(o.Iperf3Target, ':')
	if i <= 0 {
		return fmt.Errorf("iperf3-bulk: %q is not HOST:PORT", o.Iperf3Target)
	}
	secs := int(math.Ceil(o.Duration.Seconds()))
	if secs < 1 {
		secs = 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+o.Timeout+5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "iperf3", "-c", o.Iperf3Target[:i], "-p", o.Iperf3Target[i+1:],
		"-t", strconv.Itoa(secs), "-J").Output()
	ip, perr := ParseIperf3(out)
	if perr != nil {
		if err != nil {
			return fmt.Errorf("iperf3 -c %s: %v; %v", o.Iperf3Target, err, perr)
		}
		return fmt.Errorf("iperf3 -c %s: %v", o.Iperf3Target, perr)
	}
	r.Seconds = ip.Seconds
	r.Bytes = ip.Bytes
	r.Streams = 1
	r.Verified = fmt.Sprintf("iperf3: the server received %d bytes in %.2f s", ip.Bytes, ip.Seconds)
	return nil
}

// Iperf3 is what ParseIperf3 reads from `iperf3 -c -J`.
type Iperf3 struct {
	Bytes   int64
	Seconds float64
}

// ParseIperf3 reads end.sum_received (what the server got) from iperf3's
// JSON; its "error" field, or a received count of 0, is an error.
func ParseIperf3(out []byte) (*Iperf3, error) {
	var doc struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				Bytes   int64   `json:"bytes"`
				Seconds float64 `json:"seconds"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("iperf3 JSON: %v", err)
	}
	if doc.Error != "" {
		return nil, fmt.Errorf("iperf3: %s", doc.Error)
	}
	s := doc.End.SumReceived
	if s.Bytes <= 0 || s.Seconds <= 0 {
		return nil, fmt.Errorf("iperf3: the server received nothing (end.sum_received %+v)", s)
	}
	return &Iperf3{Bytes: s.Bytes, Seconds: s.Seconds}, nil
}
