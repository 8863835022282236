package main

import (
	"fmt"
	"os"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/check"
	"tester-go/internal/config"
)

func runCheck(args []string) int {
	fs := newFlags("check", "--config FILE --proxy-host HOST [--json] [--conns N] [--max-size BYTES] [--quick] [--timeout D] [--spawn-backends]")
	cfgPath := fs.String("config", "", "config.json the proxy runs with (required)")
	host := fs.String("proxy-host", "127.0.0.1", "host where the proxy listens on every app port")
	asJSON := fs.Bool("json", false, "print one JSON document on stdout instead of tables")
	quick := fs.Bool("quick", false, "short run: --conns 100, --max-size 1MiB, fewer probes per port")
	conns := fs.Int("conns", 0, "concurrent connections in the concurrency case (default 1000, 100 with --quick)")
	var maxSize sizeFlag
	fs.Var(&maxSize, "max-size", "largest integrity payload, 1 B up to 1GiB (default 64MiB, 1MiB with --quick)")
	perPort := fs.Int("per-port", 0, "connections per port in the routing case (default 4, 2 with --quick)")
	timeout := fs.Duration("timeout", 10*time.Second, "dial timeout and idle timeout for every read/write")
	spawn := fs.Bool("spawn-backends", false, "start identify backends for the config's local targets in-process first")
	verbose := fs.Bool("v", false, "print each case's name to stderr as it starts")
	if st, ok := parse(fs, args); !ok {
		return st
	}
	if *cfgPath == "" {
		return usageErr("check", "--config is required")
	}
	if *host == "" {
		return usageErr("check", "--proxy-host must not be empty")
	}
	if maxSize < 0 || maxSize > 1<<30 {
		return usageErr("check", "--max-size must be between 1 and 1GiB")
	}
	if *conns < 0 || *conns > 20000 {
		return usageErr("check", "--conns must be between 1 and 20000")
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return fatal("check", err)
	}
	if *spawn {
		addrs, labels := localTargets(cfg, false)
		srv, err := backend.Listen(addrs, labels, backend.Options{Kind: backend.Identify})
		if err != nil {
			return fatal("check", fmt.Errorf("--spawn-backends: %w (are backends already running?)", err))
		}
		defer srv.Close()
		fmt.Fprintf(os.Stderr, "check: serving %d identify backends in-process\n", len(addrs))
	}
	o := check.Defaults(*quick)
	o.Config, o.ProxyHost, o.Timeout = cfg, *host, *timeout
	if *conns > 0 {
		o.Conns = *conns
	}
	if maxSize > 0 {
		o.MaxSize = int64(maxSize)
	}
	if *perPort > 0 {
		o.PerPort = *perPort
	}
	if *verbose {
		o.Progress = os.Stderr
	}
	rep := check.Run(o)
	if *asJSON {
		if err := rep.WriteJSON(stdout); err != nil {
			return fatal("check", err)
		}
	} else {
		rep.WriteText(stdout)
	}
	if !rep.Pass {
		return 1
	}
	return 0
}
