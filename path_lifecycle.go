package hsmtransit

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/keysutil"
	"github.com/hashicorp/vault/sdk/logical"
)

const (
	minPendingDays     = 7
	maxPendingDays     = 30
	defaultPendingDays = 30
)

// pathScheduleDeletion schedules a key's destruction after a waiting period.
func (b *backend) pathScheduleDeletion() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/schedule-deletion",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "schedule-deletion",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the key"},
			"pending_days": {
				Type:        framework.TypeInt,
				Default:     defaultPendingDays,
				Description: fmt.Sprintf("Days before the key is destroyed, from %d to %d (default %d).", minPendingDays, maxPendingDays, defaultPendingDays),
			},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathScheduleDeletionWrite},
		},
		HelpSynopsis:    pathScheduleDeletionHelpSyn,
		HelpDescription: pathScheduleDeletionHelpDesc,
	}
}

// pathCancelDeletion cancels a scheduled destruction.
func (b *backend) pathCancelDeletion() *framework.Path {
	return &framework.Path{
		Pattern: "keys/" + framework.GenericNameRegex("name") + "/cancel-deletion",
		DisplayAttrs: &framework.DisplayAttributes{
			OperationPrefix: operationPrefix,
			OperationVerb:   "cancel-deletion",
			OperationSuffix: "key",
		},
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the key"},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathCancelDeletionWrite},
		},
		HelpSynopsis:    pathCancelDeletionHelpSyn,
		HelpDescription: pathCancelDeletionHelpDesc,
	}
}

// existingLifecycle is the lifecycle record of a key of either residency,
// or a 400 response when no key has the name.
func (b *backend) existingLifecycle(ctx context.Context, s logical.Storage, name string) (*keyLifecycle, *logical.Response, error) {
	c, _, unlock, err := b.lockedCipher(ctx, keysutil.PolicyRequest{Storage: s, Name: name})
	unlock()
	if err != nil {
		return nil, nil, err
	}
	if c == nil {
		return nil, logical.ErrorResponse("no existing key named %s could be found", name), logical.ErrInvalidRequest
	}
	lc, err := b.lifecycle.get(ctx, s, name)
	return lc, nil, err
}

// pathScheduleDeletionWrite disables the key and records when it is
// destroyed.
func (b *backend) pathScheduleDeletionWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	days := d.Get("pending_days").(int)
	if days < minPendingDays || days > maxPendingDays {
		return logical.ErrorResponse("pending_days must be from %d to %d", minPendingDays, maxPendingDays), logical.ErrInvalidRequest
	}
	lc, resp, err := b.existingLifecycle(ctx, req.Storage, name)
	if lc == nil || err != nil {
		return resp, err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if !lc.DeletionTime.IsZero() {
		return logical.ErrorResponse("key %s is already scheduled for destruction at %s", name, lc.DeletionTime.Format(time.RFC3339)), logical.ErrInvalidRequest
	}
	// The index entry first: a key whose lifecycle says "scheduled" is
	// always found by the periodic function.
	if err := req.Storage.Put(ctx, &logical.StorageEntry{Key: deletionPrefix + name, Value: []byte(name)}); err != nil {
		return nil, fmt.Errorf("scheduling the deletion: %w", err)
	}
	prevDisabled := lc.Disabled
	lc.Disabled = true
	lc.DeletionTime = time.Now().UTC().Add(time.Duration(days) * 24 * time.Hour).Truncate(time.Second)
	if err := lc.persist(ctx, req.Storage); err != nil {
		lc.Disabled, lc.DeletionTime = prevDisabled, time.Time{}
		return nil, fmt.Errorf("scheduling the deletion: %w", err)
	}
	b.Logger().Warn("key scheduled for destruction", "name", name, "deletion_time", lc.DeletionTime)
	return &logical.Response{Data: map[string]interface{}{
		"name":          name,
		"disabled":      true,
		"deletion_time": lc.DeletionTime.Format(time.RFC3339),
	}}, nil
}

// pathCancelDeletionWrite clears the schedule and enables the key again.
func (b *backend) pathCancelDeletionWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	lc, resp, err := b.existingLifecycle(ctx, req.Storage, name)
	if lc == nil || err != nil {
		return resp, err
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if lc.DeletionTime.IsZero() {
		return logical.ErrorResponse("key %s is not scheduled for destruction", name), logical.ErrInvalidRequest
	}
	prevTime := lc.DeletionTime
	lc.Disabled, lc.DeletionTime = false, time.Time{}
	if err := lc.persist(ctx, req.Storage); err != nil {
		lc.Disabled, lc.DeletionTime = true, prevTime
		return nil, fmt.Errorf("cancelling the deletion: %w", err)
	}
	if err := req.Storage.Delete(ctx, deletionPrefix+name); err != nil {
		return nil, fmt.Errorf("cancelling the deletion: %w", err)
	}
	b.Logger().Info("scheduled destruction cancelled", "name", name)
	return &logical.Response{Data: map[string]interface{}{"name": name, "disabled": false}}, nil
}

// destroyDueKeys destroys the keys whose scheduled time has come, HSM
// objects included.
func (b *backend) destroyDueKeys(ctx context.Context, s logical.Storage, now time.Time) error {
	names, err := s.List(ctx, deletionPrefix)
	if err != nil {
		return fmt.Errorf("listing scheduled deletions: %w", err)
	}
	var failures []string
	for _, name := range names {
		if strings.HasSuffix(name, "/") {
			continue
		}
		lc, err := b.lifecycle.get(ctx, s, name)
		if err != nil {
			failures = append(failures, err.Error())
			continue
		}
		lc.mu.Lock()
		due := !lc.DeletionTime.IsZero() && !now.Before(lc.DeletionTime)
		stale := lc.DeletionTime.IsZero()
		lc.mu.Unlock()
		switch {
		case stale:
			// Cancelled between the two writes of a cancellation.
			_ = s.Delete(ctx, deletionPrefix+name)
		case due:
			if err := b.deleteKey(ctx, s, name, true); err != nil {
				failures = append(failures, fmt.Sprintf("destroying key %q: %v", name, err))
				continue
			}
			b.Logger().Warn("destroyed key at its scheduled time", "name", name)
		}
	}
	if len(failures) > 0 {
		return fmt.Errorf("scheduled destruction: %s", strings.Join(failures, "; "))
	}
	return nil
}

// deleteKey deletes a key of either residency (an HSM-resident key's
// objects with it), then its lifecycle record. Unless force, only a key
// whose deletion_allowed is set, and a key that does not exist is the
// caller's mistake; with force (a scheduled destruction: the schedule was
// the decision) whatever its deletion_allowed.
func (b *backend) deleteKey(ctx context.Context, s logical.Storage, name string, force bool) error {
	if k, unlock, err := b.hsmKeyFor(ctx, s, name, true); err != nil || k != nil {
		if err != nil {
			unlock()
			return err
		}
		if !force && !k.DeletionAllowed {
			unlock()
			return callerErr("error deleting policy %s: deletion is not allowed for this key", name)
		}
		err := b.hsmKeys.Delete(ctx, s, k)
		unlock()
		if err != nil {
			return err
		}
		b.Logger().Info("deleted HSM-resident key and destroyed its HSM objects", "name", name)
		return b.lifecycle.forget(ctx, s, name)
	}
	if force {
		p, unlock, err := b.readPolicy(ctx, s, name, true)
		if err == nil && p != nil && !p.DeletionAllowed {
			p.DeletionAllowed = true
			err = p.Persist(ctx, s)
		}
		unlock()
		if err != nil {
			return err
		}
		if p == nil {
			return b.lifecycle.forget(ctx, s, name)
		}
	}
	// keysutil takes the policy's lock itself.
	if err := b.withLM(ctx, s, func(lm *keysutil.LockManager) error { return lm.DeletePolicy(ctx, s, name) }); err != nil {
		if force {
			return err
		}
		// keysutil reports a missing key and a refused deletion as plain
		// errors; both are the caller's to fix.
		return callerErr("error deleting policy %s: %s", name, err)
	}
	return b.lifecycle.forget(ctx, s, name)
}

const pathScheduleDeletionHelpSyn = `Schedule the destruction of a key`

const pathScheduleDeletionHelpDesc = `
Disables the key at once and destroys it (HSM objects included) after
pending_days (7 to 30, default 30): a waiting period in which
keys/:name/cancel-deletion restores it. The key's deletion_allowed is not
needed: scheduling is the decision. Not in built-in transit.
`

const pathCancelDeletionHelpSyn = `Cancel a key's scheduled destruction`

const pathCancelDeletionHelpDesc = `
Clears the key's scheduled destruction and enables it again.
`
