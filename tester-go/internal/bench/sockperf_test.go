package bench

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"tester-go/internal/brokenproxy"
)

const sockperfOut = "sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m\n" +
	"sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=30770; ReceivedMessages=30770\n" +
	"sockperf: \x1b[2;35m====> avg-rtt=50.352 (std-dev=1032.048)\x1b[0m\n" +
	"sockperf: # dropped messages = 0; # duplicated messages = 2; # out-of-order messages = 1\n" +
	"sockperf: Summary: Round trip is 50.352 usec\n" +
	"sockperf: \x1b[2;35mTotal 30770 observations\x1b[0m; each percentile contains 307.70 observations\n" +
	"sockperf: ---> <MAX> observation = 91553.890\n" +
	"sockperf: ---> percentile 99.999 = 91553.890\n" +
	"sockperf: ---> percentile 99.990 = 76886.796\n" +
	"sockperf: ---> percentile 99.900 = 3914.385\n" +
	"sockperf: ---> percentile 99.000 =   91.722\n" +
	"sockperf: ---> percentile 90.000 =   20.848\n" +
	"sockperf: ---> percentile 75.000 =   18.935\n" +
	"sockperf: ---> percentile 50.000 =   17.402\n" +
	"sockperf: ---> percentile 25.000 =   17.292\n" +
	"sockperf: ---> <MIN> observation =   15.829\n"

// parsedOut is what sockperfOut says.
var parsedOut = Sockperf{Latency: Latency{Count: 30770, MeanUS: 50.352, P50US: 17.402, P90US: 20.848,
	P99US: 91.722, P999US: 3914.385, MaxUS: 91553.89}, Duplicated: 2, OutOfOrder: 1}

// checkParsed fails unless a parse failed with wantErr in its message
// (when wantErr is set) or returned want.
func checkParsed[T comparable](t *testing.T, got *T, err error, want T, wantErr string) {
	t.Helper()
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("err = %v, want %q", err, wantErr)
		}
		return
	}
	if err != nil || *got != want {
		t.Fatalf("got %+v, %v; want %+v", got, err, want)
	}
}

func TestParseSockperf(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want Sockperf
		err  string
	}{
		{"3.7 full-rtt", sockperfOut, parsedOut, ""},
		{"older avg-latency wording", strings.Replace(sockperfOut, "avg-rtt", "avg-latency", 1), parsedOut, ""},
		{"no percentiles", "sockperf: ERROR: connect failed\n", Sockperf{}, "no percentile 50.000"},
		{"p99.9 missing", strings.Replace(sockperfOut, "percentile 99.900", "percentile 99.800", 1), Sockperf{}, "no percentile 99.900"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSockperf(tt.in)
			checkParsed(t, got, err, tt.want, tt.err)
		})
	}
}

// TestSockperf runs the real client through a proxy to a real `sockperf
// sr`. It fails, not skips, without sockperf: `cargo xtask test` installs it.
func TestSockperf(t *testing.T) {
	if _, err := exec.LookPath("sockperf"); err != nil {
		t.Fatal("sockperf is not installed (cargo xtask setup installs it)")
	}
	addr := startServer(t, func(port string) *exec.Cmd {
		return exec.Command("sockperf", "sr", "--tcp", "-i", "127.0.0.1", "-p", port)
	})
	p, err := brokenproxy.Start(brokenproxy.Correct, [][]string{{addr}}, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	r, err := Run(Options{Load: "sockperf-pp", SockperfTarget: "127.0.0.1:" + strconv.Itoa(p.Ports[0][0]), Duration: time.Second, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if !r.OK() || r.Client != "sockperf" || r.Latency == nil || r.Latency.P99US <= 0 || r.Latency.Count == 0 {
		t.Fatalf("sockperf-pp: %+v", r)
	}
	if _, err := Run(Options{Load: "sockperf-pp", Duration: time.Second}); err == nil || !strings.Contains(err.Error(), "no sockperf route") {
		t.Fatalf("sockperf-pp without a route: %v", err)
	}
}

func TestParseIperf3(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want Iperf3
		err  string
	}{
		{"3.12", `{"start":{},"end":{"sum_sent":{"bytes":3071016961,"seconds":1.0},"sum_received":{"start":0,"end":1.001177,"seconds":1.001177,"bytes":3071016960,"bits_per_second":2.4e10,"sender":true}}}`,
			Iperf3{Bytes: 3071016960, Seconds: 1.001177}, ""},
		{"error field", `{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}`, Iperf3{}, "Connection refused"},
		{"nothing received", `{"end":{"sum_received":{"bytes":0,"seconds":1}}}`, Iperf3{}, "received nothing"},
		{"not JSON", `iperf3: error`, Iperf3{}, "iperf3 JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseIperf3([]byte(tt.in))
			checkParsed(t, got, err, tt.want, tt.err)
		})
	}
}

// TestIperf3 runs the real client through a proxy to a real `iperf3 -s`.
// It fails, not skips, without iperf3: `cargo xtask test` installs it.
func TestIperf3(t *testing.T) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Fatal("iperf3 is not installed (cargo xtask setup installs it)")
	}
	addr := startServer(t, func(port string) *exec.Cmd { return exec.Command("iperf3", "-s", "-B", "127.0.0.1", "-p", port) })
	p, err := brokenproxy.Start(brokenproxy.Correct, [][]string{{addr}}, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	r, err := Run(Options{Load: "iperf3-bulk", Iperf3Target: "127.0.0.1:" + strconv.Itoa(p.Ports[0][0]), Duration: time.Second, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if !r.OK() || r.Client != "iperf3" || r.Bytes <= 0 || r.GBps <= 0 {
		t.Fatalf("iperf3-bulk: %+v", r)
	}
}

// startServer starts a third-party server on a free loopback port and
// waits until it accepts; it is killed when the test ends.
func startServer(t *testing.T, command func(port string) *exec.Cmd) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	srv := command(addr[strings.LastIndexByte(addr, ':')+1:])
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	// Watch for the listening socket rather than connect: iperf3 -s takes
	// any connection for a client and fails the next test when it closes.
	port, _ := strconv.Atoi(addr[strings.LastIndexByte(addr, ':')+1:])
	for i := 0; ; i++ {
		if listening(t, port) {
			return addr
		}
		if i == 100 {
			t.Fatalf("%v never listened on %s", srv.Args, addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// listening reports whether /proc/net/tcp has a socket in LISTEN (0A) on
// the local port.
func listening(t *testing.T, port int) bool {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			return true
		}
	}
	return false
}
