// Package etcdreg registers a target with a proxy fleet through etcd: the
// key <prefix>targets/<app>/<id> = "host:port" is put under a lease that
// is kept alive while the process runs. When the process dies the lease
// expires and etcd deletes the key, so every proxy drops the target.
//
// It talks to etcd's v3 JSON gateway over plain HTTP (stdlib only): keys
// and values are base64, int64 fields (lease IDs, TTLs) are JSON strings.
package etcdreg

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Registration is one key kept alive under one lease.
type Registration struct {
	Endpoint string // e.g. http://127.0.0.1:2379
	Key      string
	Value    string
	TTL      time.Duration
	client   *http.Client
	lease    string
}

// Key is the key a proxy reads a leased target of app from.
func Key(prefix, app, id string) string {
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return prefix + "targets/" + app + "/" + id
}

// TTLSeconds is the lease TTL etcd is asked for: whole seconds, at least 1.
func TTLSeconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	if s < 1 {
		return 1
	}
	return s
}

func (r *Registration) call(ctx context.Context, path string, body interface{}, out interface{}) error {
	if r.client == nil {
		r.client = &http.Client{Timeout: 2 * time.Second}
	}
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(r.Endpoint, "/")+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return fmt.Errorf("etcd %s: %w", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("etcd %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("etcd %s: %s: %s", path, resp.Status, strings.TrimSpace(string(data)))
	}
	// The keepalive answer is one streamed message: {"result":{...}}.
	if i := bytes.IndexByte(data, '\n'); i > 0 {
		data = data[:i]
	}
	return json.Unmarshal(data, out)
}

// Register grants a lease and puts the key under it.
func (r *Registration) Register(ctx context.Context) error {
	var grant struct {
		ID    string `json:"ID"`
		Error string `json:"error"`
	}
	if err := r.call(ctx, "/v3/lease/grant", map[string]interface{}{"TTL": TTLSeconds(r.TTL)}, &grant); err != nil {
		return err
	}
	if grant.ID == "" {
		return fmt.Errorf("etcd lease grant: no lease ID (%s)", grant.Error)
	}
	put := map[string]interface{}{
		"key":   base64.StdEncoding.EncodeToString([]byte(r.Key)),
		"value": base64.StdEncoding.EncodeToString([]byte(r.Value)),
		"lease": grant.ID,
	}
	var ok map[string]interface{}
	if err := r.call(ctx, "/v3/kv/put", put, &ok); err != nil {
		return err
	}
	r.lease = grant.ID
	return nil
}

// KeepAlive renews the lease once; false when etcd says it has expired.
func (r *Registration) KeepAlive(ctx context.Context) (bool, error) {
	var ka struct {
		Result struct {
			TTL string `json:"TTL"`
		} `json:"result"`
	}
	if err := r.call(ctx, "/v3/lease/keepalive", map[string]string{"ID": r.lease}, &ka); err != nil {
		return true, err
	}
	ttl, _ := strconv.ParseInt(ka.Result.TTL, 10, 64)
	return ttl > 0, nil
}

// Revoke deletes the key now (a clean stop need not wait for the TTL).
func (r *Registration) Revoke(ctx context.Context) error {
	var ok map[string]interface{}
	return r.call(ctx, "/v3/lease/revoke", map[string]string{"ID": r.lease}, &ok)
}

// KeepRenewing renews the lease every TTL/3 until ctx ends; an expired
// lease (etcd was down longer than the TTL) is registered again.
func (r *Registration) KeepRenewing(ctx context.Context, logf func(string, ...interface{})) {
	tick := time.NewTicker(time.Duration(TTLSeconds(r.TTL)) * time.Second / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		alive, err := r.KeepAlive(ctx)
		switch {
		case err != nil:
			logf("keepalive: %v", err)
		case !alive:
			logf("lease expired; registering again")
			if err := r.Register(ctx); err != nil {
				logf("register: %v", err)
			}
		}
	}
}
