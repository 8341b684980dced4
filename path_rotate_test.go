package hsmtransit

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestRotate(t *testing.T) {
	e := getTestBackend(t)
	for _, kt := range []string{"aes256-gcm96", "ed25519", "hmac", "ecdsa-p256"} {
		t.Run(kt, func(t *testing.T) {
			e.mustWrite(t, "keys/"+kt, map[string]interface{}{"type": kt})
			data := e.mustWrite(t, "keys/"+kt+"/rotate", nil)
			require.Equal(t, float64(2), data["latest_version"])
			if kt != "hmac" {
				require.Len(t, data["keys"], 2)
			}
		})
	}
	requireStatus(t, e.write(t, "keys/none/rotate", nil), 400, "key not found")
}
