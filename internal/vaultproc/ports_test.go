package vaultproc

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestReservePorts: concurrent reservations never share a port, including
// the port after each one kept for Vault's cluster listener.
func TestReservePorts(t *testing.T) {
	t.Parallel()
	const workers, each = 8, 10
	got := make(chan []int, workers)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var ports []int
			for j := 0; j < each; j++ {
				p, err := ServerPort()
				if err != nil {
					t.Error(err)
					return
				}
				ports = append(ports, p, p+1)
			}
			got <- ports
		}()
	}
	wg.Wait()
	close(got)
	seen := map[int]bool{}
	for ports := range got {
		for _, p := range ports {
			require.Falsef(t, seen[p], "port %d handed out twice", p)
			seen[p] = true
		}
	}
	require.Len(t, seen, workers*each*2)
	more, err := ReservePorts(4, 1)
	require.NoError(t, err)
	for _, p := range more {
		require.Falsef(t, seen[p], "port %d handed out again", p)
	}
}
