package report

import "testing"

func TestParseBytes(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  bool
	}{
		{"1", 1, false},
		{"1024", 1024, false},
		{"64KiB", 64 << 10, false},
		{"64k", 64 << 10, false},
		{"1MiB", 1 << 20, false},
		{"64M", 64 << 20, false},
		{"1GiB", 1 << 30, false},
		{"1G", 1 << 30, false},
		{"x", 0, true},
		{"-1", 0, true},
		{"1.5M", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseBytes(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseBytes(%q) = %d, %v", tt.in, got, err)
		}
	}
}

func TestBytes(t *testing.T) {
	tests := map[int64]string{1: "1 B", 1024: "1 KiB", 1536: "1.5 KiB", 64 << 20: "64 MiB", 1 << 30: "1 GiB"}
	for n, want := range tests {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}
