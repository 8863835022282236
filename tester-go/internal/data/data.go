// Package data produces deterministic byte streams: sequence-numbered
// streams (Seq) whose every byte is a function of (tag, offset), with a
// Verifier that checks received bytes by position and names replays and
// losses; pseudorandom streams (Stream) for the source backend and bench
// blocks; and helpers to hash and count them.
package data

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash"
	"io"
)

// Stream is an io.Reader yielding N deterministic pseudorandom bytes
// (xorshift64*) for a seed, then io.EOF. Equal seeds give equal bytes.
type Stream struct {
	state  uint64
	remain int64
	buf    [8]byte
	bufN   int
}

// NewStream returns a Stream of n bytes for seed.
func NewStream(seed uint64, n int64) *Stream {
	s := seed*0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D
	if s == 0 {
		s = 1
	}
	return &Stream{state: s, remain: n}
}

func (s *Stream) next() uint64 {
	x := s.state
	x ^= x >> 12
	x ^= x << 25
	x ^= x >> 27
	s.state = x
	return x * 0x2545F4914F6CDD1D
}

// Read fills p.
func (s *Stream) Read(p []byte) (int, error) {
	if s.remain <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > s.remain {
		p = p[:s.remain]
	}
	n := 0
	for n < len(p) && s.bufN > 0 {
		p[n] = s.buf[8-s.bufN]
		s.bufN--
		n++
	}
	for ; n+8 <= len(p); n += 8 {
		binary.LittleEndian.PutUint64(p[n:], s.next())
	}
	if n < len(p) {
		binary.LittleEndian.PutUint64(s.buf[:], s.next())
		s.bufN = 8
		for n < len(p) {
			p[n] = s.buf[8-s.bufN]
			s.bufN--
			n++
		}
	}
	s.remain -= int64(n)
	return n, nil
}

// Sum returns the SHA-256 (hex) of the n-byte stream for seed.
func Sum(seed uint64, n int64) string {
	h := sha256.New()
	buf := make([]byte, 256<<10)
	_, _ = io.CopyBuffer(h, NewStream(seed, n), buf)
	return hex.EncodeToString(h.Sum(nil))
}

// Counter is an io.Writer that counts and hashes what passes through it.
type Counter struct {
	N int64
	H hash.Hash
}

// NewCounter returns a Counter with a SHA-256 hash.
func NewCounter() *Counter { return &Counter{H: sha256.New()} }

// Write implements io.Writer.
func (c *Counter) Write(p []byte) (int, error) {
	c.N += int64(len(p))
	c.H.Write(p)
	return len(p), nil
}

// Hex returns the hex SHA-256 so far.
func (c *Counter) Hex() string { return hex.EncodeToString(c.H.Sum(nil)) }

// Block returns n deterministic pseudorandom bytes (for repeated sends where
// regenerating per write would cost CPU).
func Block(seed uint64, n int) []byte {
	b := make([]byte, n)
	_, _ = io.ReadFull(NewStream(seed, int64(n)), b)
	return b
}
