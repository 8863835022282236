package compare

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/brokenproxy"
)

func TestParseEndpoint(t *testing.T) {
	tests := []struct {
		in   string
		want Endpoint
		err  bool
	}{
		{"direct=127.0.0.1:9000", Endpoint{Name: "direct", Addr: "127.0.0.1:9000", Role: RoleBase}, false},
		{"rust=127.0.0.1:5001,pid=1234", Endpoint{Name: "rust", Addr: "127.0.0.1:5001", PID: 1234, Role: RoleOurs}, false},
		{"nginx=127.0.0.1:5002,role=peer,sockperf=127.0.0.1:6002", Endpoint{Name: "nginx", Addr: "127.0.0.1:5002", Role: RolePeer, Sockperf: "127.0.0.1:6002"}, false},
		{"x=localhost:1", Endpoint{Name: "x", Addr: "localhost:1", Role: RoleOurs}, false},
		{"nginx=127.0.0.1:2,pid=10+11+12,role=peer", Endpoint{Name: "nginx", Addr: "127.0.0.1:2", PID: 10, MorePIDs: []int{11, 12}, Role: RolePeer}, false},
		{"a=127.0.0.1:1,pid=10+", Endpoint{}, true},
		{"127.0.0.1:9000", Endpoint{}, true},
		{"a=127.0.0.1", Endpoint{}, true},
		{"a=127.0.0.1:0", Endpoint{}, true},
		{"a=127.0.0.1:1,pid=x", Endpoint{}, true},
		{"a=127.0.0.1:1,foo=1", Endpoint{}, true},
		{"a=127.0.0.1:1,role=boss", Endpoint{}, true},
		{"a=127.0.0.1:1,sockperf=nope", Endpoint{}, true},
		{"a=127.0.0.1:1,iperf3=127.0.0.1:7", Endpoint{Name: "a", Addr: "127.0.0.1:1", Role: RoleOurs, Iperf3: "127.0.0.1:7"}, false},
		{"a=127.0.0.1:1,iperf3=x", Endpoint{}, true},
		{"=127.0.0.1:1", Endpoint{}, true},
	}
	for _, tt := range tests {
		got, err := ParseEndpoint(tt.in)
		if (err != nil) != tt.err || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("ParseEndpoint(%q) = %+v, %v", tt.in, got, err)
		}
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
	}{
		{nil, 0}, {[]float64{3}, 3}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		if got := Median(tt.in); got != tt.want {
			t.Errorf("Median(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestCompareDirectVsProxy(t *testing.T) {
	be, err := backend.Listen([]string{"127.0.0.1:0"}, nil, backend.Options{Kind: backend.Bench})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	start := func() string {
		p, err := brokenproxy.Start(brokenproxy.Correct, [][]string{{be.Addrs()[0]}}, 1)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		return "127.0.0.1:" + strconv.Itoa(p.Ports[0][0])
	}
	loads := []string{"bulk", "pingpong", "rr50", "churn", "connrate", "idle", "idle-mostly"}
	rep := Run(Options{
		Endpoints: []Endpoint{{Name: "direct", Addr: be.Addrs()[0], Role: RoleBase},
			{Name: "auto", Addr: start(), Role: RoleOurs, PID: os.Getpid()},
			{Name: "haproxy", Addr: start(), Role: RolePeer}},
		Loads:    loads,
		Duration: 100 * time.Millisecond, Rounds: 2, Streams: 2, Conns: 20, RRConns: 4, Clients: 4,
		Hold: 300 * time.Millisecond, Interval: 50 * time.Millisecond, Timeout: 5 * time.Second,
	})
	if !rep.OK {
		var b bytes.Buffer
		rep.WriteJSON(&b)
		t.Fatalf("comparison had errors:\n%s", b.String())
	}
	for _, c := range rep.Cells {
		if len(c.Runs) != 2 {
			t.Fatalf("%s/%s: %d runs, want 2", c.Endpoint, c.Load, len(c.Runs))
		}
		// KiB/conn is an RSS delta: of the test process itself here, so it
		// may be 0 or negative; the idle loads are checked by held conns.
		if head := LoadMetrics(c.Load)[0]; c.Get(head.Key).Median <= 0 && head.Key != "kib_per_conn" {
			t.Errorf("%s/%s: no %s", c.Endpoint, c.Load, head.Key)
		}
	}
	if len(rep.Goals) == 0 {
		t.Fatal("no goal checked with auto and a peer measured")
	}
	var text, js bytes.Buffer
	rep.WriteText(&text)
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"rr50:", "req/s", "connect p99 µs", "auto", "vs best peer", "verdict: auto meets"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
	dir := t.TempDir()
	if err := rep.WriteFiles(dir, "Smoke run."); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(md), rep.Verdict); n != 1 {
		t.Errorf("verdict appears %d times in results.md, want once", n)
	}
	for _, name := range []string{"bulk.svg", "latency-pingpong.svg", "latency-rr50.svg", "cpu-per-gb.svg", "idle-mostly.svg"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !strings.HasPrefix(string(b), "<svg") || !strings.Contains(string(b), "peers (HAProxy, nginx)") {
			t.Errorf("%s: %v, %.60q", name, err, b)
		}
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Cells) != 3*len(loads) {
		t.Fatalf("json: %v, %d cells", err, len(back.Cells))
	}
}

// A run can continue an earlier one's JSON (the bench restarts the proxies
// between rounds): its runs come first and the rounds add up.
func TestContinueEarlierReport(t *testing.T) {
	be, err := backend.Listen([]string{"127.0.0.1:0"}, nil, backend.Options{Kind: backend.Bench})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	o := Options{Endpoints: []Endpoint{{Name: "direct", Addr: be.Addrs()[0], Role: RoleBase}},
		Loads: []string{"pingpong"}, Duration: 50 * time.Millisecond, Rounds: 1, Timeout: 5 * time.Second}
	var js bytes.Buffer
	if err := Run(o).WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	prev, err := ReadReport(&js)
	if err != nil {
		t.Fatal(err)
	}
	o.Prev, o.Rounds = prev, 2
	rep := Run(o)
	if rep.Rounds != 3 || len(rep.Cells) != 1 || len(rep.Cells[0].Runs) != 3 || !rep.OK {
		t.Fatalf("continued report: %d rounds, cells %+v", rep.Rounds, rep.Cells)
	}
	if _, err := ReadReport(strings.NewReader("{not json")); err == nil {
		t.Fatal("ReadReport accepted bad JSON")
	}
}
