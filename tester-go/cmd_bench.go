package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/bench"
	"tester-go/internal/compare"
	"tester-go/internal/report"
)

func runBench(args []string) int {
	fs := newFlags("bench", "--target HOST:PORT --load "+strings.Join(bench.Loads, "|")+" [--duration 3s] [--streams 8] [--conns 2000] [--proxy-pid PID] [--json]")
	target := fs.String("target", "", "endpoint that reaches a bench backend (tester-go backends --kind bench), directly or through a proxy (required)")
	load := fs.String("load", "bulk", loadHelp)
	duration := fs.Duration("duration", 3*time.Second, "how long to generate load (idle: how long to hold the connections)")
	streams := fs.Int("streams", 8, "parallel streams (parallel) or concurrent connecting workers (connrate)")
	conns := fs.Int("conns", 2000, "connections to hold open (idle, idle-mostly)")
	rrConns := fs.Int("rr-conns", 50, "kept connections of rr50")
	clients := fs.Int("clients", 50, "concurrent connecting clients of churn")
	hold := fs.Duration("hold", 0, "how long idle-mostly holds its connections (default: --duration)")
	interval := fs.Duration("interval", 2*time.Second, "idle-mostly: mean gap between one connection's messages (jittered 0.5x..1.5x)")
	sockperfAddr := fs.String("sockperf", "", "sockperf-pp: HOST:PORT that reaches `sockperf sr --tcp`")
	iperf3Addr := fs.String("iperf3", "", "iperf3-bulk: HOST:PORT that reaches `iperf3 -s`")
	pid := fs.Int("proxy-pid", 0, "pid of the proxy: report its CPU seconds (utime+stime), CPU s/GB and, for idle, VmRSS before/during/after")
	asJSON := fs.Bool("json", false, "print the result as JSON instead of a table")
	timeout := fs.Duration("timeout", 10*time.Second, "dial timeout and idle timeout per read/write")
	if st, ok := parse(fs, args); !ok {
		return st
	}
	if *target == "" {
		return usageErr("bench", "--target is required")
	}
	if !bench.ValidLoad(*load) {
		return usageErr("bench", "unknown --load %q (want %s)", *load, strings.Join(bench.Loads, ", "))
	}
	if *duration <= 0 || *duration > 10*time.Minute {
		return usageErr("bench", "--duration must be between 1ns and 10m")
	}
	if msg := checkCounts(*streams, *conns, *rrConns, *clients); msg != "" {
		return usageErr("bench", "%s", msg)
	}
	r, err := bench.Run(bench.Options{Target: *target, Load: *load, Duration: *duration, Streams: *streams,
		Conns: *conns, ProxyPID: *pid, Timeout: *timeout, RRConns: *rrConns, Clients: *clients,
		Hold: *hold, Interval: *interval, SockperfTarget: *sockperfAddr, Iperf3Target: *iperf3Addr})
	if err != nil {
		return fatal("bench", err)
	}
	if *asJSON {
		if err := r.WriteJSON(stdout); err != nil {
			return fatal("bench", err)
		}
	} else {
		r.WriteText(stdout)
	}
	if !r.OK() {
		return 1
	}
	return 0
}

// endpointList is a repeatable --endpoint flag.
type endpointList []compare.Endpoint

func (l *endpointList) String() string {
	var s []string
	for _, e := range *l {
		s = append(s, e.Name+"="+e.Addr)
	}
	return strings.Join(s, " ")
}

func (l *endpointList) Set(v string) error {
	e, err := compare.ParseEndpoint(v)
	if err != nil {
		return err
	}
	for _, x := range *l {
		if x.Name == e.Name {
			return fmt.Errorf("endpoint name %q given twice", e.Name)
		}
	}
	*l = append(*l, e)
	return nil
}

const loadHelp = "bulk (1 stream one way), bidi (1 echo stream both ways), parallel (--streams one-way streams), " +
	"pingpong (64-byte request/response, one connection), rr50 (the same on --rr-conns kept connections), " +
	"churn (--clients clients, a new connection per 64-byte exchange), connrate (connect+first byte, --streams workers), " +
	"idle (hold --conns connections after one exchange), idle-mostly (hold --conns connections for --hold, a small message every --interval), " +
	"sockperf-pp (the third-party sockperf ping-pong client through --sockperf), " +
	"iperf3-bulk (the third-party iperf3 client, one stream, through --iperf3)"

// checkCounts validates the load-size flags; "" when they are fine.
func checkCounts(streams, conns, rrConns, clients int) string {
	if streams < 1 || streams > 1024 || conns < 1 || conns > 100000 || rrConns < 1 || rrConns > 1024 || clients < 1 || clients > 1024 {
		return "--streams, --rr-conns and --clients must be 1..1024 and --conns 1..100000"
	}
	return ""
}

func runCompare(args []string) int {
	fs := newFlags("compare", "[--serve ADDR] --endpoint NAME=HOST:PORT[,pid=PID[+PID...]][,role=ours|peer|base][,sockperf=HOST:PORT][,iperf3=HOST:PORT] ... [--loads "+strings.Join(bench.Loads, ",")+"] [--duration 3s] [--rounds 3] [--json FILE] [--report-dir DIR [--preamble FILE]]")
	serve := fs.String("serve", "", "start the bench backend in-process on this address (the proxies under test forward to it; name it \"direct\" to get ratios)")
	var eps endpointList
	fs.Var(&eps, "endpoint", "NAME=HOST:PORT[,pid=PID[+PID...]][,role=ours|peer|base][,sockperf=HOST:PORT], repeatable; ours are judged against the best peer; \"direct\" defaults to base, the rest to ours")
	loads := fs.String("loads", strings.Join(bench.Loads, ","), "comma-separated loads to run")
	duration := fs.Duration("duration", 3*time.Second, "duration of each run")
	rounds := fs.Int("rounds", 3, "rounds; each round runs every load against every endpoint; medians and min-max are reported")
	streams := fs.Int("streams", 8, "parallel streams (parallel) / workers (connrate)")
	conns := fs.Int("conns", 2000, "connections held by idle and idle-mostly")
	rrConns := fs.Int("rr-conns", 50, "kept connections of rr50")
	clients := fs.Int("clients", 50, "concurrent connecting clients of churn")
	hold := fs.Duration("hold", 15*time.Second, "how long idle-mostly holds its connections")
	interval := fs.Duration("interval", 2*time.Second, "idle-mostly: mean gap between one connection's messages (jittered 0.5x..1.5x)")
	jsonPath := fs.String("json", "", "write machine-readable results (every run) to this file")
	reportDir := fs.String("report-dir", "", "write results.md, results.json and the SVG charts into this directory")
	preamble := fs.String("preamble", "", "Markdown file put at the top of results.md (machine, versions, peer configs)")
	resume := fs.String("continue", "", "a --json file of an earlier run of the same endpoints and loads: its rounds count first and this run's are added (the endpoints may have been restarted in between)")
	timeout := fs.Duration("timeout", 10*time.Second, "dial timeout and idle timeout per read/write")
	quiet := fs.Bool("q", false, "do not print per-run progress to stderr")
	if st, ok := parse(fs, args); !ok {
		return st
	}
	if len(eps) == 0 {
		return usageErr("compare", "at least one --endpoint is required")
	}
	var ls []string
	for _, l := range strings.Split(*loads, ",") {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if !bench.ValidLoad(l) {
			return usageErr("compare", "unknown load %q (want %s)", l, strings.Join(bench.Loads, ", "))
		}
		ls = append(ls, l)
	}
	if len(ls) == 0 {
		return usageErr("compare", "--loads is empty")
	}
	if *rounds < 1 || *rounds > 20 || *duration <= 0 || *duration > 5*time.Minute || *hold <= 0 || *hold > 10*time.Minute {
		return usageErr("compare", "--rounds must be 1..20, --duration up to 5m and --hold up to 10m")
	}
	if msg := checkCounts(*streams, *conns, *rrConns, *clients); msg != "" {
		return usageErr("compare", "%s", msg)
	}
	var pre []byte
	if *preamble != "" {
		b, err := os.ReadFile(*preamble)
		if err != nil {
			return usageErr("compare", "--preamble: %v", err)
		}
		pre = b
	}
	if *serve != "" {
		srv, err := backend.Listen([]string{*serve}, nil, backend.Options{Kind: backend.Bench})
		if err != nil {
			return fatal("compare", err)
		}
		defer srv.Close()
		fmt.Fprintf(os.Stderr, "compare: bench backend on %s\n", srv.Addrs()[0])
	}
	var prev *compare.Report
	if *resume != "" {
		f, err := os.Open(*resume)
		if err != nil {
			return usageErr("compare", "--continue: %v", err)
		}
		prev, err = compare.ReadReport(f)
		f.Close()
		if err != nil {
			return usageErr("compare", "--continue %s: %v", *resume, err)
		}
	}
	total := compare.Estimate(ls, len(eps), *rounds, *duration, *hold)
	fmt.Fprintf(os.Stderr, "compare: %d rounds x %d endpoints x %d loads ≈ %s\n", *rounds, len(eps), len(ls), report.Dur(total))
	o := compare.Options{Endpoints: eps, Loads: ls, Duration: *duration, Rounds: *rounds,
		Streams: *streams, Conns: *conns, Timeout: *timeout, RRConns: *rrConns, Clients: *clients,
		Hold: *hold, Interval: *interval, Prev: prev}
	if !*quiet {
		o.Progress = os.Stderr
	}
	rep := compare.Run(o)
	rep.WriteText(stdout)
	if *jsonPath != "" {
		if err := writeFile(*jsonPath, func(f *os.File) error { return rep.WriteJSON(f) }); err != nil {
			return fatal("compare", err)
		}
	}
	if *reportDir != "" {
		if err := rep.WriteFiles(*reportDir, string(pre)); err != nil {
			return fatal("compare", err)
		}
	}
	if !rep.OK {
		return 1
	}
	return 0
}

func writeFile(path string, fn func(*os.File) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := fn(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
