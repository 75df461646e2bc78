"""RSA signatures through the OpenSSL libcrypto that Python's own ssl and hashlib modules have loaded.

DKIM signing (queue/dkim_sign.py) needs one RSASSA-PKCS1-v1_5 signature per message. dkimpy computes it
in pure Python (~12 ms with the GIL held); cryptography's OpenSSL takes ~1 ms but its Rust library is
9-10 MB of RSS that CPython never unloads (issue 19: idle RSS <= 60 MB), so a box that sent one signed
message kept it for good. The libcrypto.so.3 of the system is already mapped in the server for TLS and
hashlib: calling it through ctypes costs no memory. OpenSSL 3's EVP_PKEY API only (1.1's
EVP_PKEY_CTX_set_rsa_padding is a macro, not a symbol): `available()` is False elsewhere and the caller
uses cryptography instead. ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

RSA_PKCS1_PADDING = 1
EVP_PKEY_RSA = 6
MAX_SIGNATURE = 2048  # bytes: a 16384-bit key


class LibcryptoError(RuntimeError):
    """OpenSSL refused the key or the signature."""


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The libcrypto this process already uses (ssl/_hashlib linked it), or None."""
    import _hashlib  # noqa: F401  maps libcrypto, if the interpreter was built against a shared one

    paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
             if "/libcrypto.so" in line}
    if len(paths) != 1:
        return None
    try:
        lib = ctypes.CDLL(paths.pop())
        version = lib.OpenSSL_version_num
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_ulong
    if version() < 0x30000000:
        return None
    c_void_p, c_size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    signatures = {
        "d2i_PrivateKey": (c_void_p, [c_int, c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
        "EVP_PKEY_free": (None, [c_void_p]),
        "EVP_PKEY_up_ref": (c_int, [c_void_p]),
        "EVP_PKEY_CTX_new": (c_void_p, [c_void_p, c_void_p]),
        "EVP_PKEY_CTX_free": (None, [c_void_p]),
        "EVP_PKEY_sign_init": (c_int, [c_void_p]),
        "EVP_PKEY_CTX_set_rsa_padding": (c_int, [c_void_p, c_int]),
        "EVP_PKEY_CTX_set_signature_md": (c_int, [c_void_p, c_void_p]),
        "EVP_PKEY_sign": (c_int, [c_void_p, ctypes.c_char_p, ctypes.POINTER(c_size_t), ctypes.c_char_p, c_size_t]),
        "EVP_sha256": (c_void_p, []),
        "EVP_sha1": (c_void_p, []),
        "ERR_clear_error": (None, []),
    }
    try:
        for name, (restype, argtypes) in signatures.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
    except AttributeError:
        return None
    return lib


def available() -> bool:
    return _lib() is not None


def rsa_sign_prehashed(private_key_der: bytes, digest: bytes, hash_name: str) -> bytes:
    """RSASSA-PKCS1-v1_5 (RFC 8017 8.2.1) of an already computed SHA-256 or SHA-1 `digest`, with the
    PKCS#1 RSAPrivateKey DER `private_key_der`. Only when available()."""
    lib = _lib()
    if lib is None:
        raise LibcryptoError("no OpenSSL 3 libcrypto in this process")
    try:
        return _sign(lib, private_key_der, digest, hash_name)
    except LibcryptoError:
        lib.ERR_clear_error()  # this thread's OpenSSL error queue is the ssl module's too
        raise


class _Keys:
    """EVP_PKEYs read from DER, the last KEPT of them: OpenSSL 3's decoder takes about 1 ms per RSA
    key, as long as the signature. Each user holds a reference of its own (EVP_PKEY_up_ref), so one
    pushed out meanwhile is freed only when its last signature is done."""

    KEPT = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[bytes, int] = {}

    def take(self, lib: ctypes.CDLL, der: bytes) -> int:
        with self._lock:
            key = self._keys.get(der)
            if key is None:
                pointer = ctypes.c_char_p(der)
                key = lib.d2i_PrivateKey(EVP_PKEY_RSA, None, ctypes.byref(pointer), len(der))
                if not key:
                    raise LibcryptoError("OpenSSL could not read the RSA key")
                if len(self._keys) >= self.KEPT:
                    lib.EVP_PKEY_free(self._keys.pop(next(iter(self._keys))))
                self._keys[der] = key
            lib.EVP_PKEY_up_ref(key)
            return int(key)


_keys = _Keys()


def _sign(lib: ctypes.CDLL, private_key_der: bytes, digest: bytes, hash_name: str) -> bytes:
    md = {"sha256": lib.EVP_sha256, "sha1": lib.EVP_sha1}[hash_name]()
    key = _keys.take(lib, private_key_der)
    try:
        ctx = lib.EVP_PKEY_CTX_new(key, None)
        if not ctx:
            raise LibcryptoError("EVP_PKEY_CTX_new failed")
        try:
            if (lib.EVP_PKEY_sign_init(ctx) <= 0 or lib.EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) <= 0
                    or lib.EVP_PKEY_CTX_set_signature_md(ctx, md) <= 0):
                raise LibcryptoError("OpenSSL refused the signing parameters")
            out = ctypes.create_string_buffer(MAX_SIGNATURE)
            size = ctypes.c_size_t(MAX_SIGNATURE)
            if lib.EVP_PKEY_sign(ctx, out, ctypes.byref(size), digest, len(digest)) <= 0:
                raise LibcryptoError("OpenSSL could not sign")
            return out.raw[: size.value]
        finally:
            lib.EVP_PKEY_CTX_free(ctx)
    finally:
        lib.EVP_PKEY_free(key)
