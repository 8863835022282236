package data

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
)

// Sequence-numbered streams.
//
// Every byte of a Seq stream is a function of (tag, offset): the 8-byte
// little-endian word at offset 8k is mix(tag<<40 | k), where mix is an
// invertible 64-bit mixer. The bytes look random, yet any 8 aligned bytes
// say which stream and which offset they were generated for. So a receiver
// compares content by position (a replayed or duplicated segment mismatches
// where it lands, even when the byte count is exact), and at the first
// mismatch decodes the bytes it found: "replay of offset N", "from offset N
// ahead" (a segment went missing), "another stream's bytes", or none of
// these (corrupted).
const (
	// TagBits is how many low bits of a tag are encoded in every word;
	// streams whose tags differ in these bits are told apart.
	TagBits = 24
	// WordBits is how many bits count words: a stream can be 8 TiB long.
	WordBits = 64 - TagBits
	tagMask  = 1<<TagBits - 1
	wordMask = 1<<WordBits - 1
	// salt keeps word 0 of tag 0 from being all zeros.
	salt = 0x9E3779B97F4A7C15
	mixA = 0xff51afd7ed558ccd
	mixB = 0xc4ceb9fe1a85ec53
)

var invA, invB = inverse(mixA), inverse(mixB)

// inverse returns the multiplicative inverse of odd a modulo 2^64 (Newton).
func inverse(a uint64) uint64 {
	x := a // correct to 3 bits for odd a; each step doubles the bits
	for i := 0; i < 5; i++ {
		x *= 2 - a*x
	}
	return x
}

// mix is murmur3's fmix64 finaliser, a bijection on uint64.
func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= mixA
	x ^= x >> 33
	x *= mixB
	x ^= x >> 33
	return x
}

func unmix(x uint64) uint64 {
	x ^= x >> 33
	x *= invB
	x ^= x >> 33
	x *= invA
	x ^= x >> 33
	return x
}

// Word returns the word at byte offset 8k of stream tag.
func Word(tag, k uint64) uint64 {
	return mix(((tag&tagMask)<<WordBits | k&wordMask) ^ salt)
}

// Unword decodes a word into the stream tag and word index it was made for.
func Unword(w uint64) (tag, k uint64) {
	x := unmix(w) ^ salt
	return x >> WordBits, x & wordMask
}

// Fill writes the bytes of stream tag at offsets [off, off+len(p)) into p.
func Fill(tag uint64, off int64, p []byte) {
	var w [8]byte
	k := uint64(off) / 8
	if r := int(off % 8); r != 0 {
		binary.LittleEndian.PutUint64(w[:], Word(tag, k))
		n := copy(p, w[r:])
		p = p[n:]
		k++
	}
	for len(p) >= 8 {
		binary.LittleEndian.PutUint64(p, Word(tag, k))
		p = p[8:]
		k++
	}
	if len(p) > 0 {
		binary.LittleEndian.PutUint64(w[:], Word(tag, k))
		copy(p, w[:])
	}
}

// Seq is an io.Reader yielding the first N bytes of stream tag.
type Seq struct {
	tag      uint64
	off, end int64
}

// NewSeq returns the first n bytes of stream tag.
func NewSeq(tag uint64, n int64) *Seq { return &Seq{tag: tag, end: n} }

// Read implements io.Reader.
func (s *Seq) Read(p []byte) (int, error) {
	if s.off >= s.end {
		return 0, io.EOF
	}
	if int64(len(p)) > s.end-s.off {
		p = p[:s.end-s.off]
	}
	Fill(s.tag, s.off, p)
	s.off += int64(len(p))
	return len(p), nil
}

// Where the bytes found at a mismatch come from.
const (
	SourceUnknown = ""        // no offset of any stream: corrupted
	SourceZeros   = "zeros"   // zero bytes (padding?)
	SourceReplay  = "replay"  // an earlier offset of the same stream
	SourceAhead   = "ahead"   // a later offset of the same stream: bytes in between are missing
	SourceForeign = "foreign" // another stream (another connection's data)
)

// Evidence is how many bytes from the first mismatch are kept to report
// and decode.
const Evidence = 64

// Mismatch describes the first byte where a received stream differs from
// its sequence.
type Mismatch struct {
	Tag        uint64 `json:"tag"`
	Offset     int64  `json:"offset"` // first differing byte
	Want       []byte `json:"want"`   // expected bytes from Offset, as many as Got
	Got        []byte `json:"got"`    // received bytes from Offset (up to 8)
	Source     string `json:"source"` // one of the Source constants
	FromTag    uint64 `json:"from_tag,omitempty"`
	FromOffset int64  `json:"from_offset,omitempty"` // where Got was generated
	Differ     int64  `json:"differ"`                // differing bytes in the whole stream
}

// String says where the stream went wrong and what was found there.
func (m *Mismatch) String() string {
	s := fmt.Sprintf("content out of sequence at offset %d: want %s, got %s", m.Offset,
		hex.EncodeToString(m.Want), hex.EncodeToString(m.Got))
	switch m.Source {
	case SourceReplay:
		s += fmt.Sprintf(": replay of offset %d (%d bytes earlier)", m.FromOffset, m.Offset-m.FromOffset)
	case SourceAhead:
		s += fmt.Sprintf(": bytes of offset %d, %d bytes ahead (a segment is missing)", m.FromOffset, m.FromOffset-m.Offset)
	case SourceForeign:
		s += fmt.Sprintf(": bytes of another stream (tag %d, offset %d)", m.FromTag, m.FromOffset)
	case SourceZeros:
		s += ": zero bytes"
	default:
		s += ": bytes of no stream offset (corrupted)"
	}
	if m.Differ == 1 {
		return s + "; 1 byte differs in all"
	}
	return s + fmt.Sprintf("; %d bytes differ in all", m.Differ)
}

// Diagnose fills m's Source, FromTag and FromOffset from found, the bytes
// received from m.Offset on (Evidence of them at most are used). A source
// is reported only when the found bytes match it for at least one whole
// decoded word plus the bytes before it and the next word, or up to the end
// of found if that comes first (then the decoded tag must be m.Tag).
func (m *Mismatch) Diagnose(found []byte) {
	if len(found) > Evidence {
		found = found[:Evidence]
	}
	m.Source = SourceUnknown
	if len(found) > 0 && allZero(found) {
		m.Source = SourceZeros
		return
	}
	var scratch [Evidence]byte
	for s := 0; s+8 <= len(found) && s < 8; s++ {
		tag, k := Unword(binary.LittleEndian.Uint64(found[s:]))
		origin := int64(k)*8 - int64(s)
		if origin < 0 || (tag == m.Tag&tagMask && origin == m.Offset) {
			continue
		}
		n := s + 16
		if n > len(found) {
			if tag != m.Tag&tagMask {
				continue
			}
			n = len(found)
		}
		Fill(tag, origin, scratch[:n])
		if !bytes.Equal(scratch[:n], found[:n]) {
			continue
		}
		m.FromTag, m.FromOffset = tag, origin
		switch {
		case tag != m.Tag&tagMask:
			m.Source = SourceForeign
		case origin < m.Offset:
			m.Source = SourceReplay
		default:
			m.Source = SourceAhead
		}
		return
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Verifier is an io.Writer that checks a received stream against stream
// tag from offset 0, byte by byte. It never returns an error; ask Err or
// Mismatch when the stream has ended.
type Verifier struct {
	tag    uint64
	n      int64
	differ int64
	first  *Mismatch
	found  []byte // received bytes from the first mismatch, up to Evidence
	done   bool   // first has been diagnosed
	want   []byte
}

// NewVerifier checks a stream against stream tag.
func NewVerifier(tag uint64) *Verifier { return &Verifier{tag: tag} }

// Write implements io.Writer.
func (v *Verifier) Write(p []byte) (int, error) {
	if v.first != nil && len(v.found) < Evidence {
		k := Evidence - len(v.found)
		if k > len(p) {
			k = len(p)
		}
		v.found = append(v.found, p[:k]...)
		v.done = false
	}
	if cap(v.want) < len(p) {
		v.want = make([]byte, len(p))
	}
	want := v.want[:len(p)]
	Fill(v.tag, v.n, want)
	if !bytes.Equal(want, p) {
		for i := range p {
			if p[i] == want[i] {
				continue
			}
			v.differ++
			if v.first == nil {
				v.first = &Mismatch{Tag: v.tag, Offset: v.n + int64(i)}
				v.found = append([]byte(nil), p[i:min(i+Evidence, len(p))]...)
			}
		}
	}
	v.n += int64(len(p))
	return len(p), nil
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

// N returns the bytes written so far.
func (v *Verifier) N() int64 { return v.n }

// OK reports whether every byte so far was in sequence.
func (v *Verifier) OK() bool { return v.first == nil }

// Mismatch returns the first mismatch, diagnosed, or nil.
func (v *Verifier) Mismatch() *Mismatch {
	if v.first == nil {
		return nil
	}
	if !v.done {
		m := v.first
		m.Got = append([]byte(nil), v.found[:min(8, len(v.found))]...)
		m.Want = make([]byte, len(m.Got))
		Fill(v.tag, m.Offset, m.Want)
		m.Diagnose(v.found)
		v.done = true
	}
	m := *v.first
	m.Differ = v.differ
	return &m
}

// Check returns nil if exactly size bytes arrived, all in sequence;
// otherwise an error naming the count and the first mismatch.
func (v *Verifier) Check(size int64) error {
	m := v.Mismatch()
	switch {
	case v.n != size && m != nil:
		return fmt.Errorf("got %d of %d bytes, and %s", v.n, size, m)
	case v.n != size:
		return fmt.Errorf("got %d of %d bytes, all in sequence", v.n, size)
	case m != nil:
		return fmt.Errorf("byte count exact (%d), but %s", size, m)
	}
	return nil
}
