package vaultproc

import (
	"fmt"
	"net"
	"sync"
)

// Ports this process has handed out. None is handed out twice, even after
// its server stopped: a restarted server or a cluster node may still bind
// it, and so may the next server while the old socket lingers.
var (
	portsMu        sync.Mutex
	portsHandedOut = map[int]bool{}
)

// ReservePorts returns n loopback ports, free when asked and never handed
// out before by this process; with span > 1 each also has the span-1 ports
// after it free and reserved (Vault binds its cluster listener on the API
// port + 1). The listeners probing them are held until all are chosen, so
// the kernel does not offer one twice; a server may still lose a port to
// another process before it binds, which StartServer retries.
func ReservePorts(n, span int) ([]int, error) {
	portsMu.Lock()
	defer portsMu.Unlock()
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	var ports []int
	for attempt := 0; len(ports) < n; attempt++ {
		if attempt > 1000 {
			return nil, fmt.Errorf("no %d free loopback ports after %d tries", n, attempt)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		held = append(held, l)
		port := l.Addr().(*net.TCPAddr).Port
		ok := !portsHandedOut[port] && port+span-1 <= 65535
		for next := port + 1; ok && next < port+span; next++ {
			if portsHandedOut[next] {
				ok = false
				break
			}
			nl, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", next))
			if err != nil {
				ok = false
				break
			}
			held = append(held, nl)
		}
		if !ok {
			continue
		}
		for p := port; p < port+span; p++ {
			portsHandedOut[p] = true
		}
		ports = append(ports, port)
	}
	return ports, nil
}

// ServerPort returns a port for a single server's API, with the next one
// free for its cluster listener.
func ServerPort() (int, error) {
	ports, err := ReservePorts(1, 2)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}
