package bench

import (
	"bufio"
	"bytes"
	"math"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/brokenproxy"
)

func benchBackend(t *testing.T) string {
	t.Helper()
	s, err := backend.Listen([]string{"127.0.0.1:0"}, nil, backend.Options{Kind: backend.Bench})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s.Addrs()[0]
}

func TestLoads(t *testing.T) {
	direct := benchBackend(t)
	p, err := brokenproxy.Start(brokenproxy.Correct, [][]string{{direct}}, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	proxied := "127.0.0.1:" + strconv.Itoa(p.Ports[0][0])
	for _, target := range []string{direct, proxied} {
		for _, load := range Loads {
			if load == "sockperf-pp" || load == "iperf3-bulk" {
				continue // TestSockperf, TestIperf3: they need those binaries
			}
			t.Run(load, func(t *testing.T) {
				r, err := Run(Options{Target: target, Load: load, Duration: 150 * time.Millisecond,
					Streams: 2, Conns: 40, RRConns: 4, Clients: 4, Interval: 40 * time.Millisecond,
					ProxyPID: os.Getpid(), Timeout: 5 * time.Second})
				if err != nil {
					t.Fatal(err)
				}
				if !r.OK() {
					t.Fatalf("%s via %s: %d errors, first %q, verified %q", load, target, r.Errors, r.FirstError, r.Verified)
				}
				switch load {
				case "bulk", "bidi", "parallel":
					if r.Bytes == 0 || r.GBps <= 0 || r.SysCPUPerGB < 0 {
						t.Fatalf("no throughput: %+v", r)
					}
				case "pingpong":
					if r.Latency == nil || r.Latency.Count == 0 || r.Latency.P50US <= 0 {
						t.Fatalf("no latency: %+v", r)
					}
				case "connrate":
					if r.Conns == 0 || r.ConnsPerSec <= 0 {
						t.Fatalf("no connections: %+v", r)
					}
				case "rr50":
					if r.ReqPerSec <= 0 || r.Latency == nil || r.Latency.P999US <= 0 || r.Conns != 4 {
						t.Fatalf("rr50: %+v", r)
					}
				case "churn":
					if r.ConnsPerSec <= 0 || r.ConnectLatency == nil || r.ConnectLatency.P99US <= 0 {
						t.Fatalf("churn: %+v", r)
					}
				case "idle-mostly":
					if r.IdleOK != 40 || r.Latency == nil || r.Latency.Count == 0 || r.HoldCPU < 0 || r.RSSDuringKiB <= 0 {
						t.Fatalf("idle-mostly: %+v", r)
					}
				case "idle":
					if r.IdleOK != 40 || r.RSSDuringKiB <= 0 {
						t.Fatalf("idle: %+v", r)
					}
				}
				var buf bytes.Buffer
				r.WriteText(&buf)
				if !strings.Contains(buf.String(), "OK: "+load) {
					t.Fatalf("text output lacks verdict:\n%s", buf.String())
				}
			})
		}
	}
}

func TestBulkDetectsShortCount(t *testing.T) {
	// A proxy that drops the tail after half-close loses the sink's reply.
	direct := benchBackend(t)
	p, err := brokenproxy.Start(brokenproxy.DropTail, [][]string{{direct}}, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	r, err := Run(Options{Target: "127.0.0.1:" + strconv.Itoa(p.Ports[0][0]), Load: "bulk", Duration: 100 * time.Millisecond, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if r.OK() {
		t.Fatalf("bulk through drop-tail proxy reported OK: %+v", r)
	}
}

// The request/response loads compare every reply with its request: a
// proxy that flips one byte fails them.
func TestRequestResponseDetectsCorruption(t *testing.T) {
	direct := benchBackend(t)
	p, err := brokenproxy.Start(brokenproxy.Corrupt, [][]string{{direct}}, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	for _, load := range []string{"pingpong", "rr50"} {
		r, err := Run(Options{Target: "127.0.0.1:" + strconv.Itoa(p.Ports[0][0]), Load: load, Duration: 100 * time.Millisecond,
			RRConns: 2, Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if r.OK() || !strings.Contains(r.Verified, "MISMATCH") {
			t.Errorf("%s through a corrupting proxy reported OK: %+v", load, r)
		}
	}
}

func TestProcParsers(t *testing.T) {
	s, err := parseProcStat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n")
	if err != nil || s.Total != 10 || s.Busy != 1.5 {
		t.Fatalf("procstat %+v %v", s, err)
	}
	if _, err := parseProcStat("intr 1 2"); err == nil {
		t.Fatal("want error for bad /proc/stat")
	}
	cpu, err := parsePidStat("123 (my (odd) proc) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0")
	if err != nil || math.Abs(cpu-4) > 1e-9 {
		t.Fatalf("pid stat %v %v", cpu, err)
	}
	rss, err := parseVmRSS(bufio.NewScanner(strings.NewReader("Name:\tx\nVmRSS:\t   2048 kB\n")))
	if err != nil || rss != 2048 {
		t.Fatalf("rss %v %v", rss, err)
	}
	if _, err := ReadProcCPU(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSysCPU(); err != nil {
		t.Fatal(err)
	}
}
