// Command tester-go tests and benchmarks an L4 TCP proxy over loopback.
//
//	tester-go backends  serve identify/echo/sink/source/bench backends (with faults)
//	tester-go check     correctness cases against a running proxy
//	tester-go faults    backend-failure cases (tester-go owns the backends)
//	tester-go bench     one load against one endpoint
//	tester-go compare   several loads against several endpoints, interleaved
//	tester-go register  keep a target registered in etcd under a lease
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"tester-go/internal/report"
)

// stdout receives results; tests replace it.
var stdout io.Writer = os.Stdout

func syncStdout() {
	if f, ok := stdout.(*os.File); ok {
		f.Sync()
	}
}

// exitUsage is the exit status for bad command lines.
const exitUsage = 2

var commands = []struct {
	name, summary string
	run           func(args []string) int
}{
	{"backends", "serve test backends on the config's local targets or on --listen addresses", runBackends},
	{"check", "run correctness cases (routing, balancing, integrity, half-close, ...) through a proxy", runCheck},
	{"faults", "run backend-failure cases through a proxy; tester-go serves the targets itself", runFaults},
	{"bench", "run one load (bulk, pingpong, rr50, churn, idle-mostly, sockperf-pp, ...) against one endpoint", runBench},
	{"compare", "run loads against several endpoints round by round and print one comparison table", runCompare},
	{"register", "keep one target registered with a proxy fleet in etcd under a lease (dropped when this dies)", runRegister},
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "tester-go: correctness and performance tester for an L4 TCP proxy (loopback only)\n\n")
	fmt.Fprintf(w, "usage: tester-go <command> [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'tester-go <command> -h' for the command's flags. Exit status: 0 pass, 1 fail, 2 usage error.\n")
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		usage(os.Stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(os.Stdout)
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.run(args[1:])
		}
	}
	fmt.Fprintf(os.Stderr, "tester-go: unknown command %q\n\n", args[0])
	usage(os.Stderr)
	return exitUsage
}

// newFlags returns a FlagSet whose usage names the command.
func newFlags(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: tester-go %s %s\n\nflags:\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses flags; it returns (status, false) when the caller must exit.
func parse(fs *flag.FlagSet, args []string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, false
		}
		return exitUsage, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "tester-go %s: unexpected arguments: %s\n", fs.Name(), strings.Join(fs.Args(), " "))
		return exitUsage, false
	}
	return 0, true
}

func usageErr(cmd, format string, args ...interface{}) int {
	fmt.Fprintf(os.Stderr, "tester-go %s: %s\n", cmd, fmt.Sprintf(format, args...))
	fmt.Fprintf(os.Stderr, "run 'tester-go %s -h' for help\n", cmd)
	return exitUsage
}

func fatal(cmd string, err error) int {
	fmt.Fprintf(os.Stderr, "tester-go %s: %v\n", cmd, err)
	return 1
}

// sizeFlag is a byte count accepting 1048576, 64KiB, 1MiB, 1GiB.
type sizeFlag int64

func (s *sizeFlag) String() string { return fmt.Sprint(int64(*s)) }
func (s *sizeFlag) Set(v string) error {
	n, err := report.ParseBytes(v)
	if err != nil {
		return err
	}
	*s = sizeFlag(n)
	return nil
}
