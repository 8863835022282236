package compare

import (
	"bytes"
	"encoding/json"
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
		{"direct=127.0.0.1:9000", Endpoint{"direct", "127.0.0.1:9000", 0}, false},
		{"rust=127.0.0.1:5001,pid=1234", Endpoint{"rust", "127.0.0.1:5001", 1234}, false},
		{"x=localhost:1", Endpoint{"x", "localhost:1", 0}, false},
		{"127.0.0.1:9000", Endpoint{}, true},
		{"a=127.0.0.1", Endpoint{}, true},
		{"a=127.0.0.1:0", Endpoint{}, true},
		{"a=127.0.0.1:1,pid=x", Endpoint{}, true},
		{"a=127.0.0.1:1,foo=1", Endpoint{}, true},
		{"=127.0.0.1:1", Endpoint{}, true},
	}
	for _, tt := range tests {
		got, err := ParseEndpoint(tt.in)
		if (err != nil) != tt.err || got != tt.want {
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
	p, err := brokenproxy.Start(brokenproxy.Correct, [][]string{{be.Addrs()[0]}}, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	rep := Run(Options{
		Endpoints: []Endpoint{{Name: "direct", Addr: be.Addrs()[0]}, {Name: "go-proxy", Addr: "127.0.0.1:" + strconv.Itoa(p.Ports[0][0])}},
		Loads:     []string{"bulk", "pingpong", "connrate", "idle"},
		Duration:  100 * time.Millisecond, Rounds: 2, Streams: 2, Conns: 20, Timeout: 5 * time.Second,
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
	}
	var text, md, js bytes.Buffer
	rep.WriteText(&text)
	rep.WriteMarkdown(&md)
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"bulk GB/s", "p50 µs", "conn/s", "go-proxy", "x)", "verdict: fastest bulk"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
	if !strings.Contains(md.String(), "| ENDPOINT | bulk GB/s") {
		t.Errorf("markdown:\n%s", md.String())
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back.Cells) != 8 {
		t.Fatalf("json: %v, %d cells", err, len(back.Cells))
	}
}
