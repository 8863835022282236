package main

import (
	"bytes"
	"fmt"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tester-go/internal/brokenproxy"
)

func capture(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var buf bytes.Buffer
	old := stdout
	stdout = &buf
	defer func() { stdout = old }()
	code := run(args)
	return code, buf.String()
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		code int
	}{
		{nil, 2},
		{[]string{"nope"}, 2},
		{[]string{"help"}, 0},
		{[]string{"check"}, 2},
		{[]string{"check", "--bogus"}, 2},
		{[]string{"check", "--config", "x.json", "extra"}, 2},
		{[]string{"backends"}, 2},
		{[]string{"backends", "--listen", "127.0.0.1:0", "--config", "x"}, 2},
		{[]string{"backends", "--listen", "127.0.0.1:0", "--kind", "weird"}, 2},
		{[]string{"backends", "--listen", "127.0.0.1:0", "--fault", "weird"}, 2},
		{[]string{"bench"}, 2},
		{[]string{"bench", "--target", "127.0.0.1:1", "--load", "weird"}, 2},
		{[]string{"compare"}, 2},
		{[]string{"compare", "--endpoint", "bad"}, 2},
		{[]string{"compare", "--endpoint", "a=127.0.0.1:1", "--loads", "weird"}, 2},
		{[]string{"faults"}, 2},
		{[]string{"check", "--config", "/nonexistent.json"}, 1},
	}
	for _, tt := range tests {
		if code, _ := capture(t, tt.args...); code != tt.code {
			t.Errorf("tester-go %s: exit %d, want %d", strings.Join(tt.args, " "), code, tt.code)
		}
	}
}

func TestBackendsReady(t *testing.T) {
	code, out := capture(t, "backends", "--listen", "127.0.0.1:0,127.0.0.1:0", "--kind", "echo", "--duration", "100ms")
	if code != 0 || out != "ready 2 backends\n" {
		t.Fatalf("exit %d, stdout %q", code, out)
	}
}

// freeAddr returns host:port on a random 127/8 address that was free a
// moment ago (so --spawn-backends can bind it).
func freeAddr(t *testing.T) string {
	t.Helper()
	for i := 0; i < 20; i++ {
		ip := fmt.Sprintf("127.%d.%d.%d", 1+rand.Intn(250), rand.Intn(250), 1+rand.Intn(250))
		ln, err := net.Listen("tcp", ip+":0")
		if err != nil {
			continue
		}
		a := ln.Addr().String()
		ln.Close()
		return a
	}
	t.Fatal("no free loopback address")
	return ""
}

func TestCheckSpawnBackendsEndToEnd(t *testing.T) {
	rand.Seed(time.Now().UnixNano())
	t1, t2 := freeAddr(t), freeAddr(t)
	p, err := brokenproxy.Start(brokenproxy.Correct, [][]string{{t1, t2}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	cfg := filepath.Join(t.TempDir(), "config.json")
	doc := fmt.Sprintf(`{"Apps":[{"Name":"e2e","Ports":[%d,"%d"],"Targets":[%q,%q,"bad.target.for.testing:6003"]}]}`,
		p.Ports[0][0], p.Ports[0][1], t1, t2)
	if err := os.WriteFile(cfg, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out := capture(t, "check", "--config", cfg, "--proxy-host", "127.0.0.1", "--spawn-backends",
		"--quick", "--conns", "40", "--max-size", "256KiB", "--timeout", "3s")
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	for _, want := range []string{"routing", "balancing", "avoid-bad-target", "integrity", "half-close", "concurrency", "slow-reader", "PASS: 7/7"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	code, out = capture(t, "check", "--config", cfg, "--spawn-backends", "--quick", "--conns", "20", "--max-size", "64KiB", "--json")
	if code != 0 || !strings.HasPrefix(out, "{") || !strings.Contains(out, `"pass": true`) {
		t.Fatalf("json: exit %d:\n%s", code, out)
	}
}
