package bench

import (
	"math"
	"math/bits"
	"time"
)

// Histogram is a log-linear latency histogram: exact below 128 ns, then
// 128 sub-buckets per power of two (relative error below 1%). Not safe for
// concurrent use; merge per-goroutine histograms with Merge.
type Histogram struct {
	counts [64 * subBuckets]uint64
	n      uint64
	sum    float64
	max    uint64
}

const subBits = 7
const subBuckets = 1 << subBits

func bucketOf(v uint64) int {
	if v < subBuckets {
		return int(v)
	}
	shift := bits.Len64(v) - subBits - 1
	return subBuckets + shift*subBuckets + int(v>>uint(shift)) - subBuckets
}

// bucketMid returns a representative value of bucket i.
func bucketMid(i int) uint64 {
	if i < subBuckets {
		return uint64(i)
	}
	shift := (i - subBuckets) / subBuckets
	r := uint64((i-subBuckets)%subBuckets + subBuckets)
	lo := r << uint(shift)
	return lo + (uint64(1)<<uint(shift))/2
}

// Record adds one duration.
func (h *Histogram) Record(d time.Duration) {
	v := uint64(0)
	if d > 0 {
		v = uint64(d)
	}
	h.counts[bucketOf(v)]++
	h.n++
	h.sum += float64(v)
	if v > h.max {
		h.max = v
	}
}

// Merge adds o's samples to h.
func (h *Histogram) Merge(o *Histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	if o.max > h.max {
		h.max = o.max
	}
}

// Count returns the number of samples.
func (h *Histogram) Count() uint64 { return h.n }

// Quantile returns the value at quantile q (0..1); the smallest value v
// such that at least q of the samples are <= v (within bucket precision).
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			v := bucketMid(i)
			if v > h.max {
				v = h.max
			}
			return time.Duration(v)
		}
	}
	return time.Duration(h.max)
}

// Latency is a percentile summary in microseconds.
type Latency struct {
	Count  uint64  `json:"count"`
	MeanUS float64 `json:"mean_us"`
	P50US  float64 `json:"p50_us"`
	P90US  float64 `json:"p90_us"`
	P99US  float64 `json:"p99_us"`
	P999US float64 `json:"p99_9_us"`
	MaxUS  float64 `json:"max_us"`
}

// Summary returns the percentile summary.
func (h *Histogram) Summary() *Latency {
	us := func(d time.Duration) float64 { return float64(d) / 1e3 }
	l := &Latency{Count: h.n, P50US: us(h.Quantile(0.5)), P90US: us(h.Quantile(0.9)),
		P99US: us(h.Quantile(0.99)), P999US: us(h.Quantile(0.999)), MaxUS: float64(h.max) / 1e3}
	if h.n > 0 {
		l.MeanUS = h.sum / float64(h.n) / 1e3
	}
	return l
}
