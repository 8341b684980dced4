package hsm

import (
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"
)

// dataApplication is the CKA_APPLICATION of the data objects WriteData
// makes.
const dataApplication = "hsm-transit"

// stagingSuffix makes the label of the object that carries a new value
// while the old object is replaced. It starts with U+00A0, which
// CheckKeyLabel refuses, so no caller's label is another's staging label.
const stagingSuffix = "\u00a0staging"

// dataLocks serialise the data operations of the process on one label of
// one token (WriteData and DestroyData hold its lock exclusively, ReadData
// shared; inside the operation, so that one abandoned at its deadline still
// holds it): two WriteData of one label must not both find nothing and both
// create an object, and a ReadData must not read a handle a writer is
// destroying (a stale handle is CKR_OBJECT_HANDLE_INVALID, which drops the
// connection). Other processes using the token are not covered.
var dataLocks sync.Map // dataKey -> *sync.RWMutex

// dataKey names the data objects of one label in one token.
type dataKey struct {
	file  fileID
	token string
	label string
}

// dataMu returns the lock of the label's data objects in the token: a token
// that hangs inside a data operation holds up that label in that token only.
func (t *Token) dataMu(label string) *sync.RWMutex {
	mu, _ := dataLocks.LoadOrStore(dataKey{t.conn.mod.id, t.Describe(), label}, &sync.RWMutex{})
	return mu.(*sync.RWMutex)
}

// findData returns the token's private data objects labelled label.
//
// Only private objects are looked at: a public object can be made or
// changed by anyone with access to the token and no PIN, so it must neither
// be read as the counter (a rollback) nor count as a second object with the
// label (a denial of service).
func findData(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, label string) ([]pkcs11.ObjectHandle, error) {
	return findObjects(ctx, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	})
}

// dataObjects are the objects of one label: the object itself and the
// staging objects of a replacement.
type dataObjects struct {
	main, staging []pkcs11.ObjectHandle
}

func (t *Token) findDataObjects(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, op, label string) (dataObjects, error) {
	var d dataObjects
	var err error
	if d.main, err = findData(ctx, s, label); err != nil {
		return d, err
	}
	if len(d.main) > 1 {
		return d, newError(Configuration, op, fmt.Errorf(
			"%d data objects labelled %q in token %s; labels must be unique", len(d.main), label, t.Describe()))
	}
	d.staging, err = findData(ctx, s, label+stagingSuffix)
	return d, err
}

// createData makes a data object.
func createData(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, label string, value []byte) (pkcs11.ObjectHandle, error) {
	return ctx.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, dataApplication),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
	})
}

// destroyAll destroys the objects hs.
func (t *Token) destroyAll(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, op, label string, hs []pkcs11.ObjectHandle) error {
	for _, h := range hs {
		err := ctx.DestroyObject(s, h)
		var rv pkcs11.Error
		if errors.As(err, &rv) && rv == pkcs11.CKR_ACTION_PROHIBITED {
			return newError(Configuration, op, fmt.Errorf(
				"a data object labelled %q in token %s cannot be destroyed (CKA_DESTROYABLE is false)", label, t.Describe()))
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// WriteData stores value in the token's data object labelled label
// (CKO_DATA, CKA_TOKEN, CKA_PRIVATE true, CKA_APPLICATION "hsm-transit"),
// creating it when absent, else replacing its CKA_VALUE.
//
// Tokens may refuse to change CKA_VALUE of a data object (SoftHSM2 does:
// PKCS#11 does not say it may be changed). The object is then replaced in
// steps that leave, wherever they are interrupted, a state ReadData reads as
// the old or the new value: a staging object with the new value is made,
// the old object destroyed, the new one made, the staging one destroyed.
//
// Every attempt looks at the token first and goes on from the state it
// finds, so an attempt made again after a failure that may have created an
// object (on a fresh connection, after the session or token was lost) never
// leaves two objects of one label.
func (t *Token) WriteData(label string, value []byte) error {
	const op = "write data"
	if err := CheckKeyLabel(label); err != nil {
		return err
	}
	staging := label + stagingSuffix
	mu := t.dataMu(label)
	return t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		mu.Lock()
		defer mu.Unlock()
		d, err := t.findDataObjects(ctx, s, op, label)
		if err != nil {
			return err
		}
		if len(d.main) == 1 {
			err := ctx.SetAttributeValue(s, d.main[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, value)})
			var rv pkcs11.Error
			if !errors.As(err, &rv) || (rv != pkcs11.CKR_ATTRIBUTE_READ_ONLY && rv != pkcs11.CKR_ACTION_PROHIBITED) {
				if err == nil {
					// A staging object left by an interrupted
					// replacement is older than this value.
					err = t.destroyAll(ctx, s, op, staging, d.staging)
				}
				return err
			}
			// Replace the object. Staging objects left by an
			// interrupted replacement are older than the object.
			if err := t.destroyAll(ctx, s, op, staging, d.staging); err != nil {
				return err
			}
			h, err := createData(ctx, s, staging, value)
			if err != nil {
				return err
			}
			if err := t.destroyAll(ctx, s, op, label, d.main); err != nil {
				return err
			}
			d.staging = []pkcs11.ObjectHandle{h}
		}
		if _, err := createData(ctx, s, label, value); err != nil {
			return err
		}
		return t.destroyAll(ctx, s, op, staging, d.staging)
	})
}

// ReadData returns the value of the data object labelled label; found is
// false when there is none. Two objects with the label is a Configuration
// error. When a replacement by WriteData was interrupted after the old
// object was destroyed, the value is the staging object's.
func (t *Token) ReadData(label string) (value []byte, found bool, err error) {
	const op = "read data"
	if err := CheckKeyLabel(label); err != nil {
		return nil, false, err
	}
	var got []byte
	var ok bool
	mu := t.dataMu(label)
	err = t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		mu.RLock()
		defer mu.RUnlock()
		got, ok = nil, false
		d, err := t.findDataObjects(ctx, s, op, label)
		if err != nil {
			return err
		}
		hs := d.main
		if len(hs) == 0 {
			hs = d.staging
		}
		switch len(hs) {
		case 0:
			return nil
		case 1:
		default:
			return newError(Configuration, op, fmt.Errorf(
				"%d staging data objects for %q in token %s; labels must be unique", len(hs), label, t.Describe()))
		}
		attrs, err := ctx.GetAttributeValue(s, hs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
		if err != nil {
			return err
		}
		got = append([]byte{}, attrs[0].Value...)
		ok = true
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return got, ok, nil
}

// DestroyData removes the data object labelled label (every one, should
// there be several, and any staging object); absent is not an error.
func (t *Token) DestroyData(label string) error {
	const op = "destroy data"
	if err := CheckKeyLabel(label); err != nil {
		return err
	}
	staging := label + stagingSuffix
	mu := t.dataMu(label)
	return t.do(op, true, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle, _ uint64) error {
		mu.Lock()
		defer mu.Unlock()
		// Staging objects first: left alone, they would be read as the
		// value once the object is gone.
		hs, err := findData(ctx, s, staging)
		if err != nil {
			return err
		}
		if err := t.destroyAll(ctx, s, op, staging, hs); err != nil {
			return err
		}
		if hs, err = findData(ctx, s, label); err != nil {
			return err
		}
		return t.destroyAll(ctx, s, op, label, hs)
	})
}
