package main

import (
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/config"
)

func runBackends(args []string) int {
	fs := newFlags("backends", "(--config FILE | --listen ADDR[,ADDR...]) [--kind identify|echo|sink|source|bench] [fault flags] [--duration D]")
	cfgPath := fs.String("config", "", "serve every local target (127.0.0.0/8 or localhost) of every app in this config.json")
	listen := fs.String("listen", "", "comma-separated addresses to serve instead of a config (e.g. 127.0.0.1:0 for an ephemeral port)")
	kind := fs.String("kind", backend.Identify, "identify (banner \"TARGET <addr>\" then echo), echo, sink (reply \"SINK <n> <sha256>\" after EOF), source (send --source-bytes then close), bench (see README)")
	srcBytes := sizeFlag(1 << 20)
	fs.Var(&srcBytes, "source-bytes", "bytes sent by --kind source (accepts 64KiB, 1MiB, 1GiB)")
	fault := fs.String("fault", "", "accept-close (close right after accept) or accept-rst (reset right after accept); for \"refuse\", do not run a backend on that address")
	var readRate, stallAfter, dieAfter sizeFlag
	fs.Var(&readRate, "read-rate", "read from each client at most this many bytes/s (0 = unlimited)")
	fs.Var(&stallAfter, "stall-after", "after this many bytes in a direction stop reading and writing but keep the connection open (0 = off)")
	fs.Var(&dieAfter, "die-after", "after relaying this many bytes reset the connection (SO_LINGER 0) (0 = off)")
	duration := fs.Duration("duration", 0, "exit after this long (0 = until SIGINT/SIGTERM)")
	if st, ok := parse(fs, args); !ok {
		return st
	}
	if (*cfgPath == "") == (*listen == "") {
		return usageErr("backends", "exactly one of --config or --listen is required")
	}
	o := backend.Options{Kind: *kind, SourceBytes: int64(srcBytes), Fault: *fault,
		ReadRate: int64(readRate), StallAfter: int64(stallAfter), DieAfter: int64(dieAfter)}
	if err := o.Validate(); err != nil {
		return usageErr("backends", "%v", err)
	}
	var addrs, labels []string
	if *cfgPath != "" {
		cfg, err := config.Load(*cfgPath)
		if err != nil {
			return fatal("backends", err)
		}
		addrs, labels = localTargets(cfg, true)
		if len(addrs) == 0 {
			return fatal("backends", fmt.Errorf("%s has no local targets to serve", *cfgPath))
		}
	} else {
		for _, a := range strings.Split(*listen, ",") {
			if a = strings.TrimSpace(a); a != "" {
				addrs = append(addrs, a)
			}
		}
	}
	srv, err := backend.Listen(addrs, labels, o)
	if err != nil {
		return fatal("backends", err)
	}
	defer srv.Close()
	if *listen != "" {
		fmt.Fprintf(os.Stderr, "backends: %s on %s\n", o.Kind, strings.Join(srv.Addrs(), " "))
	}
	fmt.Fprintf(stdout, "ready %d backends\n", len(addrs))
	syncStdout()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	var timeout <-chan time.Time
	if *duration > 0 {
		timeout = time.After(*duration)
	}
	select {
	case s := <-sig:
		fmt.Fprintf(os.Stderr, "backends: %v, stopping\n", s)
	case <-timeout:
	}
	acc := srv.Accepted()
	keys := make([]string, 0, len(acc))
	for k := range acc {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, acc[k]))
	}
	fmt.Fprintf(os.Stderr, "backends: accepted connections: %s\n", strings.Join(parts, " "))
	return 0
}

// localTargets lists the config's servable targets (deduplicated) as bind
// addresses and banner labels; with verbose it reports skipped ones on
// stderr.
func localTargets(cfg *config.Config, verbose bool) (addrs, labels []string) {
	seen := map[string]bool{}
	for _, a := range cfg.Apps {
		local, skipped := a.LocalTargets()
		for _, t := range local {
			if !seen[t] {
				seen[t] = true
				addrs = append(addrs, config.ListenAddr(t))
				labels = append(labels, t)
			}
		}
		if verbose {
			var sk []string
			for t := range skipped {
				sk = append(sk, t)
			}
			sort.Strings(sk)
			for _, t := range sk {
				fmt.Fprintf(os.Stderr, "backends: skipping %s (app %s): %s\n", t, a.Name, skipped[t])
			}
		}
	}
	return addrs, labels
}
