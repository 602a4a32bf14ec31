from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from email.message import Message

import pytest

from db.mail.message import MailDeliveryError, RenderedMail
from db.mail.render import MailRenderer
from db.mail.transport import ConsoleTransport, SmtpTransport, make_transport
from db.settings import ConfigError, Settings
from tests.smtp import SmtpSink, free_port

CODE = "042917"
RECIPIENT = "alice@example.com"
MakeSettings = Callable[..., Settings]


def code_mail(settings: Settings) -> RenderedMail:
    return MailRenderer.from_settings(settings).render(
        "login_code", {"minutes": 10}, {"code": CODE}
    )


def alternatives(message: Message) -> list[str]:
    """The content types inside the multipart/alternative part, in order."""
    for part in message.walk():
        if part.get_content_type() == "multipart/alternative":
            return [sub.get_content_type() for sub in part.get_payload()]  # type: ignore[union-attr]
    raise AssertionError("no multipart/alternative part")


async def test_smtp_delivers_text_and_html(smtp: SmtpSink, make_settings: MakeSettings) -> None:
    settings = make_settings(**smtp.settings())
    transport = SmtpTransport.from_settings(settings)
    mail = code_mail(settings)

    await transport.send(recipient=RECIPIENT, mail=mail, message_id="<row-1@strawgate.example>")
    await transport.close()

    delivered = await smtp.wait_for(RECIPIENT)
    message = delivered.message
    assert delivered.envelope_to == [RECIPIENT]
    assert delivered.to == RECIPIENT
    assert delivered.subject == mail.subject
    assert message.get_all("Message-ID") == ["<row-1@strawgate.example>"]
    assert message["From"] == "Strawgate <strawgate@example.com>"
    assert alternatives(message) == ["text/plain", "text/html"]  # plain first
    assert delivered.text() == mail.text
    assert delivered.html() == mail.html
    assert delivered.code() == CODE
    for part in message.walk():
        if part.is_multipart():  # RFC 2045: no encoding on a multipart
            assert part["Content-Transfer-Encoding"] is None


async def test_smtp_sends_non_ascii(smtp: SmtpSink, make_settings: MakeSettings) -> None:
    settings = make_settings(**smtp.settings(), product_name="Strohtor Ümlaut")
    transport = SmtpTransport.from_settings(settings)
    mail = code_mail(settings)

    await transport.send(recipient=RECIPIENT, mail=mail, message_id="<row-2@strawgate.example>")

    delivered = await smtp.wait_for(RECIPIENT)
    assert delivered.subject == "Your sign-in code for Strohtor Ümlaut"
    assert "Strohtor Ümlaut" in delivered.text()
    assert delivered.code() == CODE


async def test_the_sender_name_defaults_to_the_product_name(
    smtp: SmtpSink, make_settings: MakeSettings
) -> None:
    settings = make_settings(**{**smtp.settings(), "mail_from_name": None}, product_name="Acme")
    transport = SmtpTransport.from_settings(settings)

    await transport.send(recipient=RECIPIENT, mail=code_mail(settings), message_id="<r@x.example>")

    assert (await smtp.wait_for(RECIPIENT)).message["From"] == "Acme <strawgate@example.com>"


def assert_no_content(error: MailDeliveryError, mail: RenderedMail) -> None:
    message = str(error)
    assert message
    assert len(message) < 200
    for secret in (CODE, RECIPIENT, mail.subject, "sign in"):
        assert secret not in message


async def test_a_server_that_is_down_fails_fast(make_settings: MakeSettings) -> None:
    port = free_port()  # nothing listens there
    settings = make_settings(
        mail_server="127.0.0.1",
        mail_port=port,
        mail_from="strawgate@example.com",
        mail_starttls=False,
        use_credentials=False,
    )
    transport = SmtpTransport.from_settings(settings)
    mail = code_mail(settings)

    started = time.monotonic()
    with pytest.raises(MailDeliveryError) as caught:
        await transport.send(recipient=RECIPIENT, mail=mail, message_id="<r@x.example>")

    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert_no_content(caught.value, mail)
    assert caught.value.__cause__ is None


async def test_a_refusing_server_is_a_delivery_error(
    smtp: SmtpSink, make_settings: MakeSettings
) -> None:
    settings = make_settings(**smtp.settings())
    transport = SmtpTransport.from_settings(settings)
    mail = code_mail(settings)
    smtp.refuse = True

    with pytest.raises(MailDeliveryError, match="451") as caught:
        await transport.send(recipient=RECIPIENT, mail=mail, message_id="<r@x.example>")

    assert_no_content(caught.value, mail)
    assert smtp.mails() == []


async def test_an_address_fastapi_mail_refuses_is_a_delivery_error(
    smtp: SmtpSink, make_settings: MakeSettings
) -> None:
    settings = make_settings(**smtp.settings())
    transport = SmtpTransport.from_settings(settings)

    with pytest.raises(MailDeliveryError, match="recipient") as caught:
        await transport.send(
            recipient="alice@mail.test", mail=code_mail(settings), message_id="<r@x.example>"
        )
    assert "alice" not in str(caught.value)


async def test_a_header_value_is_one_line(smtp: SmtpSink, make_settings: MakeSettings) -> None:
    settings = make_settings(**smtp.settings())
    transport = SmtpTransport.from_settings(settings)
    mail = code_mail(settings)
    bad = RenderedMail(subject="Hi\r\nBcc: x@example.com", text=mail.text, html=mail.html)

    with pytest.raises(ValueError, match="one line"):
        await transport.send(recipient=RECIPIENT, mail=bad, message_id="<r@x.example>")
    with pytest.raises(ValueError, match="one line"):
        await transport.send(recipient=RECIPIENT, mail=mail, message_id="<r@x>\nBcc: x@x.com")
    assert smtp.mails() == []


class ScriptedSmtp:
    """An SMTP server on loopback that answers everything until the end of DATA, then
    either never answers again ("hang") or accepts the mail and drops the connection at
    QUIT without a reply ("drop")."""

    def __init__(self, after_data: str) -> None:
        self.after_data = after_data
        self.data_received = asyncio.Event()
        self.closed_by_client = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    self.data_received.set()
                    if self.after_data == "drop":
                        writer.write(b"250 queued\r\n")
                continue
            command = line[:4].upper()
            if self.data_received.is_set():
                if command == b"QUIT" and self.after_data == "drop":
                    break  # no reply
                continue  # "hang": no reply ever
            elif command == b"DATA":
                in_data = True
                writer.write(b"354 go on\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        else:
            self.closed_by_client.set()
        writer.close()


@contextlib.asynccontextmanager
async def scripted_smtp(after_data: str) -> AsyncIterator[tuple[ScriptedSmtp, int]]:
    script = ScriptedSmtp(after_data)
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    async with server:
        yield script, server.sockets[0].getsockname()[1]


def scripted_settings(make_settings: MakeSettings, port: int) -> Settings:
    return make_settings(
        mail_server="127.0.0.1",
        mail_port=port,
        mail_from="strawgate@example.com",
        mail_starttls=False,
        use_credentials=False,
        mail_timeout=30.0,
    )


async def test_a_cancelled_send_stops_at_once_on_a_hung_server(
    make_settings: MakeSettings,
) -> None:
    async with scripted_smtp("hang") as (script, port):
        settings = scripted_settings(make_settings, port)
        transport = SmtpTransport.from_settings(settings)
        send = asyncio.create_task(
            transport.send(recipient=RECIPIENT, mail=code_mail(settings), message_id="<r@x.ex>")
        )
        await asyncio.wait_for(script.data_received.wait(), 5)

        started = time.monotonic()
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send  # not a MailDeliveryError after a QUIT that times out

        assert time.monotonic() - started < 2
        await asyncio.wait_for(script.closed_by_client.wait(), 5)


async def test_a_mail_the_server_accepted_is_sent_even_if_quit_fails(
    make_settings: MakeSettings,
) -> None:
    async with scripted_smtp("drop") as (script, port):
        settings = scripted_settings(make_settings, port)
        transport = SmtpTransport.from_settings(settings)

        await transport.send(recipient=RECIPIENT, mail=code_mail(settings), message_id="<r@x.ex>")

        assert script.data_received.is_set()


def test_settings_fastapi_mail_refuses_are_a_config_error(make_settings: MakeSettings) -> None:
    with pytest.raises(ConfigError, match="MAIL_FROM"):
        SmtpTransport.from_settings(make_settings(mail_server="127.0.0.1", mail_from="nobody"))
    with pytest.raises(ConfigError, match="MAIL_SERVER"):
        SmtpTransport.from_settings(make_settings(mail_from="a@example.com"))


async def test_the_console_backend_logs_the_mail(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    transport = ConsoleTransport(settings)
    mail = code_mail(settings)

    with caplog.at_level(logging.WARNING, logger="strawgate.mail.DEVELOPMENT"):
        await transport.send(recipient=RECIPIENT, mail=mail, message_id="<r@x.example>")
    await transport.close()

    [record] = [r for r in caplog.records if r.name == "strawgate.mail.DEVELOPMENT"]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    first_line = text.splitlines()[0]
    assert "DEVELOPMENT console mail backend" in first_line
    assert "NOT sent" in first_line
    assert f"To: {RECIPIENT}" in text
    assert f"Subject: {mail.subject}" in text
    assert f"\n{CODE}\n" in text


def test_the_console_backend_refuses_production(make_settings: MakeSettings) -> None:
    settings = make_settings(
        environment="production", mail_server="127.0.0.1", mail_from="a@example.com"
    )
    with pytest.raises(ConfigError, match="production"):
        ConsoleTransport(settings)


def test_make_transport_picks_smtp_when_a_server_is_set(
    smtp: SmtpSink, make_settings: MakeSettings
) -> None:
    assert isinstance(make_transport(make_settings(**smtp.settings())), SmtpTransport)
    production = make_settings(**smtp.settings(), environment="production")
    assert isinstance(make_transport(production), SmtpTransport)


def test_make_transport_falls_back_to_the_console_in_development_only(
    make_settings: MakeSettings,
) -> None:
    assert isinstance(make_transport(make_settings()), ConsoleTransport)
    with pytest.raises(ConfigError):
        make_transport(make_settings(environment="production"))
