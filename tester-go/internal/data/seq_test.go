package data

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

func TestMixIsInvertible(t *testing.T) {
	for _, x := range []uint64{0, 1, 2, 0xff, 1 << 40, salt, ^uint64(0), 0x123456789abcdef} {
		if got := unmix(mix(x)); got != x {
			t.Errorf("unmix(mix(%#x)) = %#x", x, got)
		}
	}
	tests := []struct{ tag, k uint64 }{{0, 0}, {1, 0}, {0, 1}, {tagMask, wordMask}, {7, 12345}, {1 << TagBits, 3}}
	for _, tt := range tests {
		tag, k := Unword(Word(tt.tag, tt.k))
		if tag != tt.tag&tagMask || k != tt.k {
			t.Errorf("Unword(Word(%d, %d)) = %d, %d", tt.tag, tt.k, tag, k)
		}
	}
	if Word(0, 0) == 0 {
		t.Error("word 0 of tag 0 is zero")
	}
}

func TestSeqReadMatchesFillAtAnyOffset(t *testing.T) {
	const n = 4099
	want, _ := io.ReadAll(NewSeq(5, n))
	if len(want) != n {
		t.Fatalf("len = %d, want %d", len(want), n)
	}
	for _, chunk := range []int{1, 3, 8, 13, 4096} {
		s := NewSeq(5, n)
		var got bytes.Buffer
		buf := make([]byte, chunk)
		for {
			k, err := s.Read(buf)
			got.Write(buf[:k])
			if err == io.EOF {
				break
			}
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("chunk=%d: stream differs", chunk)
		}
	}
	for _, off := range []int64{0, 1, 7, 8, 9, 1000, 4000} {
		for _, l := range []int{0, 1, 5, 8, 17, 99} {
			if off+int64(l) > n {
				continue
			}
			p := make([]byte, l)
			Fill(5, off, p)
			if !bytes.Equal(p, want[off:off+int64(l)]) {
				t.Errorf("Fill(5, %d, %d bytes) differs from the stream", off, l)
			}
		}
	}
	other := make([]byte, n)
	Fill(6, 0, other)
	if bytes.Equal(other, want) {
		t.Fatal("tags 5 and 6 gave equal data")
	}
}

// received builds what a receiver of stream tag (size bytes) gets when a
// proxy applies f to it.
func received(tag uint64, size int64, f func(b []byte) []byte) []byte {
	b := make([]byte, size)
	Fill(tag, 0, b)
	return f(b)
}

func TestVerifierNamesTheFault(t *testing.T) {
	const tag, size = 3, 300_000
	seg := func(tag uint64, off int64, n int) []byte {
		p := make([]byte, n)
		Fill(tag, off, p)
		return p
	}
	tests := []struct {
		name     string
		size     int64 // expected size (default size)
		f        func([]byte) []byte
		offset   int64 // first bad offset (-1: none)
		source   string
		from     int64 // FromOffset - Offset
		fromTag  uint64
		minDiff  int64
		contains string
	}{
		{"intact", 0, func(b []byte) []byte { return b }, -1, "", 0, 0, 0, ""},
		{"replay 130966 back, exact count", 0, func(b []byte) []byte {
			copy(b[200_001:200_001+65_483], b[200_001-130_966:])
			return b
		}, 200_001, SourceReplay, -130_966, tag, 65_000, "byte count exact (300000), but content out of sequence at offset 200001"},
		{"segment duplicated, exact count", 0, func(b []byte) []byte {
			copy(b[131_072:131_072+65_483], b[131_072-65_483:])
			return b
		}, 131_072, SourceReplay, -65_483, tag, 65_000, "replay of offset 65589 (65483 bytes earlier)"},
		{"segment dropped, padded with zeros", 0, func(b []byte) []byte {
			return append(append(b[:100_000:100_000], b[122_736:]...), make([]byte, 22_736)...)
		}, 100_000, SourceAhead, 22_736, tag, 190_000, "bytes of offset 122736, 22736 bytes ahead (a segment is missing)"},
		{"segment dropped, short", 0, func(b []byte) []byte {
			return append(b[:100_000:100_000], b[122_736:]...)
		}, 100_000, SourceAhead, 22_736, tag, 150_000, "got 277264 of 300000 bytes, and content out of sequence at offset 100000"},
		{"one byte flipped", 0, func(b []byte) []byte { b[1000] ^= 0x55; return b }, 1000, SourceUnknown, 0, 0, 1, "bytes of no stream offset (corrupted); 1 byte differs in all"},
		{"another stream's bytes", 0, func(b []byte) []byte {
			copy(b[7000:7100], seg(99, 5000, 100))
			return b
		}, 7000, SourceForeign, 5000 - 7000, 99, 90, "bytes of another stream (tag 99, offset 5000)"},
		{"zeros", 0, func(b []byte) []byte { copy(b[50_000:50_100], make([]byte, 100)); return b }, 50_000, SourceZeros, 0, 0, 90, ": zero bytes"},
		{"tail replayed, short evidence", 1000, func(b []byte) []byte { copy(b[988:1000], b[500:]); return b[:1000] }, 988, SourceReplay, -488, tag, 8, "replay of offset 500 (488 bytes earlier)"},
		{"truncated", 0, func(b []byte) []byte { return b[:size-10] }, -1, "", 0, 0, 0, "got 299990 of 300000 bytes, all in sequence"},
		{"extra bytes in sequence", 0, func(b []byte) []byte { return append(b, seg(tag, size, 10)...) }, -1, "", 0, 0, 0, "got 300010 of 300000 bytes, all in sequence"},
	}
	for _, tt := range tests {
		for _, chunk := range []int{1, 7, 4096, 1 << 20} {
			if chunk == 1 && tt.offset < 0 {
				continue // slow and proves nothing new
			}
			want := tt.size
			if want == 0 {
				want = size
			}
			got := received(tag, size, tt.f)
			v := NewVerifier(tag)
			for p := got; len(p) > 0; {
				k := chunk
				if k > len(p) {
					k = len(p)
				}
				v.Write(p[:k])
				p = p[k:]
			}
			err := v.Check(want)
			m := v.Mismatch()
			switch {
			case tt.contains == "" && err != nil:
				t.Errorf("%s/%d: Check = %v, want nil", tt.name, chunk, err)
			case tt.contains != "" && (err == nil || !strings.Contains(err.Error(), tt.contains)):
				t.Errorf("%s/%d: Check = %v, want it to contain %q", tt.name, chunk, err, tt.contains)
			}
			if tt.offset < 0 {
				if m != nil || !v.OK() {
					t.Errorf("%s/%d: mismatch %v, want none", tt.name, chunk, m)
				}
				continue
			}
			if m == nil {
				t.Errorf("%s/%d: no mismatch", tt.name, chunk)
				continue
			}
			if m.Offset != tt.offset || m.Source != tt.source || m.Differ < tt.minDiff ||
				(tt.source != SourceUnknown && tt.source != SourceZeros && (m.FromOffset-m.Offset != tt.from || m.FromTag != tt.fromTag)) {
				t.Errorf("%s/%d: %+v", tt.name, chunk, m)
			}
			if len(m.Got) == 0 || len(m.Want) != len(m.Got) || bytes.Equal(m.Want, m.Got) {
				t.Errorf("%s/%d: want %x got %x", tt.name, chunk, m.Want, m.Got)
			}
		}
	}
}
