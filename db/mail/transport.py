"""Transports: SMTP through fastapi-mail, and a console backend for development."""

from __future__ import annotations

import base64
import logging
import math
import re
import socket
import ssl
import unicodedata
from collections.abc import Callable
from email.message import Message
from typing import Literal

import aiosmtplib
from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
from fastapi_mail.schemas import MultipartSubtypeEnum
from pydantic import ValidationError

from db.mail.message import (
    DeliveryFailure,
    MailDeliveryError,
    MailTransport,
    RenderedMail,
    mask_address,
)
from db.settings import ConfigError, Settings

# The development console backend logs whole mails, codes included: the one logger in
# the project allowed to. ConsoleTransport refuses to exist in production.
console_log = logging.getLogger("strawgate.mail.DEVELOPMENT")
log = logging.getLogger("strawgate.mail")

REPLY_MAX = 160
_Step = Literal["connect", "starttls", "login", "send"]
_ADDRESS = re.compile(r"[^\s<>\"'(),;:@\[\]]+@[A-Za-z0-9.-]+")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_NAMES = {"starttls": "STARTTLS", "login": "AUTH", "send": "the mail"}


class SmtpTransport:
    """Builds each mail with fastapi-mail and sends it with aiosmtplib, one connection each."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.fastmail = FastMail(config)
        self.server = f"{config.MAIL_SERVER}:{config.MAIL_PORT}"
        username, password = config.MAIL_USERNAME, config.MAIL_PASSWORD.get_secret_value()
        plain = {form for form in (username, password) if form}
        if plain:
            plain.add(f"\0{username}\0{password}")
        encoded = {base64.b64encode(form.encode()).decode() for form in plain}
        encoded |= {form.rstrip("=") for form in encoded}
        self._credentials = sorted(
            {username, password} - {""} | {form for form in encoded if len(form) >= 8},
            key=len,
            reverse=True,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpTransport:
        if not settings.mail_server or not settings.mail_from:
            raise ConfigError("MAIL_SERVER and MAIL_FROM must be set to send mail over SMTP")
        try:
            # ConnectionConfig is a BaseSettings: every field is given here, so nothing
            # is read past our Settings (a stray SUPPRESS_SEND=1 would drop every mail).
            config = ConnectionConfig(
                MAIL_SERVER=settings.mail_server,
                MAIL_PORT=settings.mail_port,
                MAIL_USERNAME=settings.mail_username,
                MAIL_PASSWORD=settings.mail_password,
                MAIL_FROM=settings.mail_from,
                MAIL_FROM_NAME=settings.mail_from_name or settings.product_name,
                MAIL_STARTTLS=settings.mail_starttls,
                MAIL_SSL_TLS=settings.mail_ssl_tls,
                USE_CREDENTIALS=settings.use_credentials,
                VALIDATE_CERTS=settings.validate_certs,
                # aiosmtplib's timeout per step (connect, each command); an int here.
                TIMEOUT=max(1, math.ceil(settings.mail_timeout)),
                MAIL_DEBUG=0,
                SUPPRESS_SEND=0,
                TEMPLATE_FOLDER=None,
                LOCAL_HOSTNAME=None,
                CERT_BUNDLE=None,
            )
        except ValidationError as exc:
            fields = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
            raise ConfigError(
                f"fastapi-mail refuses the mail settings: {', '.join(fields)}"
            ) from None
        return cls(config)

    async def send(self, *, recipient: str, mail: RenderedMail, message_id: str) -> None:
        for header in (mail.subject, message_id):
            if "\r" in header or "\n" in header:
                raise ValueError("a header value must be one line")
        try:
            schema = MessageSchema(
                subject=mail.subject,
                recipients=[recipient],
                body=mail.text,
                alternative_body=mail.html,
                subtype=MessageType.plain,
                multipart_subtype=MultipartSubtypeEnum.alternative,
                # The lower-case key makes fastapi-mail use it instead of making one
                # (make_msgid() looks up the host name, blocking the loop).
                headers={"message-id": message_id},
            )
        except ValidationError:
            # fastapi-mail's address rules (email-validator, offline) refuse it.
            raise MailDeliveryError(
                f"SMTP rejected ({self.server}): fastapi-mail refuses the recipient address"
                " (nothing was sent)",
                "rejected",
            ) from None
        message = await self.fastmail.get_message(schema)
        if not isinstance(message, Message):  # pragma: no cover - one schema, one message
            raise TypeError("fastapi-mail built no single message")
        _tidy(message, recipient=recipient, message_id=message_id)
        config = self.config
        session = aiosmtplib.SMTP(
            hostname=config.MAIL_SERVER,
            port=config.MAIL_PORT,
            timeout=config.TIMEOUT,
            use_tls=config.MAIL_SSL_TLS,
            start_tls=False,
            validate_certs=config.VALIDATE_CERTS,
            local_hostname=config.LOCAL_HOSTNAME,
            cert_bundle=config.CERT_BUNDLE,
        )
        step: _Step = "connect"
        try:
            await session.connect()
            if config.MAIL_STARTTLS:
                step = "starttls"
                await session.starttls()
            if config.USE_CREDENTIALS:
                step = "login"
                await session.login(config.MAIL_USERNAME, config.MAIL_PASSWORD.get_secret_value())
            step = "send"
            await session.send_message(message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            failure = self._failure(step, exc, session)
            session.close()
            raise failure from None
        except BaseException:
            session.close()
            raise
        try:
            await session.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            # The server took the mail; sending it again would deliver it twice.
            log.info("SMTP QUIT failed after %s accepted a mail", self.server)
        finally:
            session.close()

    def _failure(
        self, step: _Step, error: BaseException, session: aiosmtplib.SMTP
    ) -> MailDeliveryError:
        reason, what = _classify(step, error, session, self.config.TIMEOUT, self._reply)
        return MailDeliveryError(f"SMTP {reason} ({self.server}): {what}", reason)

    def _reply(self, code: int | None, text: str) -> str:
        """The server's reply, with no credential, no whole address and no control character."""
        text = " ".join(_strip_controls(text).split())
        # Servers echo what they were sent: the login and the password, as typed or in
        # base64 (AUTH PLAIN and LOGIN), and long base64 runs may be either.
        for secret in self._credentials:
            text = text.replace(secret, "***")
        text = _BASE64_RUN.sub(_redact_base64, text)
        text = _ADDRESS.sub(lambda found: mask_address(found.group(0)), text)
        if len(text) > REPLY_MAX:
            text = text[:REPLY_MAX] + "…"
        return f"{code} {text}".strip() if code is not None else text

    async def close(self) -> None:
        """Nothing held open: each send connects."""


def _tidy(message: Message, *, recipient: str, message_id: str) -> None:
    """Fix what fastapi-mail 1.6 gets wrong in the message it builds (get_message() is its
    hook for post-processing before sending)."""
    # It writes Message-ID twice (its own field and again from `headers`).
    del message["Message-ID"]
    message["Message-ID"] = message_id
    # It names the recipient after the address's local part ("bob <bob@example.com>").
    del message["To"]
    message["To"] = recipient
    # It gives multipart containers "Content-Transfer-Encoding: base64", which RFC 2045
    # forbids: a strict reader would try to decode the boundaries.
    for part in message.walk():
        if part.is_multipart():
            del part["Content-Transfer-Encoding"]


def _classify(
    step: _Step,
    error: BaseException,
    session: aiosmtplib.SMTP,
    timeout: float,
    reply: Callable[[int | None, str], str],
) -> tuple[DeliveryFailure, str]:
    """The cause of a failed send and what it says, from where it failed and how."""
    cause = error.__cause__
    if isinstance(error, TimeoutError):
        if step == "connect" and isinstance(cause, aiosmtplib.SMTPReadTimeoutError):
            return "timeout", (
                f"connected, but no greeting within {timeout} s; a server that speaks TLS"
                " from the start (port 465) needs MAIL_SSL_TLS=true and MAIL_STARTTLS=false"
            )
        if step == "connect":
            return "timeout", (
                f"no connection within {timeout} s; check MAIL_SERVER, MAIL_PORT and the firewall"
            )
        return "timeout", f"no answer to {_NAMES[step]} within {timeout} s"
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused) and error.recipients:
        first = error.recipients[0]
        answer = reply(first.code, first.message)
        return _refusal(first.code), _refused("the recipient", first.code, answer)
    if isinstance(error, aiosmtplib.SMTPResponseException):
        answer = reply(error.code, error.message)
        if step == "connect":
            return _refusal(error.code), f"the server refused the connection: {answer}"
        if step == "starttls":
            return "tls", f"STARTTLS refused: {answer}"
        if step == "login":
            return "auth", f"login refused: {answer}; check MAIL_USERNAME and MAIL_PASSWORD"
        if isinstance(error, aiosmtplib.SMTPSenderRefused):
            return _refusal(error.code), (
                _refused("the sender", error.code, answer)
                + "; check MAIL_FROM (servers often take only their own domains, or the"
                " login's own address)"
            )
        if isinstance(error, aiosmtplib.SMTPRecipientRefused):
            return _refusal(error.code), _refused("the recipient", error.code, answer)
        return _refusal(error.code), _refused("the mail", error.code, answer)
    if step == "connect" and isinstance(error, aiosmtplib.SMTPConnectError):
        error = cause if isinstance(cause, OSError) else error
    if isinstance(error, ssl.SSLCertVerificationError):
        return "tls", (
            f"the server's certificate is not trusted ({error.verify_message}); check"
            " MAIL_SERVER is the name on its certificate (VALIDATE_CERTS=false only for a"
            " server you trust on a network you trust)"
        )
    if isinstance(error, ssl.SSLError):
        return "tls", (
            f"the TLS handshake failed ({error.reason or type(error).__name__}); port 465"
            " needs MAIL_SSL_TLS=true, ports 587 and 25 MAIL_SSL_TLS=false with MAIL_STARTTLS"
        )
    if isinstance(error, ConnectionRefusedError):
        return "connection_refused", (
            "connection failed: nothing accepts connections there; check MAIL_SERVER and"
            " MAIL_PORT, and that the mail server runs"
        )
    if isinstance(error, socket.gaierror):
        return "other", "connection failed: MAIL_SERVER's host name does not resolve"
    if step == "starttls" and type(error) is aiosmtplib.SMTPException:
        return "tls", (
            f"the server does not offer STARTTLS (it offers: {_extensions(session)}); check"
            " MAIL_PORT (587 offers STARTTLS) and MAIL_STARTTLS"
        )
    if step == "login" and type(error) is aiosmtplib.SMTPException:
        if not session.supports_extension("auth"):
            plain = not session.is_connected or session.get_transport_info("sslcontext") is None
            return "auth", (
                "the server offers no AUTH"
                + (" on an unencrypted connection" if plain else "")
                + f" (it offers: {_extensions(session)}); set MAIL_STARTTLS=true (or"
                " MAIL_SSL_TLS=true), or USE_CREDENTIALS=false if it needs no login"
            )
        methods = ", ".join(sorted(session.server_auth_methods)) or "none"
        return "auth", f"no AUTH method in common (the server offers: {methods})"
    if isinstance(error, aiosmtplib.SMTPNotSupported):
        return "rejected", "the server cannot take this mail (it does not offer SMTPUTF8)"
    if isinstance(error, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        where = "before its greeting" if step == "connect" else f"during {_NAMES[step]}"
        return "other", f"the server closed the connection {where}"
    if isinstance(error, OSError):
        return "other", f"connection failed ({type(error).__name__}: {error.strerror})"
    return "other", f"{type(error).__name__} during {_NAMES.get(step, 'the connection')}"


def _refusal(code: int) -> DeliveryFailure:
    if 400 <= code < 500:
        return "unavailable"
    if 500 <= code < 600:
        return "rejected"
    return "other"


def _refused(what: str, code: int, answer: str) -> str:
    return f"{what} was refused{' for now' if 400 <= code < 500 else ''}: {answer}"


def _extensions(session: aiosmtplib.SMTP) -> str:
    return ", ".join(sorted(name.upper() for name in session.esmtp_extensions)) or "nothing"


def _redact_base64(found: re.Match[str]) -> str:
    run = found.group(0)
    looks_encoded = any(ch.isdigit() or ch in "+/=" for ch in run) or (
        any(ch.islower() for ch in run) and any(ch.isupper() for ch in run[1:])
    )
    return "***" if looks_encoded else run


def _strip_controls(text: str) -> str:
    return "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)


class ConsoleTransport:
    """Development only: logs each mail (codes included) instead of sending it."""

    def __init__(self, settings: Settings) -> None:
        if settings.is_production:
            raise ConfigError(
                "The console mail backend logs codes and cannot run in production: set MAIL_SERVER"
            )

    async def send(self, *, recipient: str, mail: RenderedMail, message_id: str) -> None:
        console_log.warning(
            "DEVELOPMENT console mail backend: this mail is NOT sent, only printed here "
            "(set MAIL_SERVER to send mail)\nTo: %s\nSubject: %s\nMessage-ID: %s\n\n%s",
            recipient,
            mail.subject,
            message_id,
            mail.text,
        )

    async def close(self) -> None:
        """Nothing to close."""


def make_transport(settings: Settings) -> MailTransport:
    """SMTP when MAIL_SERVER is set, else the development console backend."""
    if settings.mail_server:
        return SmtpTransport.from_settings(settings)
    return ConsoleTransport(settings)
