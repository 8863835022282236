package etcdreg

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestKeyAndTTL(t *testing.T) {
	cases := []struct {
		prefix, app, id, want string
	}{
		{"/proxy/", "web", "a", "/proxy/targets/web/a"},
		{"/proxy", "web", "a", "/proxy/targets/web/a"},
	}
	for _, c := range cases {
		if got := Key(c.prefix, c.app, c.id); got != c.want {
			t.Errorf("Key(%q,%q,%q) = %q, want %q", c.prefix, c.app, c.id, got, c.want)
		}
	}
	ttls := []struct {
		d    time.Duration
		want int64
	}{{0, 1}, {500 * time.Millisecond, 1}, {2 * time.Second, 2}, {2100 * time.Millisecond, 3}}
	for _, c := range ttls {
		if got := TTLSeconds(c.d); got != c.want {
			t.Errorf("TTLSeconds(%v) = %d, want %d", c.d, got, c.want)
		}
	}
}

// A fake of etcd's JSON gateway: checks the bodies as etcd 3.4 reads them.
func TestRegisterKeepAliveRevoke(t *testing.T) {
	var put map[string]string
	var revoked string
	expired := false
	mux := http.NewServeMux()
	mux.HandleFunc("/v3/lease/grant", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"ID":"7587","TTL":"2"}`))
	})
	mux.HandleFunc("/v3/kv/put", func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&put)
		w.Write([]byte(`{}`))
	})
	mux.HandleFunc("/v3/lease/keepalive", func(w http.ResponseWriter, r *http.Request) {
		if expired {
			w.Write([]byte(`{"result":{"ID":"7587"}}` + "\n"))
			return
		}
		w.Write([]byte(`{"result":{"ID":"7587","TTL":"2"}}` + "\n"))
	})
	mux.HandleFunc("/v3/lease/revoke", func(w http.ResponseWriter, r *http.Request) {
		var b map[string]string
		json.NewDecoder(r.Body).Decode(&b)
		revoked = b["ID"]
		w.Write([]byte(`{}`))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	r := &Registration{Endpoint: srv.URL, Key: "/p/targets/a/1", Value: "127.0.0.1:9", TTL: 2 * time.Second}
	ctx := context.Background()
	if err := r.Register(ctx); err != nil {
		t.Fatal(err)
	}
	k, _ := base64.StdEncoding.DecodeString(put["key"])
	v, _ := base64.StdEncoding.DecodeString(put["value"])
	if string(k) != r.Key || string(v) != r.Value || put["lease"] != "7587" {
		t.Fatalf("put %v", put)
	}
	for _, c := range []struct {
		expired, alive bool
	}{{false, true}, {true, false}} {
		expired = c.expired
		alive, err := r.KeepAlive(ctx)
		if err != nil || alive != c.alive {
			t.Errorf("expired=%v: alive=%v err=%v", c.expired, alive, err)
		}
	}
	if err := r.Revoke(ctx); err != nil || revoked != "7587" {
		t.Fatalf("revoke: %v %q", err, revoked)
	}
}
