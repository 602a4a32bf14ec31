"""Each SMTP failure's cause, against real aiosmtpd servers: one WARNING with the reply."""

from __future__ import annotations

import base64
import datetime
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from db.mail.message import DeliveryFailure, MailDeliveryError, RenderedMail
from db.mail.outbox import DEGRADED_AFTER, MailSender, Outbox
from db.mail.transport import SmtpTransport
from db.session import Statements
from db.settings import Settings
from tests.conftest import MutableClock, OpenStatements, unique_email
from tests.mail.test_outbox import BOX, LEASE, StubRenderer, enqueue, row
from tests.smtp import SmtpSink, free_port

USERNAME = "mailer-login"
PASSWORD = "hunter2-Sm7p-PaSS"
PLAIN_BLOB = base64.b64encode(f"\0{USERNAME}\0{PASSWORD}".encode()).decode()


class Accepting:
    """Takes every mail."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class RefusingRecipient(Accepting):
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


class RefusingSender(Accepting):
    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        return f"553 5.7.1 <{address}>: Sender address rejected: not owned by user"


def refusing_login(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    """Refuses every login, echoing the login, the password and AUTH PLAIN's blob."""
    return AuthResult(
        success=False,
        handled=False,
        message=f"535 5.7.8 Authentication failed for {USERNAME} ({PASSWORD}) {PLAIN_BLOB}",
    )


def self_signed(folder: Path) -> ssl.SSLContext:
    """A server TLS context with a certificate nobody trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


@dataclass(frozen=True)
class Case:
    """A server set up to fail one way, the client's settings, and what the line says."""

    server: str
    settings: dict[str, Any]
    reason: DeliveryFailure
    says: tuple[str, ...]


CASES = {
    "refused-port": Case("nothing", {}, "connection_refused", ("nothing accepts connections",)),
    "no-greeting": Case("silent", {}, "timeout", ("no greeting within 1 s", "MAIL_SSL_TLS")),
    "starttls-not-offered": Case(
        "plain", {"mail_starttls": True}, "tls", ("does not offer STARTTLS", "it offers: ")
    ),
    "untrusted-certificate": Case(
        "starttls",
        {"mail_starttls": True, "validate_certs": True},
        "tls",
        ("certificate is not trusted (self-signed certificate)",),
    ),
    "tls-on-a-plain-port": Case(
        "plain", {"mail_ssl_tls": True}, "tls", ("TLS handshake failed (WRONG_VERSION_NUMBER)",)
    ),
    "login-refused": Case(
        "refusing-login",
        {"use_credentials": True},
        "auth",
        (
            "login refused: 535 5.7.8 Authentication failed for *** (***) ***",
            "check MAIL_USERNAME and MAIL_PASSWORD",
        ),
    ),
    "no-auth-offered": Case(
        "plain",
        {"use_credentials": True},
        "auth",
        ("the server offers no AUTH on an unencrypted connection", "MAIL_STARTTLS=true"),
    ),
    "recipient-refused": Case(
        "refusing-recipient",
        {},
        "rejected",
        ("the recipient was refused: 550 5.1.1 <u***@example.com>: Recipient address rejected",),
    ),
    "sender-refused": Case(
        "refusing-sender",
        {},
        "rejected",
        ("the sender was refused: 553 5.7.1 <s***@example.com>", "check MAIL_FROM"),
    ),
    "try-again-later": Case(
        "busy", {}, "unavailable", ("the mail was refused for now: 451 4.3.0 try again later",)
    ),
}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A 'mail server' that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield int(listener.getsockname()[1])


@pytest.fixture
def server(
    request: pytest.FixtureRequest, tmp_path: Path, silent_port: int
) -> Iterator[tuple[str, int]]:
    """The case's server running on loopback: its kind and port."""
    kind = request.param
    if kind == "nothing":
        yield kind, free_port()
        return
    if kind == "silent":
        yield kind, silent_port
        return
    if kind in ("plain", "busy"):
        sink = SmtpSink(refuse=kind == "busy")
        sink.start()
        try:
            yield kind, sink.port
        finally:
            sink.stop()
        return
    options: dict[str, Any] = {}
    handler: Accepting = Accepting()
    if kind == "starttls":
        options = {"tls_context": self_signed(tmp_path), "require_starttls": True}
    elif kind == "refusing-login":
        options = {"authenticator": refusing_login, "auth_require_tls": False}
    elif kind == "refusing-recipient":
        handler = RefusingRecipient()
    elif kind == "refusing-sender":
        handler = RefusingSender()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
    controller.start()
    try:
        yield kind, int(controller.port)
    finally:
        controller.stop()


def client_settings(
    make_settings: Callable[..., Settings], port: int, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "mail_server": "127.0.0.1",
        "mail_port": port,
        "mail_from": "sender@example.com",
        "mail_username": USERNAME,
        "mail_password": PASSWORD,
        "mail_starttls": False,
        "mail_ssl_tls": False,
        "use_credentials": False,
        "validate_certs": False,
        "mail_timeout": 1.0,
    }
    return make_settings(**{**values, **overrides})


@pytest.fixture
async def statements_(open_statements: OpenStatements) -> Statements:
    return await open_statements()


@pytest.fixture
async def make_sender(
    statements_: Statements, clock: MutableClock
) -> AsyncIterator[Callable[[SmtpTransport], MailSender]]:
    made: list[MailSender] = []

    def make(transport: SmtpTransport) -> MailSender:
        sender = MailSender(
            statements=statements_,
            outbox=Outbox(box=BOX, clock=clock, postgres=True),
            renderer=StubRenderer(),
            transport=transport,
            clock=clock,
            box=BOX,
            poll_seconds=5.0,
            batch_size=20,
            lease=LEASE,
            retry_max=timedelta(seconds=300),
            give_up_after=timedelta(hours=24),
            send_timeout=10.0,
        )
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.stop(grace=1.0)


@pytest.mark.parametrize(
    ("case", "server"),
    [(case, case.server) for case in CASES.values()],
    ids=list(CASES),
    indirect=["server"],
)
async def test_each_cause_is_one_warning_with_the_servers_reply(
    case: Case,
    server: tuple[str, int],
    make_settings: Callable[..., Settings],
    make_sender: Callable[[SmtpTransport], MailSender],
    statements_: Statements,
    clock: MutableClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _kind, port = server
    transport = SmtpTransport.from_settings(client_settings(make_settings, port, **case.settings))
    sender = make_sender(transport)
    failures: list[str] = []
    sender.on_failure = failures.append
    recipient = unique_email()
    outbox = Outbox(box=BOX, clock=clock, postgres=True)
    mail_id = await enqueue(statements_, outbox, to=recipient, code="913604", clock=clock)

    with caplog.at_level(logging.INFO, logger="strawgate.mail"):
        assert await sender.run_once() == 1

    assert failures == [case.reason]
    ours = [r for r in caplog.records if r.name.startswith("strawgate")]
    (warning,) = [r for r in ours if r.levelno >= logging.WARNING]
    line = warning.getMessage()
    assert warning.name == "strawgate.mail" and warning.levelno == logging.WARNING
    assert line.startswith(f"mail {mail_id} not delivered (attempt 1): ")
    assert f"SMTP {case.reason} (127.0.0.1:{port}): " in line, line
    for text in case.says:
        assert text in line, line
    stored = (await row(statements_, mail_id))["last_error"]
    assert stored and f"SMTP {case.reason} (127.0.0.1:{port})" in stored
    logged = "\n".join(r.getMessage() for r in caplog.records) + stored
    for secret in (PASSWORD, PLAIN_BLOB, recipient, "913604"):
        assert secret not in logged


async def test_a_reply_is_one_capped_line(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A reply's line breaks and control characters cannot forge a line of their own."""

    class Chatty(Accepting):
        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: Any
        ) -> str:
            return "550-5.1.1 first line\r\n550 5.1.1 " + "x" * 400 + "\x1b[31m"

    controller = Controller(Chatty(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        transport = SmtpTransport.from_settings(client_settings(make_settings, controller.port))
        with pytest.raises(MailDeliveryError) as caught:
            await transport.send(
                recipient=unique_email(),
                mail=RenderedMail(subject="s", text="t", html="<p>t</p>"),
                message_id="<r@x.example>",
            )
    finally:
        controller.stop()
    message = str(caught.value)
    assert caught.value.reason == "rejected"
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert "550 5.1.1 first line" in message
    assert len(message) < 255


async def test_failures_in_a_row_degrade_mail_until_one_goes_out(
    make_settings: Callable[..., Settings],
    make_sender: Callable[[SmtpTransport], MailSender],
    statements_: Statements,
    smtp: SmtpSink,
    clock: MutableClock,
) -> None:
    smtp.refuse = True
    sender = make_sender(SmtpTransport.from_settings(make_settings(**smtp.settings())))
    outbox = Outbox(box=BOX, clock=clock, postgres=True)
    recipient = unique_email()
    await enqueue(statements_, outbox, to=recipient)
    for _ in range(DEGRADED_AFTER):
        assert sender.degraded is None
        assert await sender.run_once() == 1
        clock.advance(minutes=10)
    assert sender.degraded == "unavailable"

    smtp.refuse = False
    assert await sender.run_once() == 1
    assert len(smtp.mails(recipient)) == 1
    assert sender.degraded is None
