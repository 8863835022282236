package brokenproxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"tester-go/internal/backend"
	"tester-go/internal/data"
)

// TestRewritesKeepTheByteCount sends a stream through each rewriting
// variant to an echo backend and checks that exactly the advertised bytes
// come back: same count, content changed only where the variant says.
func TestRewritesKeepTheByteCount(t *testing.T) {
	const size = 300_000
	tests := []struct {
		v    Variant
		want func(b []byte) []byte // what the echo must be, given what was sent
	}{
		{Correct, func(b []byte) []byte { return b }},
		{Corrupt, func(b []byte) []byte { b[CorruptOffset] ^= 0x55; return b }},
		{Replay, func(b []byte) []byte { copy(b[ReplayAt:ReplayAt+ReplayLen], b[ReplayFrom:]); return b }},
		{Duplicate, func(b []byte) []byte { copy(b[DupAt:DupAt+DupLen], b[DupAt-DupLen:]); return b }},
		{DropPad, func(b []byte) []byte {
			return append(append(b[:DropAt:DropAt], b[DropAt+DropLen:]...), make([]byte, DropLen)...)
		}},
	}
	be, err := backend.Listen([]string{"127.0.0.1:0"}, nil, backend.Options{Kind: backend.Echo})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	for _, tt := range tests {
		p, err := Start(tt.v, [][]string{be.Addrs()}, 1)
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p.Ports[0][0]}).String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		sent := make([]byte, size)
		data.Fill(1, 0, sent)
		go func() {
			c.Write(sent)
			c.(*net.TCPConn).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		c.Close()
		p.Close()
		if err != nil {
			t.Fatalf("%s: %v", tt.v, err)
		}
		want := tt.want(append([]byte(nil), sent...))
		if len(got) != size || !bytes.Equal(got, want) {
			t.Errorf("%s: echoed %d bytes, want %d as the variant advertises", tt.v, len(got), size)
		}
		if tt.v != Correct && bytes.Equal(got, sent) {
			t.Errorf("%s: echo is intact, the variant did nothing", tt.v)
		}
	}
}

func TestSpan(t *testing.T) {
	tests := []struct {
		off      int64
		l        int
		start, n int64
		lo, hi   int
		ok       bool
	}{
		{0, 10, 20, 5, 0, 0, false},
		{0, 10, 5, 10, 5, 10, true},
		{10, 10, 5, 10, 0, 5, true},
		{10, 10, 12, 3, 2, 5, true},
		{10, 10, 0, 10, 0, 0, false},
		{10, 10, 20, 1, 0, 0, false},
	}
	for _, tt := range tests {
		lo, hi, ok := span(tt.off, tt.l, tt.start, tt.n)
		if lo != tt.lo || hi != tt.hi || ok != tt.ok {
			t.Errorf("span(%d, %d, %d, %d) = %d, %d, %v; want %d, %d, %v", tt.off, tt.l, tt.start, tt.n, lo, hi, ok, tt.lo, tt.hi, tt.ok)
		}
	}
}
