//go:build ignore

// (The constraint above keeps the go command from treating this file as cgo
// source; p11shim.go embeds it and Build compiles it with cc.)

/*
 * p11shim: a PKCS#11 module that forwards every call to a real module and,
 * when told to, behaves the way some real HSMs differ from SoftHSM2.
 *
 *   P11SHIM_TARGET   path of the real module (dlopened once per load)
 *   P11SHIM_CONTROL  path of a control file: whitespace-separated words,
 *                    re-read whenever it changes; a missing file means no
 *                    faults; unknown words are ignored.
 *
 * Words:
 *   fips-iv         C_EncryptInit(CKM_AES_GCM) ignores the caller's IV, draws
 *                   12 random bytes, uses them and writes them back into the
 *                   caller's pIv buffer (as AWS CloudHSM and Luna in FIPS mode)
 *   iv-hidden       as fips-iv, but the IV used is not written back: a broken
 *                   token whose ciphertexts nobody can open again
 *   iv-repeat       as fips-iv, but always the same IV: a broken token
 *   fips-iv-strict  as fips-iv, but a non-zero caller IV is refused
 *   no-gcm          the token has no CKM_AES_GCM
 *   hang            every call blocks while the word is in the file
 *   device-error    every call but C_Initialize, C_Finalize and C_GetInfo
 *                   fails with CKR_DEVICE_ERROR; afterwards old sessions are
 *                   void and C_OpenSession fails until C_Finalize+C_Initialize
 *   kwp             the token lists CKM_AES_KEY_WRAP_KWP (PKCS#11 3.0), with
 *                   the flags of CKM_AES_KEY_WRAP_PAD, and runs it as that
 *   kwp-wrap-only   as kwp, but its flags lack CKF_UNWRAP
 *   oaep-param-invalid  CKM_RSA_PKCS_OAEP with a hash other than SHA-1 is
 *                   refused with CKR_MECHANISM_PARAM_INVALID (where SoftHSM2
 *                   2.6 answers CKR_ARGUMENTS_BAD)
 *   sig-len-range   C_Verify reports a wrong signature as
 *                   CKR_SIGNATURE_LEN_RANGE instead of CKR_SIGNATURE_INVALID
 *   verify-failed   C_Verify fails with CKR_FUNCTION_FAILED (after the
 *                   target ran it, so that the operation is over)
 *   keygen-full     C_GenerateKey and C_GenerateKeyPair fail with
 *                   CKR_DEVICE_MEMORY (no room for another key)
 *
 * The environment is read in C_GetFunctionList and C_Initialize (the control
 * path may change between two uses of the module in one process; the target
 * may not).
 *
 * Build: cc -std=c99 -Wall -Wextra -Werror -fPIC -shared \
 *          -I$(go list -m -f '{{.Dir}}' github.com/miekg/pkcs11) \
 *          -o libp11shim.so shim.c -ldl -lpthread
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* The five platform macros pkcs11.h wants (as miekg/pkcs11's pkcs11go.h). */
#define CK_PTR *
#define NULL_PTR 0
#define CK_DEFINE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType (*name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType (*name)
#include "pkcs11.h"

#define GCM_IV_LEN 12
/* PKCS#11 3.0's number for KWP, which the 2.40 headers lack. */
#define SHIM_CKM_AES_KEY_WRAP_KWP 0x210BUL

/* Fault flags, one per control word. */
enum {
	F_FIPS_IV = 1 << 0,
	F_FIPS_IV_STRICT = 1 << 1,
	F_NO_GCM = 1 << 2,
	F_HANG = 1 << 3,
	F_DEVICE_ERROR = 1 << 4,
	F_IV_HIDDEN = 1 << 5,
	F_IV_REPEAT = 1 << 6,
	F_KWP = 1 << 7,
	F_KWP_WRAP_ONLY = 1 << 8,
	F_OAEP_PARAM_INVALID = 1 << 9,
	F_SIG_LEN_RANGE = 1 << 10,
	F_VERIFY_FAILED = 1 << 11,
	F_KEYGEN_FULL = 1 << 12,
};

/* How a function is affected by device-error and its aftermath. */
enum {
	K_EXEMPT,  /* C_Initialize, C_Finalize, C_GetInfo: never fail */
	K_PLAIN,   /* fails during the outage only */
	K_SESSION, /* takes a session handle: void after the outage */
	K_OPEN,    /* C_OpenSession: fails until C_Finalize+C_Initialize */
};

/* All shared state below is guarded by mu. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST_PTR target;   /* the real module's list */
static CK_FUNCTION_LIST shim_list;    /* what we hand out */
static char control_path[4096];       /* "" = no control file */
static int control_known;             /* cached stat below is valid */
static struct stat control_stat;      /* identity of the file last read */
static unsigned faults;               /* flags from the file last read */
/*
 * broken is set when a device error has been returned and cleared by a
 * successful C_Initialize. While it is set no session can be opened, so every
 * session handle in use dates from before the outage and is refused. (After
 * C_Finalize+C_Initialize the target itself has forgotten the old handles.)
 */
static int broken;

/* Parse the control file's words into flags. */
static unsigned parse_words(char *text)
{
	unsigned f = 0;
	char *save = NULL;
	for (char *w = strtok_r(text, " \t\r\n", &save); w != NULL;
	     w = strtok_r(NULL, " \t\r\n", &save)) {
		if (strcmp(w, "fips-iv") == 0)
			f |= F_FIPS_IV;
		else if (strcmp(w, "fips-iv-strict") == 0)
			f |= F_FIPS_IV_STRICT;
		else if (strcmp(w, "no-gcm") == 0)
			f |= F_NO_GCM;
		else if (strcmp(w, "hang") == 0)
			f |= F_HANG;
		else if (strcmp(w, "device-error") == 0)
			f |= F_DEVICE_ERROR;
		else if (strcmp(w, "iv-hidden") == 0)
			f |= F_IV_HIDDEN;
		else if (strcmp(w, "iv-repeat") == 0)
			f |= F_IV_REPEAT;
		else if (strcmp(w, "kwp") == 0)
			f |= F_KWP;
		else if (strcmp(w, "kwp-wrap-only") == 0)
			f |= F_KWP_WRAP_ONLY;
		else if (strcmp(w, "oaep-param-invalid") == 0)
			f |= F_OAEP_PARAM_INVALID;
		else if (strcmp(w, "sig-len-range") == 0)
			f |= F_SIG_LEN_RANGE;
		else if (strcmp(w, "verify-failed") == 0)
			f |= F_VERIFY_FAILED;
		else if (strcmp(w, "keygen-full") == 0)
			f |= F_KEYGEN_FULL;
	}
	return f;
}

static int same_file(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
	       a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
	       a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* Return the current flags, re-reading the control file if it changed.
 * Called with mu held; only touches the local file system. */
static unsigned current_faults_locked(void)
{
	struct stat st;
	if (control_path[0] == '\0' || stat(control_path, &st) != 0) {
		control_known = 0;
		faults = 0;
		return 0;
	}
	if (control_known && same_file(&st, &control_stat))
		return faults;

	int fd = open(control_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		control_known = 0;
		faults = 0;
		return 0;
	}
	char buf[1024];
	size_t n = 0;
	ssize_t r;
	while (n < sizeof buf - 1 &&
	       ((r = read(fd, buf + n, sizeof buf - 1 - n)) > 0 || (r < 0 && errno == EINTR)))
		if (r > 0)
			n += (size_t)r;
	buf[n] = '\0';
	/* Key the cache on the file we actually read (it may have been
	 * replaced since the stat above). */
	control_known = fstat(fd, &control_stat) == 0;
	close(fd);
	faults = parse_words(buf);
	return faults;
}

static unsigned current_faults(void)
{
	pthread_mutex_lock(&mu);
	unsigned f = current_faults_locked();
	pthread_mutex_unlock(&mu);
	return f;
}

/* Take the control path from the environment. Called with mu held. */
static void read_env_locked(void)
{
	const char *p = getenv("P11SHIM_CONTROL");
	snprintf(control_path, sizeof control_path, "%s", p ? p : "");
	control_known = 0;
}

/*
 * enter runs at the start of every wrapper: waits out "hang" (without
 * holding mu), then applies device-error and its aftermath. It returns
 * CKR_OK to go on, and the flags in force in *flags.
 */
static CK_RV enter(int kind, unsigned *flags)
{
	const struct timespec poll = {0, 20 * 1000 * 1000};
	while (current_faults() & F_HANG)
		nanosleep(&poll, NULL);

	CK_RV rv = CKR_OK;
	pthread_mutex_lock(&mu);
	unsigned f = current_faults_locked();
	if (kind != K_EXEMPT) {
		if (f & F_DEVICE_ERROR) {
			broken = 1;
			rv = CKR_DEVICE_ERROR;
		} else if (broken && kind == K_SESSION) {
			rv = CKR_SESSION_HANDLE_INVALID;
		} else if (broken && kind == K_OPEN) {
			rv = CKR_DEVICE_ERROR;
		}
	}
	pthread_mutex_unlock(&mu);
	if (flags)
		*flags = f;
	return rv;
}

/*
 * Plain forwarding wrappers. WRAP is for functions without a session
 * handle, WRAP_S for those whose first parameter (named h) is one.
 */
#define WRAP_KIND(kind, name, params, args)           \
	static CK_RV w_##name params                  \
	{                                             \
		CK_RV rv = enter(kind, NULL);         \
		return rv != CKR_OK ? rv : target->name args; \
	}
#define WRAP(name, params, args) WRAP_KIND(K_PLAIN, name, params, args)
#define WRAP_S(name, params, args) WRAP_KIND(K_SESSION, name, params, args)

WRAP_KIND(K_EXEMPT, C_Finalize, (CK_VOID_PTR r), (r))
WRAP_KIND(K_EXEMPT, C_GetInfo, (CK_INFO_PTR i), (i))
WRAP(C_GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR n), (p, l, n))
WRAP(C_GetSlotInfo, (CK_SLOT_ID s, CK_SLOT_INFO_PTR i), (s, i))
WRAP(C_GetTokenInfo, (CK_SLOT_ID s, CK_TOKEN_INFO_PTR i), (s, i))
WRAP(C_InitToken, (CK_SLOT_ID s, CK_UTF8CHAR_PTR p, CK_ULONG n, CK_UTF8CHAR_PTR l), (s, p, n, l))
WRAP_S(C_InitPIN, (CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR p, CK_ULONG n), (h, p, n))
WRAP_S(C_SetPIN, (CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR o, CK_ULONG on, CK_UTF8CHAR_PTR p, CK_ULONG pn), (h, o, on, p, pn))
WRAP_KIND(K_OPEN, C_OpenSession, (CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY cb, CK_SESSION_HANDLE_PTR h), (s, f, a, cb, h))
WRAP_S(C_CloseSession, (CK_SESSION_HANDLE h), (h))
WRAP(C_CloseAllSessions, (CK_SLOT_ID s), (s))
WRAP_S(C_GetSessionInfo, (CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR i), (h, i))
WRAP_S(C_GetOperationState, (CK_SESSION_HANDLE h, CK_BYTE_PTR b, CK_ULONG_PTR n), (h, b, n))
WRAP_S(C_SetOperationState, (CK_SESSION_HANDLE h, CK_BYTE_PTR b, CK_ULONG n, CK_OBJECT_HANDLE e, CK_OBJECT_HANDLE a), (h, b, n, e, a))
WRAP_S(C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR p, CK_ULONG n), (h, u, p, n))
WRAP_S(C_Logout, (CK_SESSION_HANDLE h), (h))
WRAP_S(C_CreateObject, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR o), (h, t, n, o))
WRAP_S(C_CopyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR no), (h, o, t, n, no))
WRAP_S(C_DestroyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o), (h, o))
WRAP_S(C_GetObjectSize, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ULONG_PTR n), (h, o, n))
WRAP_S(C_GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, o, t, n))
WRAP_S(C_SetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, o, t, n))
WRAP_S(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n))
WRAP_S(C_FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG m, CK_ULONG_PTR n), (h, o, m, n))
WRAP_S(C_FindObjectsFinal, (CK_SESSION_HANDLE h), (h))
WRAP_S(C_Encrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_EncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_EncryptFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on))
WRAP_S(C_Decrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_DecryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_DecryptFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on))
WRAP_S(C_DigestInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m), (h, m))
WRAP_S(C_Digest, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_DigestUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn), (h, d, dn))
WRAP_S(C_DigestKey, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE k), (h, k))
WRAP_S(C_DigestFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on))
WRAP_S(C_SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
WRAP_S(C_Sign, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_SignUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn), (h, d, dn))
WRAP_S(C_SignFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on))
WRAP_S(C_SignRecoverInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
WRAP_S(C_SignRecover, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_VerifyInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
WRAP_S(C_VerifyUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn), (h, d, dn))
WRAP_S(C_VerifyFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG sn), (h, s, sn))
WRAP_S(C_VerifyRecoverInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
WRAP_S(C_VerifyRecover, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG sn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, s, sn, o, on))
WRAP_S(C_DigestEncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_DecryptDigestUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_SignEncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on))
WRAP_S(C_DeriveKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k), (h, m, b, t, n, k))
WRAP_S(C_SeedRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG n), (h, s, n))
WRAP_S(C_GenerateRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG n), (h, o, n))
WRAP_S(C_GetFunctionStatus, (CK_SESSION_HANDLE h), (h))
WRAP_S(C_CancelFunction, (CK_SESSION_HANDLE h), (h))
WRAP(C_WaitForSlotEvent, (CK_FLAGS f, CK_SLOT_ID_PTR s, CK_VOID_PTR r), (f, s, r))

/* Wrappers that do more than forward. */

/* C_Initialize picks up the control path and ends a device-error aftermath. */
static CK_RV w_C_Initialize(CK_VOID_PTR args)
{
	pthread_mutex_lock(&mu);
	read_env_locked();
	pthread_mutex_unlock(&mu);

	CK_RV rv = enter(K_EXEMPT, NULL);
	if (rv != CKR_OK)
		return rv;
	rv = target->C_Initialize(args);
	if (rv == CKR_OK) {
		pthread_mutex_lock(&mu);
		broken = 0;
		pthread_mutex_unlock(&mu);
	}
	return rv;
}

/* no-gcm: leave CKM_AES_GCM out of the list; kwp, kwp-wrap-only: add
 * CKM_AES_KEY_WRAP_KWP. */
static CK_RV w_C_GetMechanismList(CK_SLOT_ID s, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count)
{
	unsigned f;
	CK_RV rv = enter(K_PLAIN, &f);
	if (rv != CKR_OK)
		return rv;
	if (!(f & (F_NO_GCM | F_KWP | F_KWP_WRAP_ONLY)))
		return target->C_GetMechanismList(s, list, count);
	if (count == NULL)
		return CKR_ARGUMENTS_BAD;

	CK_ULONG n = 0;
	if ((rv = target->C_GetMechanismList(s, NULL, &n)) != CKR_OK)
		return rv;
	CK_MECHANISM_TYPE *all = calloc(n + 1, sizeof *all);
	if (all == NULL)
		return CKR_HOST_MEMORY;
	if ((rv = target->C_GetMechanismList(s, all, &n)) == CKR_OK) {
		CK_ULONG k = 0;
		for (CK_ULONG i = 0; i < n; i++)
			if (!((f & F_NO_GCM) && all[i] == CKM_AES_GCM) &&
			    !((f & (F_KWP | F_KWP_WRAP_ONLY)) && all[i] == SHIM_CKM_AES_KEY_WRAP_KWP))
				all[k++] = all[i];
		if (f & (F_KWP | F_KWP_WRAP_ONLY))
			all[k++] = SHIM_CKM_AES_KEY_WRAP_KWP;
		if (list != NULL && *count < k)
			rv = CKR_BUFFER_TOO_SMALL;
		else if (list != NULL)
			memcpy(list, all, k * sizeof *all);
		*count = k;
	}
	free(all);
	return rv;
}

/* no-gcm: the mechanism is unknown; kwp, kwp-wrap-only: KWP is known. */
static CK_RV w_C_GetMechanismInfo(CK_SLOT_ID s, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
	unsigned f;
	CK_RV rv = enter(K_PLAIN, &f);
	if (rv != CKR_OK)
		return rv;
	if ((f & F_NO_GCM) && type == CKM_AES_GCM)
		return CKR_MECHANISM_INVALID;
	if (type == SHIM_CKM_AES_KEY_WRAP_KWP && (f & (F_KWP | F_KWP_WRAP_ONLY))) {
		rv = target->C_GetMechanismInfo(s, CKM_AES_KEY_WRAP_PAD, info);
		if (rv == CKR_OK && (f & F_KWP_WRAP_ONLY) && !(f & F_KWP))
			info->flags &= ~(CK_FLAGS)CKF_UNWRAP;
		return rv;
	}
	return target->C_GetMechanismInfo(s, type, info);
}

/* kwp, kwp-wrap-only: CKM_AES_KEY_WRAP_KWP runs as CKM_AES_KEY_WRAP_PAD. */
static CK_MECHANISM_PTR kwp_as_pad(unsigned f, CK_MECHANISM_PTR m, CK_MECHANISM_PTR pad)
{
	if (m == NULL || m->mechanism != SHIM_CKM_AES_KEY_WRAP_KWP || !(f & (F_KWP | F_KWP_WRAP_ONLY)))
		return m;
	*pad = *m;
	pad->mechanism = CKM_AES_KEY_WRAP_PAD;
	return pad;
}

static CK_RV w_C_WrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE wk, CK_OBJECT_HANDLE k, CK_BYTE_PTR o, CK_ULONG_PTR on)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	CK_MECHANISM pad;
	return target->C_WrapKey(h, kwp_as_pad(f, m, &pad), wk, k, o, on);
}

static CK_RV w_C_UnwrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE uk, CK_BYTE_PTR w, CK_ULONG wn, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	CK_MECHANISM pad;
	return target->C_UnwrapKey(h, kwp_as_pad(f, m, &pad), uk, w, wn, t, n, k);
}

/* keygen-full: no room for another key. */
static CK_RV w_C_GenerateKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	if (f & F_KEYGEN_FULL)
		return CKR_DEVICE_MEMORY;
	return target->C_GenerateKey(h, m, t, n, k);
}

static CK_RV w_C_GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR pt, CK_ULONG pn, CK_ATTRIBUTE_PTR st, CK_ULONG sn, CK_OBJECT_HANDLE_PTR pk, CK_OBJECT_HANDLE_PTR sk)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	if (f & F_KEYGEN_FULL)
		return CKR_DEVICE_MEMORY;
	return target->C_GenerateKeyPair(h, m, pt, pn, st, sn, pk, sk);
}

/* sig-len-range, verify-failed: C_Verify answers otherwise. */
static CK_RV w_C_Verify(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR s, CK_ULONG sn)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	rv = target->C_Verify(h, d, dn, s, sn);
	if (f & F_VERIFY_FAILED)
		return CKR_FUNCTION_FAILED;
	if ((f & F_SIG_LEN_RANGE) && rv == CKR_SIGNATURE_INVALID)
		return CKR_SIGNATURE_LEN_RANGE;
	return rv;
}

/* oaep-param-invalid: CKM_RSA_PKCS_OAEP with another hash than SHA-1. */
static int oaep_refused(unsigned f, CK_MECHANISM_PTR m)
{
	if (!(f & F_OAEP_PARAM_INVALID) || m == NULL || m->mechanism != CKM_RSA_PKCS_OAEP)
		return 0;
	if (m->pParameter == NULL || m->ulParameterLen != sizeof(CK_RSA_PKCS_OAEP_PARAMS))
		return 1;
	return ((CK_RSA_PKCS_OAEP_PARAMS *)m->pParameter)->hashAlg != CKM_SHA_1;
}

static int random_bytes(CK_BYTE *buf, size_t n)
{
	int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	close(fd);
	return got == n ? 0 : -1;
}

/*
 * fips-iv: the "HSM" chooses the IV. The target gets a copy of the caller's
 * parameters with our IV; on success the IV is written into the caller's pIv
 * buffer, where a careful caller reads it back after C_Encrypt.
 */
static CK_RV encrypt_init_fips(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE key, int strict, int hidden, int repeat)
{
	CK_GCM_PARAMS p;
	if (m->pParameter == NULL || m->ulParameterLen != sizeof p)
		return CKR_MECHANISM_PARAM_INVALID;
	memcpy(&p, m->pParameter, sizeof p);
	if (p.pIv == NULL || p.ulIvLen != GCM_IV_LEN)
		return CKR_MECHANISM_PARAM_INVALID;
	if (strict)
		for (int i = 0; i < GCM_IV_LEN; i++)
			if (p.pIv[i] != 0)
				return CKR_MECHANISM_PARAM_INVALID;

	CK_BYTE iv[GCM_IV_LEN];
	if (repeat)
		memset(iv, 0x5a, sizeof iv);
	else if (random_bytes(iv, sizeof iv) != 0)
		return CKR_FUNCTION_FAILED;
	CK_BYTE_PTR caller_iv = p.pIv;
	p.pIv = iv;
	p.ulIvBits = 8 * GCM_IV_LEN;
	CK_MECHANISM mm = {CKM_AES_GCM, &p, sizeof p};
	CK_RV rv = target->C_EncryptInit(h, &mm, key);
	if (rv == CKR_OK && !hidden)
		memcpy(caller_iv, iv, sizeof iv);
	return rv;
}

static CK_RV w_C_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE key)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	if (oaep_refused(f, m))
		return CKR_MECHANISM_PARAM_INVALID;
	if (m != NULL && m->mechanism == CKM_AES_GCM) {
		if (f & F_NO_GCM)
			return CKR_MECHANISM_INVALID;
		if (f & (F_FIPS_IV | F_FIPS_IV_STRICT | F_IV_HIDDEN | F_IV_REPEAT))
			return encrypt_init_fips(h, m, key, (f & F_FIPS_IV_STRICT) != 0, (f & F_IV_HIDDEN) != 0,
						 (f & F_IV_REPEAT) != 0);
	}
	return target->C_EncryptInit(h, m, key);
}

static CK_RV w_C_DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE key)
{
	unsigned f;
	CK_RV rv = enter(K_SESSION, &f);
	if (rv != CKR_OK)
		return rv;
	if (m != NULL && m->mechanism == CKM_AES_GCM && (f & F_NO_GCM))
		return CKR_MECHANISM_INVALID;
	if (oaep_refused(f, m))
		return CKR_MECHANISM_PARAM_INVALID;
	return target->C_DecryptInit(h, m, key);
}

/* shim_list.C_GetFunctionList: the exported function (declared in pkcs11.h). */
static CK_RV w_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR pp)
{
	return C_GetFunctionList(pp);
}

/* The one exported symbol. Loads the target on first use and hands out
 * shim_list; never hangs or fails for the fault words. */
CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
	if (ppFunctionList == NULL)
		return CKR_ARGUMENTS_BAD;
	CK_RV rv = CKR_OK;
	pthread_mutex_lock(&mu);
	read_env_locked();
	if (target == NULL) {
		const char *path = getenv("P11SHIM_TARGET");
		void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
		CK_C_GetFunctionList get = NULL;
		if (lib != NULL)
			*(void **)&get = dlsym(lib, "C_GetFunctionList");
		if (get == NULL || get(&target) != CKR_OK || target == NULL) {
			const char *why = path ? dlerror() : NULL;
			fprintf(stderr, "p11shim: cannot load P11SHIM_TARGET %s: %s\n",
				path ? path : "(unset)", why ? why : "no usable function list");
			target = NULL;
			rv = CKR_GENERAL_ERROR;
		} else {
			shim_list.version = target->version;
			/* pkcs11f.h names every function of the list through
			 * this macro: assign our wrapper to each. */
#define CK_PKCS11_FUNCTION_INFO(name) shim_list.name = w_##name;
#include "pkcs11f.h"
#undef CK_PKCS11_FUNCTION_INFO
		}
	}
	pthread_mutex_unlock(&mu);
	if (rv == CKR_OK)
		*ppFunctionList = &shim_list;
	return rv;
}
