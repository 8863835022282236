package bench

import (
	"math"
	"testing"
	"time"
)

func TestBucketRoundTrip(t *testing.T) {
	for _, v := range []uint64{0, 1, 127, 128, 129, 255, 256, 1000, 123456, 1 << 40, math.MaxUint64 >> 1} {
		mid := bucketMid(bucketOf(v))
		if err := math.Abs(float64(mid)-float64(v)) / math.Max(1, float64(v)); err > 0.01 {
			t.Errorf("v=%d mid=%d rel err %.4f", v, mid, err)
		}
	}
	prev := -1
	for v := uint64(0); v < 1<<16; v++ {
		b := bucketOf(v)
		if b < prev {
			t.Fatalf("bucketOf not monotonic at %d", v)
		}
		prev = b
	}
}

func TestQuantiles(t *testing.T) {
	tests := []struct {
		name   string
		values []time.Duration
		q      float64
		want   time.Duration
	}{
		{"single", []time.Duration{5 * time.Microsecond}, 0.5, 5 * time.Microsecond},
		{"p50 of 1..1000us", seq(1000), 0.5, 500 * time.Microsecond},
		{"p90 of 1..1000us", seq(1000), 0.9, 900 * time.Microsecond},
		{"p99 of 1..1000us", seq(1000), 0.99, 990 * time.Microsecond},
		{"p99.9 of 1..1000us", seq(1000), 0.999, 999 * time.Microsecond},
		{"p100", seq(1000), 1, 1000 * time.Microsecond},
		{"outlier", append(repeat(10*time.Microsecond, 999), time.Second), 0.999, 10 * time.Microsecond},
		{"outlier max", append(repeat(10*time.Microsecond, 999), time.Second), 1, time.Second},
	}
	for _, tt := range tests {
		var h Histogram
		for _, v := range tt.values {
			h.Record(v)
		}
		got := h.Quantile(tt.q)
		if rel := math.Abs(float64(got-tt.want)) / float64(tt.want); rel > 0.01 {
			t.Errorf("%s: q%.3f = %v, want %v (±1%%)", tt.name, tt.q, got, tt.want)
		}
	}
}

func TestMergeAndSummary(t *testing.T) {
	var a, b Histogram
	for _, v := range seq(500) {
		a.Record(v)
	}
	for _, v := range seq(1000)[500:] {
		b.Record(v)
	}
	a.Merge(&b)
	s := a.Summary()
	if s.Count != 1000 || math.Abs(s.P50US-500) > 5 || math.Abs(s.MeanUS-500.5) > 0.01 || s.MaxUS != 1000 {
		t.Fatalf("summary %+v", s)
	}
	var empty Histogram
	if e := empty.Summary(); e.Count != 0 || e.P99US != 0 {
		t.Fatalf("empty summary %+v", e)
	}
}

func seq(n int) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = time.Duration(i+1) * time.Microsecond
	}
	return out
}

func repeat(d time.Duration, n int) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = d
	}
	return out
}
