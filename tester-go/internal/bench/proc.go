package bench

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// clkTck is sysconf(_SC_CLK_TCK); 100 on Linux.
const clkTck = 100

// SysCPU is a /proc/stat sample in seconds.
type SysCPU struct {
	Busy, Total float64
}

// ReadSysCPU parses the aggregate "cpu" line of /proc/stat:
// busy = total - idle - iowait.
func ReadSysCPU() (SysCPU, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return SysCPU{}, err
	}
	return parseProcStat(string(b))
}

func parseProcStat(s string) (SysCPU, error) {
	line, _, _ := strings.Cut(s, "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return SysCPU{}, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var total, idle float64
	for i, x := range f[1:] {
		v, err := strconv.ParseFloat(x, 64)
		if err != nil {
			return SysCPU{}, fmt.Errorf("/proc/stat: %v", err)
		}
		if i >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		total += v
		if i == 3 || i == 4 { // idle, iowait
			idle += v
		}
	}
	return SysCPU{Busy: (total - idle) / clkTck, Total: total / clkTck}, nil
}

// ReadProcCPU returns utime+stime of pid in seconds.
func ReadProcCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parsePidStat(string(b))
}

func parsePidStat(s string) (float64, error) {
	// comm (field 2) may contain spaces and parentheses: split after the last ')'.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat: no ')' in %q", s)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("stat: too few fields")
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("stat: bad utime/stime %q %q", f[11], f[12])
	}
	return (u + st) / clkTck, nil
}

// ReadRSSKiB returns VmRSS of pid in KiB.
func ReadRSSKiB(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return parseVmRSS(bufio.NewScanner(f))
}

func parseVmRSS(sc *bufio.Scanner) (int64, error) {
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(strings.TrimPrefix(line, "VmRSS:"))
			if len(f) >= 1 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("status: no VmRSS line")
}

// proxyCPU is the utime+stime of the proxy's processes, in seconds.
func (o Options) proxyCPU() (float64, error) {
	var sum float64
	for _, pid := range append([]int{o.ProxyPID}, o.MorePIDs...) {
		v, err := ReadProcCPU(pid)
		if err != nil {
			return 0, err
		}
		sum += v
	}
	return sum, nil
}
