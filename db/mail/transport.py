"""Transports: SMTP through fastapi-mail, and a console backend for development."""

from __future__ import annotations

import logging
import math
from email.message import Message

import aiosmtplib
from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
from fastapi_mail.connection import Connection
from fastapi_mail.errors import ConnectionErrors
from fastapi_mail.schemas import MultipartSubtypeEnum
from pydantic import ValidationError

from db.mail.message import MailDeliveryError, MailTransport, RenderedMail
from db.settings import ConfigError, Settings

# The development console backend logs whole mails, codes included: the one logger in
# the project allowed to. ConsoleTransport refuses to exist in production.
console_log = logging.getLogger("strawgate.mail.DEVELOPMENT")
log = logging.getLogger("strawgate.mail")


class SmtpTransport:
    """Sends through an SMTP server with fastapi-mail, one connection per mail."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self.fastmail = FastMail(config)
        self.server = f"{config.MAIL_SERVER}:{config.MAIL_PORT}"

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
            raise MailDeliveryError(f"recipient address refused (to {self.server})") from None
        message = await self.fastmail.get_message(schema)
        if not isinstance(message, Message):  # pragma: no cover - one schema, one message
            raise TypeError("fastapi-mail built no single message")
        _tidy(message, recipient=recipient, message_id=message_id)
        connection = Connection(self.config)
        try:
            # fastapi-mail's connect, STARTTLS and login; it wraps their failures.
            await connection.__aenter__()
        except ConnectionErrors as exc:
            _drop(connection)
            raise MailDeliveryError(self._describe(exc.__context__, "connection failed")) from None
        except BaseException:
            _drop(connection)
            raise
        # Not `async with connection`: its exit sends QUIT even after a failure or a
        # cancellation, waiting up to TIMEOUT on a server that hangs, and a timeout there
        # would replace the CancelledError.
        session = connection.session
        try:
            try:
                await session.send_message(message)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise MailDeliveryError(self._describe(exc, "sending failed")) from None
            try:
                await session.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                # The server took the mail; sending it again would deliver it twice.
                log.info("SMTP QUIT failed after %s accepted a mail", self.server)
        finally:
            session.close()

    def _describe(self, error: BaseException | None, what: str) -> str:
        # Type and SMTP reply code only: never the mail, the recipient or a server's
        # reply text (it may echo either).
        detail = type(error).__name__ if error is not None else "unknown error"
        if isinstance(error, aiosmtplib.SMTPResponseException):
            detail += f", reply {error.code}"
        elif isinstance(error, aiosmtplib.SMTPRecipientsRefused):
            detail += ", recipient refused"
        return f"SMTP {what} ({self.server}): {detail}"

    async def close(self) -> None:
        """Nothing held open: fastapi-mail connects per send."""


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


def _drop(connection: Connection) -> None:
    session = getattr(connection, "session", None)
    if session is not None:
        session.close()


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
