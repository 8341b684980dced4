package main

import (
	"os"
	"syscall"
)

// fSetPipeSz is F_SETPIPE_SZ (fcntl.h); the syscall package lacks it.
const fSetPipeSz = 1031

// growPipe asks Linux for a 1 MiB pipe buffer when rw is a pipe (the
// default is 64 KiB): each read and write then moves up to 1 MiB, which
// divides the system calls and context switches of a shell pipeline by
// up to 16. Best effort: the limit is /proc/sys/fs/pipe-max-size.
func growPipe(rw any) {
	f, ok := rw.(*os.File)
	if !ok {
		return
	}
	fi, err := f.Stat()
	if err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		return
	}
	_, _, _ = syscall.Syscall(syscall.SYS_FCNTL, f.Fd(), fSetPipeSz, 1<<20)
}
