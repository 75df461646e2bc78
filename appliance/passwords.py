"""Password hashing (argon2id via argon2-cffi) and the password policy shared by the CLI and the web.

Hashing is CPU- and memory-heavy on purpose: callers on the event loop run these functions through
`asyncio.to_thread` (Accounts and Auth do).
"""

from __future__ import annotations

import unicodedata

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# OWASP Password Storage Cheat Sheet's argon2id minimum: m=19 MiB, t=2, p=1 (issue 19). Sized for a
# Raspberry Pi: ~200 ms of one core per hash on this 2-core test machine (RFC 9106's t=3, m=64 MiB, p=4
# took ~750 ms and 64 MiB per concurrent login), and 19 MiB x MAX_CONCURRENT_HASHES (auth.py) of RAM.
# Stored hashes made with other parameters are rehashed at the next successful login (auth.py).
TIME_COST = 2
MEMORY_COST_KIB = 19 * 1024
PARALLELISM = 1
HASH_LEN = 32
SALT_LEN = 16

MIN_PASSWORD_LENGTH = 10
# Longer input is refused when setting a password and fails verification without hashing: it bounds
# the work one request can cause, and no real passphrase is this long.
MAX_PASSWORD_LENGTH = 1024

# The worst of the leaked-password lists that survive the length rule. The length rule does most of
# the work; this catches the famous ones a user might still type.
COMMON_PASSWORDS = frozenset({
    "0123456789", "1234567890", "0987654321", "9876543210", "12345678910", "123456789a",
    "1111111111", "0000000000", "1q2w3e4r5t", "1qaz2wsx3edc", "qwertyuiop", "qwerty1234",
    "qwerty12345", "qwerty123456", "1234qwer", "q1w2e3r4t5", "asdfghjkl1", "asdfghjkl;",
    "zxcvbnm123", "password12", "password123", "password1234", "passw0rd123", "password!",
    "passwordpassword", "iloveyou12", "iloveyou123", "letmein123", "welcome123", "welcome1234",
    "administrator", "admin12345", "admin123456", "changeme123", "changeme!!", "football123",
    "baseball123", "monkey12345", "dragon12345", "sunshine123", "princess123", "trustno1!!",
    "abc1234567", "abcdefghij", "abcdefghijk", "abcd123456", "aa12345678", "a123456789",
    "123qweasdzxc", "mypassword", "mypassword1", "secret1234", "superman123", "starwars123",
    "whatever123", "letmeinplease",
})


def make_hasher(
    *, time_cost: int = TIME_COST, memory_cost_kib: int = MEMORY_COST_KIB, parallelism: int = PARALLELISM,
) -> PasswordHasher:
    """An argon2id hasher. Tests pass small costs; production uses the constants above."""
    return PasswordHasher(
        time_cost=time_cost, memory_cost=memory_cost_kib, parallelism=parallelism,
        hash_len=HASH_LEN, salt_len=SALT_LEN, type=Type.ID,
    )


DEFAULT_HASHER = make_hasher()


def normalise(password: str) -> str:
    """RFC 8265 4.2 (OpaqueString): NFC, so the same typed password matches from any client."""
    return unicodedata.normalize("NFC", password)


def hash_password(password: str, hasher: PasswordHasher = DEFAULT_HASHER) -> str:
    return hasher.hash(normalise(password))


def verify_password(password_hash: str, password: str, hasher: PasswordHasher = DEFAULT_HASHER) -> bool:
    """True when the password matches. A malformed or non-argon2 hash is a mismatch, never an error."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return hasher.verify(password_hash, normalise(password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str, hasher: PasswordHasher = DEFAULT_HASHER) -> bool:
    """The stored hash was made with other parameters (or another type) than `hasher` uses now."""
    try:
        return hasher.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


def password_problem(password: str, *, address: str | None = None) -> str | None:
    """Why this password is refused, as one line fit for the CLI or a form, or None if it is fine.
    `address` (a mailbox address or admin name) must not be the password or its visible parts."""
    if not password:
        return "the password is empty"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"the password is longer than {MAX_PASSWORD_LENGTH} characters"
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        # NUL separates fields in SASL PLAIN (RFC 4616 2) and line breaks end protocol lines.
        return "the password contains a control character"
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"the password is too short (at least {MIN_PASSWORD_LENGTH} characters)"
    folded = normalise(password).casefold()
    if len(set(folded)) <= 2:
        return "the password repeats one or two characters"
    if folded in COMMON_PASSWORDS or folded.strip() in COMMON_PASSWORDS:
        return "the password is too common"
    if address:
        name = address.casefold()
        local, _, domain = name.partition("@")
        if folded in {name, local, domain, local + domain} or folded.strip() == name:
            return "the password must not be the address"
    return None
