package check

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/brokenproxy"
	"tester-go/internal/config"
)

// setup starts identify backends for two apps with two targets each, a
// proxy variant in front of them, and returns a config describing it. The
// second app also lists an unresolvable target that the proxy never gets.
func setup(t *testing.T, v brokenproxy.Variant) *config.Config {
	t.Helper()
	be, err := backend.Listen([]string{"127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"}, nil, backend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	a := be.Addrs()
	p, err := brokenproxy.Start(v, [][]string{{a[0], a[1]}, {a[2], a[3]}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	doc := fmt.Sprintf(`{"Apps":[
		{"Name":"one","Ports":[%d,"%d"],"Targets":[%q,%q]},
		{"Name":"two","Ports":[%d,%d],"Targets":[%q,%q,"bad.target.for.testing:6003"]}]}`,
		p.Ports[0][0], p.Ports[0][1], a[0], a[1], p.Ports[1][0], p.Ports[1][1], a[2], a[3])
	cfg, err := config.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func quickOpts(cfg *config.Config) Options {
	o := Defaults(true)
	o.Config, o.ProxyHost = cfg, "127.0.0.1"
	o.Conns, o.Timeout, o.SlowBytes, o.SlowRate = 60, 1500*time.Millisecond, 256<<10, 4<<20
	return o
}

func TestCheckAgainstProxyVariants(t *testing.T) {
	// replay, duplicate and drop-pad keep the byte count exact; the check
	// must catch them by sequence and say where the bytes came from (the
	// integrity case's 1 MiB and half-close's 256 KiB payloads reach their
	// offsets).
	tests := []struct {
		v        brokenproxy.Variant
		mustFail []string // cases that must FAIL; empty = everything passes
		msg      string   // a failure of mustFail[0] must contain this
	}{
		{brokenproxy.Correct, nil, ""},
		{brokenproxy.DropTail, []string{CaseHalfClose}, "tail dropped"},
		{brokenproxy.Corrupt, []string{CaseIntegrity}, fmt.Sprintf("byte count exact, but content out of sequence at offset %d", brokenproxy.CorruptOffset)},
		{brokenproxy.OneTarget, []string{CaseBalancing}, "all connections went to one target"},
		{brokenproxy.IgnoreFIN, []string{CaseHalfClose}, "FIN not propagated"},
		{brokenproxy.Replay, []string{CaseIntegrity, CaseHalfClose},
			fmt.Sprintf("byte count exact, but content out of sequence at offset %d", brokenproxy.ReplayAt)},
		{brokenproxy.Duplicate, []string{CaseIntegrity, CaseHalfClose},
			fmt.Sprintf("replay of offset %d (%d bytes earlier)", brokenproxy.DupAt-brokenproxy.DupLen, brokenproxy.DupLen)},
		{brokenproxy.DropPad, []string{CaseIntegrity, CaseHalfClose},
			fmt.Sprintf("bytes of offset %d, %d bytes ahead (a segment is missing)", brokenproxy.DropAt+brokenproxy.DropLen, brokenproxy.DropLen)},
	}
	for _, tt := range tests {
		tt := tt
		t.Run(string(tt.v), func(t *testing.T) {
			t.Parallel()
			rep := Run(quickOpts(setup(t, tt.v)))
			var buf bytes.Buffer
			rep.WriteText(&buf)
			if len(tt.mustFail) == 0 {
				if !rep.Pass {
					t.Fatalf("correct proxy failed:\n%s", buf.String())
				}
				for _, c := range rep.Cases {
					if c.Status != Pass {
						t.Errorf("case %s = %s, want PASS", c.Name, c.Status)
					}
				}
				return
			}
			if rep.Pass {
				t.Fatalf("%s passed, want failure:\n%s", tt.v, buf.String())
			}
			for _, name := range tt.mustFail {
				if c := rep.Case(name); c == nil || c.Status != Fail {
					t.Errorf("case %s did not fail:\n%s", name, buf.String())
				}
			}
			if !strings.Contains(rep.Verdict, tt.mustFail[0]) {
				t.Errorf("verdict %q does not name %s", rep.Verdict, tt.mustFail[0])
			}
			if c := rep.Case(tt.mustFail[0]); c != nil {
				caught := ""
				for _, f := range c.Failures {
					if strings.Contains(f, tt.msg) {
						caught = f
						break
					}
				}
				if caught == "" {
					t.Errorf("no %s failure says %q:\n%s", c.Name, tt.msg, buf.String())
				}
				t.Logf("%s caught by %s: %s", tt.v, c.Name, caught)
			}
		})
	}
}

func TestReportJSON(t *testing.T) {
	rep := Run(quickOpts(setup(t, brokenproxy.Correct)))
	var buf bytes.Buffer
	if err := rep.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(buf.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if !back.Pass || len(back.Cases) != 7 || len(back.Apps) != 2 || len(back.Apps[1].Ports) != 2 {
		t.Fatalf("round trip: %+v", back)
	}
	if back.Apps[0].BytesVerified == 0 || len(back.Apps[0].Targets) != 2 {
		t.Fatalf("app summary: %+v", back.Apps[0])
	}
}

func TestIntegritySizes(t *testing.T) {
	tests := []struct {
		max  int64
		want []int64
	}{
		{1, []int64{1}},
		{1 << 20, []int64{1, 1500, 64<<10 + 3, 1 << 20}},
		{3 << 20, []int64{1, 1500, 64<<10 + 3, 1 << 20, 3 << 20}},
	}
	for _, tt := range tests {
		if got := integritySizes(tt.max); fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("integritySizes(%d) = %v, want %v", tt.max, got, tt.want)
		}
	}
}
