package tcpinfo

import (
	"io"
	"net"
	"testing"
)

// A FIN counts one in BytesReceived; a reset counts nothing and leaves the
// connection in Close.
func TestFinAndReset(t *testing.T) {
	tests := []struct {
		name      string
		reset     bool
		wantExtra uint64
	}{
		{"fin", false, 1},
		{"reset", true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			s.Write([]byte("hello"))
			if tt.reset {
				s.(*net.TCPConn).SetLinger(0)
			}
			s.Close()
			got, _ := io.ReadAll(c)
			info, err := Of(c.(*net.TCPConn))
			if err != nil {
				t.Fatal(err)
			}
			if info.BytesReceived != uint64(len(got))+tt.wantExtra {
				t.Errorf("read %d bytes, BytesReceived %d, want %d more", len(got), info.BytesReceived, tt.wantExtra)
			}
			if tt.reset && info.State != Close {
				t.Errorf("state %d after a reset, want %d", info.State, Close)
			}
		})
	}
}
