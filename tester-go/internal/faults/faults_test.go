package faults

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"tester-go/internal/brokenproxy"
	"tester-go/internal/check"
	"tester-go/internal/config"
)

func TestFaultsAgainstProxyVariants(t *testing.T) {
	// mustFailAny: at least one of these cases must FAIL. keep-on-rst only
	// hangs when the proxy's reader sees the reset before its writer does,
	// so either of its two cases may be the one that catches it.
	// The content variants keep the byte count exact (replay, duplicate,
	// drop-pad) or flip one byte; slow-backend's 512 KiB echo reaches their
	// offsets and must name what happened there.
	tests := []struct {
		v           brokenproxy.Variant
		mustFailAny []string
		msg         string // a failure of the failed case must contain this
		timeout     time.Duration
	}{
		{brokenproxy.Correct, nil, "", 3 * time.Second},
		{brokenproxy.OneTarget, []string{CaseOneTargetDown}, "", 2 * time.Second},
		{brokenproxy.KeepOnRST, []string{CaseDieMidStream, CaseAcceptReset}, "", 1500 * time.Millisecond},
		{brokenproxy.FinOnRST, []string{CaseDieMidStream}, "a cut stream that looks finished", 2 * time.Second},
		{brokenproxy.Corrupt, []string{CaseSlowBackend}, fmt.Sprintf("content out of sequence at offset %d", brokenproxy.CorruptOffset), 2 * time.Second},
		{brokenproxy.Replay, []string{CaseSlowBackend},
			fmt.Sprintf("replay of offset %d (%d bytes earlier)", brokenproxy.ReplayFrom, brokenproxy.ReplayAt-brokenproxy.ReplayFrom), 2 * time.Second},
		{brokenproxy.Duplicate, []string{CaseSlowBackend},
			fmt.Sprintf("replay of offset %d (%d bytes earlier)", brokenproxy.DupAt-brokenproxy.DupLen, brokenproxy.DupLen), 2 * time.Second},
		{brokenproxy.DropPad, []string{CaseSlowBackend},
			fmt.Sprintf("bytes of offset %d, %d bytes ahead", brokenproxy.DropAt+brokenproxy.DropLen, brokenproxy.DropLen), 2 * time.Second},
	}
	for _, tt := range tests {
		tt := tt
		t.Run(string(tt.v), func(t *testing.T) {
			t.Parallel()
			lns := map[string]net.Listener{}
			var targets []string
			for i := 0; i < 2; i++ {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { ln.Close() })
				lns[ln.Addr().String()] = ln
				targets = append(targets, ln.Addr().String())
			}
			p, err := brokenproxy.Start(tt.v, [][]string{targets}, 1)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			cfg, err := config.Parse([]byte(fmt.Sprintf(`{"Apps":[{"Name":"f","Ports":[%d],"Targets":[%q,%q,"bad.example:1"]}]}`,
				p.Ports[0][0], targets[0], targets[1])))
			if err != nil {
				t.Fatal(err)
			}
			rep, err := Run(Options{Config: cfg, ProxyHost: "127.0.0.1", Timeout: tt.timeout, Listeners: lns})
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			rep.WriteText(&buf)
			if len(tt.mustFailAny) == 0 {
				if !rep.Pass {
					t.Fatalf("correct proxy failed:\n%s", buf.String())
				}
				return
			}
			for _, name := range tt.mustFailAny {
				if c := rep.Case(name); c != nil && c.Status == check.Fail {
					for _, f := range c.Failures {
						if strings.Contains(f, tt.msg) {
							t.Logf("%s caught by %s: %s", tt.v, name, f)
							return
						}
					}
					t.Errorf("%s failed but no failure says %q:\n%s", name, tt.msg, buf.String())
					return
				}
			}
			t.Errorf("none of %v failed:\n%s", tt.mustFailAny, buf.String())
		})
	}
}

func TestUnknownApp(t *testing.T) {
	cfg, _ := config.Parse([]byte(`{"Apps":[{"Name":"f","Ports":[1],"Targets":["127.0.0.1:1"]}]}`))
	if _, err := Run(Options{Config: cfg, App: "nope", ProxyHost: "127.0.0.1"}); err == nil {
		t.Fatal("want error for unknown app")
	}
}
