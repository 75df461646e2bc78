"""ACME (RFC 8555) orders for the box's certificate, on the `acme` library (the one certbot uses).

Blocking: the composition root runs `order_certificate` in a worker thread (asyncio.to_thread), so
the loop keeps serving mail while the CA validates. Challenges are answered by the box itself:
- http-01 (RFC 8555 8.3): token -> key authorization in a dict the port-80 listener reads
  (web/routes/wellknown.py), never redirected to HTTPS;
- tls-alpn-01 (RFC 8737): a challenge certificate handed to TlsManager, served on 443 only to a
  client offering acme-tls/1 for that name.
Measured against pebble (PEERS.md): bad nonces are retried here a few times (the library retries
once), an account the CA forgot (accountDoesNotExist) is registered again, authorizations that come
back valid are skipped, the answers stay up until the order is final (the CA checks several times).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from appliance.acme_terms import (
    HTTP_01,
    TLS_ALPN_01,
    AcmeProblem,
    AcmeSettings,
    ChallengeSink,
    Issued,
    parse_retry_after,
)
from appliance.tls import write_private

log = logging.getLogger(__name__)

ACCOUNT_KEY_FILE = "account-key.pem"
ACCOUNTS_FILE = "accounts.json"  # directory URL -> account URL
USER_AGENT = "letterbox-acme"
NETWORK_TIMEOUT = 30
ORDER_DEADLINE = dt.timedelta(seconds=120)
NONCE_RETRIES = 10  # pebble rejects 30 % of nonces in the tests; 5 tries left a flake of ~10 % per test run


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 3: the response is an empty JSON object, like http-01's."""

    typ = TLS_ALPN_01


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """`acme` 5.x dropped its tls-alpn-01 class; this is the registry entry the library needs to
    parse and answer one (the certificate itself is made by appliance.tls)."""

    response_cls = TLSALPN01Response
    typ = TLS_ALPN_01

    def validation(self, account_key: JWK, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


class _Network(client.ClientNetwork):
    """Keeps the Retry-After of an error answer (RFC 8555 6.6: a rate limit says when to come back),
    which the library drops when it turns the problem document into messages.Error."""

    @classmethod
    def _check_response(cls, response: requests.Response, content_type: str | None = None) -> requests.Response:
        try:
            return super()._check_response(response, content_type)
        except messages.Error as exc:
            exc.retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        """Each POST retries a refused nonce itself (RFC 8555 6.5: the answer carries a fresh one): the
        library retries once only, and poll_and_finalize makes a POST per poll, so retrying the whole
        call failed under pebble's 30 % refusals when a slow validation took many polls."""
        for attempt in range(NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as exc:
                if exc.code != "badNonce" or attempt == NONCE_RETRIES - 1:
                    raise
                log.info("ACME: bad nonce, trying again")
        raise AssertionError("unreachable")


def load_or_make_account_key(acme_dir: Path) -> ec.EllipticCurvePrivateKey:
    """EC P-256, made once, kept 0600 in tls/acme/."""
    path = acme_dir / ACCOUNT_KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeProblem(f"The ACME account key {path} is not an EC key.")
        return key
    acme_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(acme_dir, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def _accounts(acme_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((acme_dir / ACCOUNTS_FILE).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_account(acme_dir: Path, directory: str, url: str) -> None:
    data = _accounts(acme_dir)
    data[directory] = url
    write_private(acme_dir / ACCOUNTS_FILE, json.dumps(data, indent=1).encode())


def _with_nonce_retry(call: Callable[[], Any]) -> Any:
    """The CA may refuse a nonce at any time (RFC 8555 6.5; pebble does it to 5 % on purpose)."""
    for attempt in range(NONCE_RETRIES):
        try:
            return call()
        except messages.Error as exc:
            if exc.code != "badNonce" or attempt == NONCE_RETRIES - 1:
                raise
            log.info("ACME: bad nonce, trying again")
        except errors.BadNonce:
            if attempt == NONCE_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


class AcmeOrder:
    """One ACME session: account, order, challenges, finalization. Blocking."""

    def __init__(self, settings: AcmeSettings, acme_dir: Path, sink: ChallengeSink,
                 progress: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        self.acme_dir = acme_dir
        self.sink = sink
        self.progress = progress or (lambda phase, text: None)
        self.key = JWKEC(key=load_or_make_account_key(acme_dir))
        self.net = _Network(
            self.key, alg=ES256, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT,
            verify_ssl=settings.ca_file or True,  # type: ignore[arg-type]  # a CA file path is accepted
        )
        self._client: client.ClientV2 | None = None

    @property
    def acme(self) -> client.ClientV2:
        if self._client is None:
            directory = _with_nonce_retry(lambda: client.ClientV2.get_directory(self.settings.directory, self.net))
            self._client = client.ClientV2(directory, self.net)
        return self._client

    def register(self) -> None:
        acme = self.acme
        self.net.account = None  # newAccount is signed with the key itself (jwk), not a kid (RFC 8555 6.2)
        eab = None
        if self.settings.eab_kid and self.settings.eab_hmac_key:
            try:
                eab = messages.ExternalAccountBinding.from_data(
                    account_public_key=self.key.public_key(), kid=self.settings.eab_kid,
                    hmac_key=self.settings.eab_hmac_key, directory=acme.directory)
            except (ValueError, TypeError):
                raise AcmeProblem("The External Account Binding HMAC key is not valid base64url text: "
                                  "copy it again from your certificate authority.", kind="eab") from None
        elif acme.external_account_required():
            raise AcmeProblem("This certificate authority requires External Account Binding: enter the key ID "
                              "and HMAC key it gave you.", kind="eab")
        new = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True, external_account_binding=eab)
        try:
            regr = _with_nonce_retry(lambda: acme.new_account(new))
            url = regr.uri
        except errors.ConflictError as exc:  # this key already has an account: use it
            url = exc.location
            self.net.account = messages.RegistrationResource(uri=url, body=messages.Registration())
        _save_account(self.acme_dir, self.settings.directory, str(url))

    def ensure_account(self) -> None:
        known = _accounts(self.acme_dir).get(self.settings.directory)
        if known:
            self.net.account = messages.RegistrationResource(uri=known, body=messages.Registration())
        else:
            self.register()

    def order(self, names: list[str], key_pem: bytes) -> Issued:
        self.ensure_account()
        csr = crypto_util.make_csr(key_pem, names)
        try:
            order = _with_nonce_retry(lambda: self.acme.new_order(csr))
        except messages.Error as exc:
            if exc.code != "accountDoesNotExist":
                raise
            log.info("ACME: the CA does not know our account any more: registering again")
            self.register()
            order = _with_nonce_retry(lambda: self.acme.new_order(csr))
        self.progress("pending", f"Order placed for {', '.join(names)}.")
        answered: list[tuple[str, str]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # validated earlier (RFC 8555 7.1.4): nothing to answer
                answered.append(self._answer(authz))
            self.progress("validating", "The certificate authority is checking that the names lead to this box.")
            deadline = dt.datetime.now() + ORDER_DEADLINE
            order = _with_nonce_retry(lambda: self.acme.poll_and_finalize(order, deadline))
        finally:
            for kind, value in answered:
                if kind == HTTP_01:
                    self.sink.clear_http01(value)
                else:
                    self.sink.clear_tls_alpn01(value)
        return Issued(order.fullchain_pem.encode("ascii"), key_pem, tuple(names))

    def _answer(self, authz: messages.AuthorizationResource) -> tuple[str, str]:
        name = authz.body.identifier.value
        offered = {c.chall.typ: c for c in authz.body.challenges}
        prefer = [self.settings.challenge] + [t for t in (HTTP_01, TLS_ALPN_01) if t != self.settings.challenge]
        for typ in prefer:
            challb = offered.get(typ)
            if challb is None:
                continue
            chall = challb.chall
            assert isinstance(chall, challenges.KeyAuthorizationChallenge)
            key_authz = chall.key_authorization(self.key)
            if typ == HTTP_01:
                token = chall.encode("token")
                self.sink.set_http01(token, key_authz)
                ref = (HTTP_01, token)
            else:
                self.sink.set_tls_alpn01(name, key_authz)
                ref = (TLS_ALPN_01, name)
            self._submit(challb, chall.response(self.key))
            return ref
        raise AcmeProblem(f"The certificate authority offers no challenge this box can answer for {name} "
                          f"(offered: {', '.join(sorted(offered)) or 'none'}).")

    def _submit(self, challb: messages.ChallengeBody, response: challenges.ChallengeResponse) -> None:
        _with_nonce_retry(lambda: self.acme.answer_challenge(challb, response))

    def renewal_window(self, cert_pem: bytes) -> dt.datetime | None:
        """RFC 9773 (ARI): the suggested renewal time when the directory has renewalInfo, else None."""
        if "renewalInfo" not in self.acme.directory.to_partial_json():
            return None
        when, _next = self.acme.renewal_time(cert_pem)
        if when is None:
            return None
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


# --- errors in plain words -------------------------------------------------------------------------------

def _retry_after_text(when: dt.datetime | None) -> str:
    if when is None:
        return ""
    wait = max(0, int((when - dt.datetime.now(dt.UTC)).total_seconds()))
    if wait >= 3600:
        return f" Try again in about {wait // 3600} h {wait % 3600 // 60} min ({when:%Y-%m-%d %H:%M} UTC)."
    return f" Try again in about {max(1, wait // 60)} min ({when:%H:%M} UTC)."


def _challenge_problem(name: str, error: messages.Error, kind: str = "http-01") -> str:
    detail = (error.detail or "").strip()
    low = detail.lower()
    code = error.code or ""
    if "connection refused" in low:
        # From the challenge's type, not the detail: a random port or token in it may read ":443" or "tls".
        where = "port 443" if kind.startswith("tls") else "port 80"
        return (f"The certificate authority could not connect to {name} on {where} (connection refused): "
                f"open {where} on your router and forward it to this box. ({detail})")
    if code == "dns" or "no valid a records" in low or "nxdomain" in low or "no such host" in low:
        return (f"The certificate authority could not find {name} in the DNS: publish its A/AAAA record "
                f"pointing at this box. ({detail})")
    if "timeout" in low or "timed out" in low:
        return (f"The certificate authority's connection to {name} timed out: port 80 (or 443) is probably "
                f"not forwarded to this box. ({detail})")
    if code == "unauthorized" or code == "incorrectResponse":
        return (f"The certificate authority reached {name} but did not find this box's answer there: the name "
                f"probably points at another machine. ({detail})")
    return f"Validation of {name} failed: {detail or code}."


def explain(exc: BaseException, directory: str) -> AcmeProblem:  # noqa: C901  one plain-words answer per ACME problem type (RFC 8555 6.7); a flat list reads best
    """What went wrong, for a person (the web page, the CLI, the event log)."""
    if isinstance(exc, AcmeProblem):
        return exc
    if isinstance(exc, errors.ValidationError):
        lines = []
        for authz in exc.failed_authzrs:
            name = authz.body.identifier.value
            for challb in authz.body.challenges:
                if challb.error is not None:
                    lines.append(_challenge_problem(name, challb.error, challb.chall.typ))
                    break
            else:
                lines.append(f"Validation of {name} failed.")
        return AcmeProblem(" ".join(lines) or "Validation failed.", kind="validation")
    if isinstance(exc, messages.Error):
        code, detail = exc.code or "", (exc.detail or exc.description or "").strip()
        when = getattr(exc, "retry_after", None)
        if code == "rateLimited":
            return AcmeProblem(f"The certificate authority's rate limit was reached: {detail.rstrip('.')}."
                               + _retry_after_text(when), retry_after=when, kind="rate-limit")
        if code in ("externalAccountRequired", "unauthorized", "malformed") and "external account" in (
                detail.lower() + code.lower()):
            return AcmeProblem(f"The certificate authority refused the External Account Binding (check the key "
                               f"ID and HMAC key): {detail}", kind="eab")
        if code == "externalAccountRequired":
            return AcmeProblem("This certificate authority requires External Account Binding: enter the key ID "
                               "and HMAC key it gave you.", kind="eab")
        if code == "rejectedIdentifier":
            return AcmeProblem(f"The certificate authority will not issue for these names: {detail}", kind="names")
        return AcmeProblem(f"The certificate authority answered with an error ({code or 'unknown'}): {detail}",
                           retry_after=when, kind="ca-error")
    if isinstance(exc, requests.exceptions.SSLError):
        return AcmeProblem(f"The certificate authority at {directory} cannot be reached securely (its TLS "
                           f"certificate is not trusted): {exc}", kind="unreachable")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return AcmeProblem(f"The certificate authority at {directory} cannot be reached: check the box's internet "
                           "connection and the directory URL.", kind="unreachable")
    if isinstance(exc, errors.TimeoutError):
        return AcmeProblem("The certificate authority did not finish the order within "
                           f"{int(ORDER_DEADLINE.total_seconds())} s; it will be tried again.", kind="timeout")
    if isinstance(exc, (errors.ClientError, jose.errors.Error, ValueError)):
        return AcmeProblem(f"The certificate authority's answer could not be used: {exc}", kind="ca-error")
    return AcmeProblem(f"The order failed: {type(exc).__name__}: {exc}", kind="error")


def order_certificate(settings: AcmeSettings, acme_dir: Path, names: list[str], sink: ChallengeSink,
                      progress: Callable[[str, str], None] | None = None) -> Issued:
    """Blocking: a new EC P-256 key and a certificate for `names`; AcmeProblem on any failure."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        return AcmeOrder(settings, acme_dir, sink, progress).order(names, key_pem)
    except Exception as exc:
        problem = explain(exc, settings.directory)
        log.info("ACME order failed: %s (%s)", problem.message, type(exc).__name__)
        raise problem from exc


def ari_window(settings: AcmeSettings, acme_dir: Path, cert_pem: bytes) -> dt.datetime | None:
    """Blocking: the ARI renewal time (RFC 9773), or None when the CA has none (or cannot say now)."""
    try:
        order = AcmeOrder(settings, acme_dir, ChallengeSink(lambda a, b: None, lambda a: None,
                                                            lambda a, b: None, lambda a: None))
        return order.renewal_window(cert_pem)
    except Exception as exc:  # noqa: BLE001  ARI is advice: without it the lifetime rule decides
        log.info("ARI not available: %s", exc)
        return None


