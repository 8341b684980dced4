package mountseal

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

func requirePIN(t *testing.T, ref, want string) {
	t.Helper()
	pin, err := resolvePIN(ref)
	require.NoError(t, err, ref)
	require.Equal(t, want, pin, ref)
}

// requireRefused fails unless ref is refused with the one answer that says
// nothing of the plugin's files or environment.
func requireRefused(t *testing.T, ref, says string) {
	t.Helper()
	pin, err := resolvePIN(ref)
	require.Error(t, err, ref)
	require.Empty(t, pin)
	require.Contains(t, err.Error(), "the PIN source "+ref+" is not allowed")
	require.Contains(t, err.Error(), says)
}

func TestPINFromEnvironment(t *testing.T) {
	requirePIN(t, "1234", "1234")

	t.Setenv(PINEnvAllowEnv, "")
	t.Setenv(defaultPINEnv, "4321")
	t.Setenv("OTHER_PIN", "9876")
	requirePIN(t, "env://"+defaultPINEnv, "4321")
	requireRefused(t, "env://OTHER_PIN", "allows environment variables")

	t.Setenv(PINEnvAllowEnv, " OTHER_PIN : : EMPTY_PIN ")
	requirePIN(t, "env://OTHER_PIN", "9876")
	requireRefused(t, "env://"+defaultPINEnv, "allows environment variables")
	t.Setenv("EMPTY_PIN", "")
	requireRefused(t, "env://EMPTY_PIN", "allows environment variables")
	requireRefused(t, "env://", "allows environment variables")
}

func TestPINFromFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
		return p
	}
	pinFile := write("pin", "4321\r\n")
	other := write("other", "5678\n")
	largest := write("largest", strings.Repeat("7", maxPINFileSize))
	tooLarge := write("too-large", strings.Repeat("8", maxPINFileSize+1))
	empty := write("empty", "\n")
	outside := filepath.Join(t.TempDir(), "outside")
	require.NoError(t, os.WriteFile(outside, []byte("1111"), 0o600))
	link := filepath.Join(dir, "link")
	require.NoError(t, os.Symlink(outside, link))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "sub"), 0o700))
	nested := write("sub/nested", "2222")
	fifo := filepath.Join(dir, "fifo")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))

	t.Setenv(PINFilesAllowEnv, "")
	requireRefused(t, "file://"+pinFile, "allows PIN files")

	// One file allowed: that file only.
	t.Setenv(PINFilesAllowEnv, pinFile)
	requirePIN(t, "file://"+pinFile, "4321")
	requirePIN(t, "file://"+dir+"/./pin", "4321")
	requireRefused(t, "file://"+other, "allows PIN files")
	requireRefused(t, "file://pin", "allows PIN files")

	// A directory allowed: the files directly in it.
	t.Setenv(PINFilesAllowEnv, "relative/dir:"+filepath.Join(dir, "missing")+":"+dir)
	requirePIN(t, "file://"+pinFile, "4321")
	requirePIN(t, "file://"+other, "5678")
	requirePIN(t, "file://"+largest, strings.Repeat("7", maxPINFileSize))
	for _, p := range []string{tooLarge, empty, link, nested, fifo, filepath.Join(dir, "absent"), dir} {
		requireRefused(t, "file://"+p, "allows PIN files")
	}

	// A relative entry allows nothing.
	wd, err := os.Getwd()
	require.NoError(t, err)
	t.Chdir(dir)
	t.Setenv(PINFilesAllowEnv, "pin")
	requireRefused(t, "file://"+pinFile, "allows PIN files")
	t.Chdir(wd)

	// A configuration reads its PIN from the source when it opens the token.
	t.Setenv(PINFilesAllowEnv, pinFile)
	cfg := &Config{Library: softhsmLib, TokenLabel: testToken, PIN: "file://" + pinFile, KeyLabel: "kek"}
	require.NoError(t, cfg.Check())
	require.Equal(t, "file", cfg.PINSource())
	hc, err := cfg.HSMConfig()
	require.NoError(t, err)
	require.Equal(t, "4321", hc.PIN)
	t.Setenv(PINFilesAllowEnv, "")
	_, err = cfg.HSMConfig()
	require.Error(t, err)
	require.Error(t, cfg.Check())
}
