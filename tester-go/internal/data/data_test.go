package data

import (
	"bytes"
	"io"
	"testing"
)

func TestStreamDeterministicAcrossReadSizes(t *testing.T) {
	for _, n := range []int64{0, 1, 7, 8, 9, 1000, 65537} {
		want, _ := io.ReadAll(NewStream(42, n))
		if int64(len(want)) != n {
			t.Fatalf("len = %d, want %d", len(want), n)
		}
		for _, chunk := range []int{1, 3, 8, 13, 4096} {
			s := NewStream(42, n)
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
				t.Fatalf("n=%d chunk=%d: stream differs", n, chunk)
			}
		}
	}
}

func TestSumMatchesCounter(t *testing.T) {
	c := NewCounter()
	if _, err := io.Copy(c, NewStream(7, 12345)); err != nil {
		t.Fatal(err)
	}
	if c.N != 12345 || c.Hex() != Sum(7, 12345) {
		t.Fatalf("counter %d %s, sum %s", c.N, c.Hex(), Sum(7, 12345))
	}
	if Sum(7, 100) == Sum(8, 100) {
		t.Fatal("different seeds gave equal data")
	}
}
