package main

import (
	"encoding/json"
	"os"
	"time"

	"tester-go/internal/config"
	"tester-go/internal/faults"
)

func runFaults(args []string) int {
	fs := newFlags("faults", "--config FILE --proxy-host HOST [--app NAME] [--json] [--timeout D]")
	cfgPath := fs.String("config", "", "config.json the proxy runs with (required)")
	host := fs.String("proxy-host", "127.0.0.1", "host where the proxy listens")
	app := fs.String("app", "", "app whose local targets tester-go serves and breaks (default: the app with the most local targets); nothing else may listen on them")
	asJSON := fs.Bool("json", false, "print one JSON document instead of a table")
	timeout := fs.Duration("timeout", 5*time.Second, "how long a connection may stay silent before it counts as hung")
	verbose := fs.Bool("v", false, "print each case's name to stderr as it starts")
	if st, ok := parse(fs, args); !ok {
		return st
	}
	if *cfgPath == "" {
		return usageErr("faults", "--config is required")
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return fatal("faults", err)
	}
	o := faults.Options{Config: cfg, App: *app, ProxyHost: *host, Timeout: *timeout}
	if *verbose {
		o.Progress = os.Stderr
	}
	rep, err := faults.Run(o)
	if err != nil {
		return fatal("faults", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return fatal("faults", err)
		}
	} else {
		rep.WriteText(stdout)
	}
	if !rep.Pass {
		return 1
	}
	return 0
}
