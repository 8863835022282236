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
	fs := newFlags("bench", "--target HOST:PORT --load bulk|bidi|parallel|pingpong|connrate|idle [--duration 3s] [--streams 8] [--conns 1000] [--proxy-pid PID] [--json]")
	target := fs.String("target", "", "endpoint that reaches a bench backend (tester-go backends --kind bench), directly or through a proxy (required)")
	load := fs.String("load", "bulk", "bulk (1 stream one way), bidi (1 echo stream both ways), parallel (--streams one-way streams), pingpong (64-byte request/response latency), connrate (connect+first byte), idle (hold --conns connections)")
	duration := fs.Duration("duration", 3*time.Second, "how long to generate load (idle: how long to hold the connections)")
	streams := fs.Int("streams", 8, "parallel streams (parallel) or concurrent connecting workers (connrate)")
	conns := fs.Int("conns", 1000, "connections to hold open (idle)")
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
	if *streams < 1 || *streams > 1024 || *conns < 1 || *conns > 100000 {
		return usageErr("bench", "--streams must be 1..1024 and --conns 1..100000")
	}
	r, err := bench.Run(bench.Options{Target: *target, Load: *load, Duration: *duration, Streams: *streams,
		Conns: *conns, ProxyPID: *pid, Timeout: *timeout})
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

func runCompare(args []string) int {
	fs := newFlags("compare", "[--serve ADDR] --endpoint NAME=HOST:PORT[,pid=PID] ... [--loads bulk,bidi,parallel,pingpong,connrate,idle] [--duration 2s] [--rounds 2] [--json FILE] [--markdown FILE]")
	serve := fs.String("serve", "", "start the bench backend in-process on this address (the proxies under test forward to it; name it \"direct\" to get ratios)")
	var eps endpointList
	fs.Var(&eps, "endpoint", "NAME=HOST:PORT[,pid=PID], repeatable; the endpoint named \"direct\" is the baseline for ratios")
	loads := fs.String("loads", strings.Join(bench.Loads, ","), "comma-separated loads to run")
	duration := fs.Duration("duration", 2*time.Second, "duration of each run")
	rounds := fs.Int("rounds", 2, "rounds; each round runs every load against every endpoint; medians are reported")
	streams := fs.Int("streams", 8, "parallel streams (parallel) / workers (connrate)")
	conns := fs.Int("conns", 1000, "connections held by the idle load")
	jsonPath := fs.String("json", "", "write machine-readable results (every run) to this file")
	mdPath := fs.String("markdown", "", "write the comparison table as Markdown to this file")
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
	if *rounds < 1 || *rounds > 20 || *duration <= 0 || *duration > 5*time.Minute {
		return usageErr("compare", "--rounds must be 1..20 and --duration up to 5m")
	}
	if *serve != "" {
		srv, err := backend.Listen([]string{*serve}, nil, backend.Options{Kind: backend.Bench})
		if err != nil {
			return fatal("compare", err)
		}
		defer srv.Close()
		fmt.Fprintf(os.Stderr, "compare: bench backend on %s\n", srv.Addrs()[0])
	}
	total := time.Duration(*rounds*len(eps)*len(ls)) * *duration
	fmt.Fprintf(os.Stderr, "compare: %d rounds x %d endpoints x %d loads x %s ≈ %s\n", *rounds, len(eps), len(ls), *duration, report.Dur(total))
	o := compare.Options{Endpoints: eps, Loads: ls, Duration: *duration, Rounds: *rounds,
		Streams: *streams, Conns: *conns, Timeout: *timeout}
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
	if *mdPath != "" {
		if err := writeFile(*mdPath, func(f *os.File) error { rep.WriteMarkdown(f); return nil }); err != nil {
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
