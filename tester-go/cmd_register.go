package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"tester-go/internal/etcdreg"
)

// runRegister keeps one target registered in etcd under a lease until it
// is stopped: SIGINT/SIGTERM revoke the lease (the target leaves at once);
// SIGKILL leaves it to expire after the TTL, as a crashed host would.
func runRegister(args []string) int {
	fs := newFlags("register", "--etcd URL --app NAME --target HOST:PORT [--prefix /proxy/] [--id ID] [--ttl 2s]")
	endpoint := fs.String("etcd", "http://127.0.0.1:2379", "etcd client URL (its v3 JSON gateway)")
	prefix := fs.String("prefix", "/proxy/", "the proxies' --config-etcd-prefix")
	app := fs.String("app", "", "app to serve as a target of")
	target := fs.String("target", "", "host:port the proxies should connect to")
	id := fs.String("id", "", "unique name of this registration (default: the target)")
	ttl := fs.Duration("ttl", 2*time.Second, "lease TTL (whole seconds): how long after this process dies the target is dropped")
	if st, ok := parse(fs, args); !ok {
		return st
	}
	if *app == "" || *target == "" {
		return usageErr("register", "--app and --target are required")
	}
	if *id == "" {
		*id = *target
	}
	r := &etcdreg.Registration{Endpoint: *endpoint, Key: etcdreg.Key(*prefix, *app, *id), Value: *target, TTL: *ttl}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logf := func(f string, a ...interface{}) { fmt.Fprintf(os.Stderr, "register: "+f+"\n", a...) }
	if err := r.Register(ctx); err != nil {
		return fatal("register", err)
	}
	fmt.Fprintf(stdout, "registered %s\n", r.Key)
	syncStdout()
	logf("registered %s = %s (ttl %ds)", r.Key, r.Value, etcdreg.TTLSeconds(r.TTL))
	r.KeepRenewing(ctx, logf)
	revoke, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := r.Revoke(revoke); err != nil {
		logf("revoke: %v (the lease expires after its TTL)", err)
	}
	return 0
}
