//go:build unix

package main

import (
	"os"
	"syscall"
)

// umask reads the process's umask (setting it back at once, before any
// other goroutine creates files), for the mode of encrypt's output file.
func umask() os.FileMode {
	m := syscall.Umask(0o022)
	syscall.Umask(m)
	return os.FileMode(m)
}
