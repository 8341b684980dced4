//go:build !unix

package main

import "os"

// umask is the usual default where there is none.
func umask() os.FileMode { return 0o022 }
