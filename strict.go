package hsmtransit

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// An external plugin receives JSON numbers as float64, and the SDK decodes
// fields weakly: exportable=0.5 became true (for good: a key can never be
// made non-exportable again), deletion_allowed=-1 true, key_version=1.5 1,
// bits=128.5 128, a null bool false. Built-in transit, in process, sees
// json.Number and refuses those. strictFields checks every bool and
// integer field of a request before its handler runs, the same way for
// every path, and keeps the forms built-in transit accepts: a JSON bool or
// the strings strconv.ParseBool reads (and the numbers 0 and 1) for bools;
// a whole number in range, or a string of one, for integers.

// maxExactInt is the largest integer a float64 holds exactly: a larger JSON
// number may already have been rounded on its way here.
const maxExactInt = 1 << 53

// strictFields returns the first bool or integer field of d that the SDK
// would coerce, as an error naming it; fields are checked in name order so
// the answer is stable.
func strictFields(d *framework.FieldData) error {
	names := make([]string, 0, len(d.Raw))
	for name := range d.Raw {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		schema, ok := d.Schema[name]
		if !ok {
			continue
		}
		raw := d.Raw[name]
		var err error
		switch schema.Type {
		case framework.TypeBool:
			err = strictBool(raw)
		case framework.TypeInt, framework.TypeInt64:
			err = strictInt(raw)
		default:
			continue
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

func strictBool(raw interface{}) error {
	switch v := raw.(type) {
	case bool:
		return nil
	case string:
		if _, err := strconv.ParseBool(v); err == nil {
			return nil
		}
	case nil:
		return fmt.Errorf("must be true or false, not null")
	default:
		if n, err := number(v); err == nil && (n == 0 || n == 1) {
			return nil
		}
	}
	return fmt.Errorf("must be true or false, not %s", describe(raw))
}

func strictInt(raw interface{}) error {
	switch v := raw.(type) {
	case string:
		if _, err := strconv.ParseInt(v, 0, 64); err == nil {
			return nil
		}
	case nil:
		return fmt.Errorf("must be a whole number, not null")
	case bool:
	default:
		if n, err := number(v); err == nil && n == math.Trunc(n) && math.Abs(n) <= maxExactInt {
			return nil
		}
	}
	return fmt.Errorf("must be a whole number (at most 2^53 in size), not %s", describe(raw))
}

// number reads the numeric shapes a JSON number takes on its way here.
func number(v interface{}) (float64, error) {
	switch n := v.(type) {
	case float64:
		return n, nil
	case float32:
		return float64(n), nil
	case int:
		return float64(n), nil
	case int64:
		return float64(n), nil
	case json.Number:
		if i, err := n.Int64(); err == nil {
			return float64(i), nil
		}
		return n.Float64()
	}
	return 0, fmt.Errorf("not a number")
}

func describe(raw interface{}) string {
	switch v := raw.(type) {
	case string:
		return strconv.Quote(v)
	case bool:
		return strconv.FormatBool(v)
	}
	if n, err := number(raw); err == nil {
		return strconv.FormatFloat(n, 'g', -1, 64)
	}
	return fmt.Sprintf("a %T", raw)
}

// strictPaths wraps every operation of every path with strictFields.
func strictPaths(paths []*framework.Path) []*framework.Path {
	for _, p := range paths {
		for _, op := range p.Operations {
			po, ok := op.(*framework.PathOperation)
			if !ok {
				continue
			}
			next := po.Callback
			po.Callback = func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
				if err := strictFields(d); err != nil {
					return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
				}
				return next(ctx, req, d)
			}
		}
	}
	return paths
}
