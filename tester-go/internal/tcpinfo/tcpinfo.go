// Package tcpinfo reads what the kernel knows of a TCP connection
// (getsockopt TCP_INFO, linux/tcp.h), for the checks that must tell a reset
// from a FIN after the error that said so was taken by another syscall.
package tcpinfo

import (
	"encoding/binary"
	"errors"
	"net"
	"syscall"
	"unsafe"
)

// Close is tcpi_state for a connection that is gone (include/net/tcp_states.h).
const Close = 7

// bytesReceivedAt is the offset of tcpi_bytes_received (stable since Linux 4.1).
const bytesReceivedAt = 128

// Info is the part of struct tcp_info the checks use.
type Info struct {
	State byte
	// BytesReceived counts the peer's sequence space received in order:
	// its data, plus one for its FIN.
	BytesReceived uint64
}

// Of reads c's TCP_INFO.
func Of(c *net.TCPConn) (Info, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Info{}, err
	}
	var buf [256]byte
	n := uint32(len(buf))
	var errno syscall.Errno
	if err := raw.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	}); err != nil {
		return Info{}, err
	}
	if errno != 0 {
		return Info{}, errno
	}
	if n < bytesReceivedAt+8 {
		return Info{}, errors.New("tcp_info: the kernel's is too short for tcpi_bytes_received")
	}
	return Info{
		State:         buf[0],
		BytesReceived: binary.LittleEndian.Uint64(buf[bytesReceivedAt:]),
	}, nil
}
