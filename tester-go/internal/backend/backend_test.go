package backend

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"tester-go/internal/data"
)

func start(t *testing.T, o Options, labels ...string) (*Server, string) {
	t.Helper()
	var lb []string
	if len(labels) > 0 {
		lb = labels
	}
	s, err := Listen([]string{"127.0.0.1:0"}, lb, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, s.Addrs()[0]
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// sendAndHalfClose writes payload concurrently with reading, half-closes and
// returns everything read until EOF.
func sendAndHalfClose(t *testing.T, c *net.TCPConn, payload []byte) ([]byte, error) {
	t.Helper()
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(c)
	if e := <-werr; e != nil && err == nil {
		err = e
	}
	return got, err
}

func TestIdentifyHalfClose(t *testing.T) {
	_, addr := start(t, Options{Kind: Identify}, "example:1")
	for _, size := range []int{0, 1, 100000, 3 << 20} {
		c := dial(t, addr)
		payload := data.Block(uint64(size), size)
		got, err := sendAndHalfClose(t, c, payload)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		want := append([]byte("TARGET example:1\n"), payload...)
		if !bytes.Equal(got, want) {
			t.Fatalf("size %d: got %d bytes, want %d", size, len(got), len(want))
		}
	}
}

func TestIdentifyKeepsEchoingUntilEOF(t *testing.T) {
	_, addr := start(t, Options{Kind: Identify})
	c := dial(t, addr)
	r := bufio.NewReader(c)
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "TARGET ") {
		t.Fatalf("banner %q %v", line, err)
	}
	for i := 0; i < 3; i++ {
		msg := fmt.Sprintf("round %d\n", i)
		c.Write([]byte(msg))
		got, err := r.ReadString('\n')
		if err != nil || got != msg {
			t.Fatalf("got %q %v", got, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestSinkSHA(t *testing.T) {
	_, addr := start(t, Options{Kind: Sink})
	for _, size := range []int64{0, 1, 1 << 20} {
		c := dial(t, addr)
		got, err := sendAndHalfClose(t, c, data.Block(3, int(size)))
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("SINK %d %s\n", size, data.Sum(3, size))
		if string(got) != want {
			t.Fatalf("got %q want %q", got, want)
		}
	}
}

func TestSource(t *testing.T) {
	_, addr := start(t, Options{Kind: Source, SourceBytes: 777777})
	c := dial(t, addr)
	cnt := data.NewCounter()
	if _, err := io.Copy(cnt, c); err != nil {
		t.Fatal(err)
	}
	if cnt.N != 777777 || cnt.Hex() != data.Sum(SourceSeed, 777777) {
		t.Fatalf("got %d bytes %s", cnt.N, cnt.Hex())
	}
}

func TestBenchProtocol(t *testing.T) {
	_, addr := start(t, Options{Kind: Bench})
	tests := []struct {
		name  string
		send  []byte
		check func([]byte) error
	}{
		{"sink", append([]byte{'S'}, make([]byte, 100000)...), func(b []byte) error {
			if len(b) != 8 || binary.BigEndian.Uint64(b) != 100000 {
				return fmt.Errorf("reply %x", b)
			}
			return nil
		}},
		{"echo", []byte("Ehello"), func(b []byte) error {
			if string(b) != "hello" {
				return fmt.Errorf("reply %q", b)
			}
			return nil
		}},
		{"source", []byte{'R', 0, 0, 0, 0, 0, 0x10, 0, 1}, func(b []byte) error {
			if len(b) != 0x100001 {
				return fmt.Errorf("got %d bytes", len(b))
			}
			return nil
		}},
		{"pingpong", append([]byte{'P'}, bytes.Repeat([]byte("x"), 2*PingSize)...), func(b []byte) error {
			if len(b) != 2*PingSize {
				return fmt.Errorf("got %d bytes", len(b))
			}
			return nil
		}},
		{"idle", []byte("Iab"), func(b []byte) error {
			if string(b) != "ab" {
				return fmt.Errorf("reply %q", b)
			}
			return nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := sendAndHalfClose(t, dial(t, addr), tt.send)
			if err != nil {
				t.Fatal(err)
			}
			if err := tt.check(got); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestFaults(t *testing.T) {
	tests := []struct {
		name    string
		o       Options
		payload int
		maxGot  int // at most this many echoed bytes, then EOF or reset
	}{
		{"accept-close", Options{Kind: Echo, Fault: FaultAcceptClose}, 1000, 0},
		{"accept-rst", Options{Kind: Echo, Fault: FaultAcceptRST}, 1000, 0},
		{"die-after", Options{Kind: Echo, DieAfter: 50000}, 1 << 20, 50000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, addr := start(t, tt.o)
			nc, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				return // reset during the handshake is an acceptable outcome
			}
			c := nc.(*net.TCPConn)
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			got, err := sendAndHalfClose(t, c, make([]byte, tt.payload))
			// EOF or a reset ends it; a fault that left the connection
			// hanging shows as the deadline.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the fault did not end the connection: %v", err)
			}
			if len(got) > tt.maxGot {
				t.Fatalf("got %d bytes, want at most %d", len(got), tt.maxGot)
			}
		})
	}
}

func TestStallAndReadRate(t *testing.T) {
	_, addr := start(t, Options{Kind: Echo, StallAfter: 1000})
	c := dial(t, addr)
	c.SetDeadline(time.Now().Add(300 * time.Millisecond))
	c.Write(make([]byte, 5000))
	got, err := io.ReadAll(c)
	if len(got) != 1000 {
		t.Fatalf("stall: got %d bytes (%v), want 1000 then a timeout", len(got), err)
	}
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("stall: want timeout, got %v", err)
	}

	_, addr = start(t, Options{Kind: Echo, ReadRate: 200000})
	c = dial(t, addr)
	t0 := time.Now()
	got, err = sendAndHalfClose(t, c, make([]byte, 60000))
	if err != nil || len(got) != 60000 {
		t.Fatalf("rate: %d bytes %v", len(got), err)
	}
	if el := time.Since(t0); el < 200*time.Millisecond {
		t.Fatalf("rate: 60000 bytes at 200000 B/s took only %v", el)
	}
}

// TestEchoReadsWhileWriteWaits: a client that writes far more than the
// socket buffers hold before it reads anything back must be able to. An
// echo that stops reading while its write waits would block that write
// (and can wedge for good on Linux 6.18; see echo).
func TestEchoReadsWhileWriteWaits(t *testing.T) {
	_, addr := start(t, Options{Kind: Echo})
	c := dial(t, addr)
	const n = 128 << 20
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(i / 4099)
	}
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("writing %d bytes before reading any: %v", n, err)
	}
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo: %d of %d bytes back (%v), equal %v", len(got), n, err, bytes.Equal(got, payload))
	}
}
