// Package config parses the proxy's config.json (Fly's challenge format).
//
//	{"Apps":[{"Name":"five-thousand","Ports":[5001,"5200","8000-8010"],
//	          "Targets":["127.0.0.1:15001","127.0.0.1:15002"]}]}
//
// A port is a JSON number, a string "N", or a string range "A-B" (inclusive).
package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

// MaxRange bounds the number of ports one "A-B" range may expand to.
const MaxRange = 65535

// Config is the whole file.
type Config struct {
	Apps []App `json:"Apps"`
}

// App is one application: the ports the proxy listens on and the targets it
// forwards to.
type App struct {
	Name    string   `json:"Name"`
	Ports   PortList `json:"Ports"`
	Targets []string `json:"Targets"`
}

// PortList is a list of ports, expanded from numbers, "N" strings and "A-B"
// range strings.
type PortList []int

// UnmarshalJSON accepts [5001, "5002", "8000-8999"].
func (p *PortList) UnmarshalJSON(b []byte) error {
	var raw []json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return fmt.Errorf("Ports must be a JSON array: %w", err)
	}
	var out PortList
	for _, r := range raw {
		ports, err := parsePortItem(r)
		if err != nil {
			return err
		}
		out = append(out, ports...)
	}
	*p = out
	return nil
}

func parsePortItem(r json.RawMessage) ([]int, error) {
	var n json.Number
	dec := json.NewDecoder(strings.NewReader(string(r)))
	dec.UseNumber()
	var v interface{}
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("bad port %s: %w", r, err)
	}
	switch x := v.(type) {
	case json.Number:
		n = x
		i, err := strconv.Atoi(n.String())
		if err != nil {
			return nil, fmt.Errorf("bad port %s: not an integer", r)
		}
		if err := validPort(i); err != nil {
			return nil, err
		}
		return []int{i}, nil
	case string:
		return ParsePortString(x)
	default:
		return nil, fmt.Errorf("bad port %s: want a number, \"N\" or \"A-B\"", r)
	}
}

// ParsePortString parses "N" or "A-B" (inclusive range).
func ParsePortString(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if lo, hi, ok := strings.Cut(s, "-"); ok {
		a, err1 := strconv.Atoi(strings.TrimSpace(lo))
		b, err2 := strconv.Atoi(strings.TrimSpace(hi))
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad port range %q", s)
		}
		if err := validPort(a); err != nil {
			return nil, err
		}
		if err := validPort(b); err != nil {
			return nil, err
		}
		if b < a {
			return nil, fmt.Errorf("bad port range %q: end before start", s)
		}
		out := make([]int, 0, b-a+1)
		for i := a; i <= b; i++ {
			out = append(out, i)
		}
		return out, nil
	}
	i, err := strconv.Atoi(s)
	if err != nil {
		return nil, fmt.Errorf("bad port %q: want \"N\" or \"A-B\"", s)
	}
	if err := validPort(i); err != nil {
		return nil, err
	}
	return []int{i}, nil
}

func validPort(i int) error {
	if i < 1 || i > 65535 {
		return fmt.Errorf("port %d out of range 1-65535", i)
	}
	return nil
}

// Parse decodes and validates a config document.
func Parse(b []byte) (*Config, error) {
	var c Config
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Load reads and parses a config file.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Validate checks names, ports, targets, and that no port belongs to two apps.
func (c *Config) Validate() error {
	if len(c.Apps) == 0 {
		return errors.New("config: no Apps")
	}
	owner := map[int]string{}
	for i, a := range c.Apps {
		if a.Name == "" {
			return fmt.Errorf("config: app #%d has no Name", i)
		}
		if len(a.Ports) == 0 {
			return fmt.Errorf("config: app %q has no Ports", a.Name)
		}
		if len(a.Targets) == 0 {
			return fmt.Errorf("config: app %q has no Targets", a.Name)
		}
		for _, p := range a.Ports {
			if o, dup := owner[p]; dup {
				return fmt.Errorf("config: port %d is in both %q and %q", p, o, a.Name)
			}
			owner[p] = a.Name
		}
		for _, t := range a.Targets {
			if _, _, err := net.SplitHostPort(t); err != nil {
				return fmt.Errorf("config: app %q: bad target %q: %v", a.Name, t, err)
			}
		}
	}
	return nil
}

// LocalTargets returns the targets a local backend can serve and the ones it
// cannot, with a reason for each skipped target.
func (a App) LocalTargets() (local []string, skipped map[string]string) {
	skipped = map[string]string{}
	for _, t := range a.Targets {
		if ok, why := IsLocal(t); ok {
			local = append(local, t)
		} else {
			skipped[t] = why
		}
	}
	return local, skipped
}

// IsLocal reports whether target is host:port with host a literal IPv4
// loopback address (127.0.0.0/8) or "localhost"; if not, it says why.
func IsLocal(target string) (bool, string) {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return false, "not host:port"
	}
	if pn, err := strconv.Atoi(port); err != nil || pn < 1 || pn > 65535 {
		return false, "bad port"
	}
	if host == "localhost" {
		return true, ""
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return false, "hostname, not a literal IP (unresolvable or not local)"
	}
	if ip4 := ip.To4(); ip4 != nil && ip4[0] == 127 {
		return true, ""
	}
	return false, "not in 127.0.0.0/8"
}

// ListenAddr maps a local target to the address to bind ("localhost" ->
// 127.0.0.1).
func ListenAddr(target string) string {
	host, port, _ := net.SplitHostPort(target)
	if host == "localhost" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}
