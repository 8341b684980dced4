//go:build tools

// Package tools pins the Vault server used for development and end-to-end
// tests. It is its own module so that Vault's large dependency graph never
// leaks into the plugin's go.mod.
package tools

import (
	_ "github.com/hashicorp/vault"
)
