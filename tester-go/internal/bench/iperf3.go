package bench

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// runIperf3 runs the third-party client `iperf3 -c` (one stream, one way,
// JSON output) against Iperf3Target, which reaches `iperf3 -s` directly or
// through a proxy, and reports the bytes the server received.
//
// iperf3 -s takes any connection for a client, one at a time: a proxy's
// health probe of it (a connect and close) can make the next test fail at
// its start ("busy", "control socket has closed"), so those are retried.
func runIperf3(o Options, r *Result) error {
	var ip *Iperf3
	var err, perr error
	for attempt := 0; attempt < 3; attempt++ {
		var out []byte
		out, _, err = runTool(o, o.Iperf3Target, "iperf3", false, func(host, port, secs string) []string {
			return []string{"-c", host, "-p", port, "-t", secs, "-J"}
		})
		ip, perr = ParseIperf3(out)
		if perr == nil || !(strings.Contains(perr.Error(), "busy") || strings.Contains(perr.Error(), "control socket")) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if perr != nil {
		if err != nil {
			return fmt.Errorf("%v; %v", err, perr)
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
