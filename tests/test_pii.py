"""Tests for PII redaction: what each pattern replaces, what it must leave alone, the counts."""

from __future__ import annotations

import pytest

from domainlm.corpus.pii import _luhn, redact
from domainlm.recipe import PIIConfig

ALL = PIIConfig()


def red(text: str, cfg: PIIConfig = ALL) -> str:
    return redact(text, cfg)[0]


@pytest.mark.parametrize(
    "email",
    ["john.doe@example.com", "a+tag@mail.example.co.uk", "first_last-1@sub-domain.org"],
)
def test_emails(email: str) -> None:
    assert red(f"Write to {email}, or call.") == "Write to <EMAIL>, or call."
    assert red(f"<{email}>") == "<<EMAIL>>"


@pytest.mark.parametrize(
    "text",
    [
        "@property decorators and @dataclass",
        "user@localhost has no top-level domain",
        "y = a@b.T  # matrix product",
        "twitter handle @someone.",
    ],
)
def test_not_emails(text: str) -> None:
    assert red(text) == text


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",  # Visa test number
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555 5555 5555 4444",  # Mastercard test number
        "3782 822463 10005",  # Amex test number (4-6-5)
        "6011111111111117",  # Discover test number
    ],
)
def test_cards_that_pass_luhn(card: str) -> None:
    text, counts = redact(f"Card: {card}.", ALL)
    assert text == "Card: <CARD>."
    assert counts["card"] == 1 and counts["phone"] == 0


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # fails the Luhn check
        "4111111111111112",
        "1705312345678",  # a millisecond timestamp (13 digits, passes Luhn, no issuer)
        "4111 1111 1111",  # 12 digits
        "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6",  # a list of numbers
        "41111111111111111111",  # 20 digits
    ],
)
def test_not_cards(text: str) -> None:
    assert red(text) == text


def test_luhn() -> None:
    assert _luhn("4111111111111111")
    assert _luhn("79927398713")
    assert not _luhn("4111111111111112")
    assert not _luhn("79927398710")


def test_card_is_not_taken_for_a_phone() -> None:
    text, counts = redact("pay with 4111-1111-1111-1111 today", ALL)
    assert text == "pay with <CARD> today"
    assert counts == {"email": 0, "card": 1, "phone": 0, "ip": 0}


@pytest.mark.parametrize(
    "phone",
    [
        "(555) 123-4567",
        "(555)123-4567",
        "555-123-4567",
        "555.123.4567",
        "1-800-555-1234",
        "+1 555 123 4567",
        "+1 (555) 123-4567",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+49 30 123456",
        "+4915112345678",
        "+33 1 23 45 67 89",
    ],
)
def test_phones(phone: str) -> None:
    text, counts = redact(f"Call {phone} now.", ALL)
    assert text == "Call <PHONE> now."
    assert counts["phone"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "Released in 2024 with Python 3.11.7.",
        "Meeting on 2024-01-15 at 10:30.",
        "id = 5551234567",  # a 10-digit integer in code
        "count = 1234567890123",
        "SSN-like 123-45-6789 and ISO 2024-01-15T10:00",
        "version 555.123.4567.8 of the schema",
        "range 1990-2024, pages 123-456",
        "x+1 2 3",  # arithmetic, not a phone
        "serial A555-123-4567",
        "total +12 items",
        "in the form '+000000120'",  # a signed, zero-padded number
    ],
)
def test_not_phones(text: str) -> None:
    assert red(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host 192.168.1.1 is down", "host <IP> is down"),
        ("from 10.0.0.255.", "from <IP>."),
        ("0.0.0.0 and 255.255.255.255", "<IP> and <IP>"),
        ("addr 2001:db8::1 here", "addr <IP> here"),
        ("link-local fe80::1ff:fe23:4567:890a%eth0", "link-local <IP>%eth0"),
        ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "full <IP>."),
        ("url http://[2001:db8::1]:8080/", "url http://[<IP>]:8080/"),
        ("mapped ::ffff:192.0.2.1 ok", "mapped <IP> ok"),
    ],
)
def test_ips(text: str, expected: str) -> None:
    assert red(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3.4.5 of the tool",
        "not an address 256.1.1.1 or 1.2.3",
        "std::vector<int> and crate::module::item",
        "a[1::2] and b[::2] and dead::beef",
        "at 12:30:45 with MAC 00:1a:2b:3c:4d:5e",
        "v1.2.3.4",
    ],
)
def test_not_ips(text: str) -> None:
    assert red(text) == text


def test_counts_cover_enabled_kinds_with_zeros() -> None:
    text = "a@b.com, c@d.org, 192.168.0.1, (555) 123-4567"
    assert redact(text, ALL)[1] == {"email": 2, "card": 0, "phone": 1, "ip": 1}
    only_email = PIIConfig(phones=False, ips=False, cards=False)
    out, counts = redact(text, only_email)
    assert counts == {"email": 2}
    assert out == "<EMAIL>, <EMAIL>, 192.168.0.1, (555) 123-4567"
    none = PIIConfig(emails=False, phones=False, ips=False, cards=False)
    assert redact(text, none) == (text, {})


def test_text_without_pii_is_returned_unchanged() -> None:
    text = "Nothing personal here: just words, 42 numbers and a 3.5 ratio."
    assert redact(text, ALL) == (text, {"email": 0, "card": 0, "phone": 0, "ip": 0})


def test_long_digit_runs_do_not_blow_up() -> None:
    # Catastrophic backtracking would take minutes on these.
    text = ("+" + "1" * 40 + " ") * 200 + ("12345678901234567890" * 50 + " ") * 20
    assert red(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4111 1111 1111 1111", "<CARD>"),
        ("555-123-4567", "<PHONE>"),
        ("(555) 123-4567\nnext", "<PHONE>\nnext"),
        ("+1 555 123 4567", "<PHONE>"),
        ("192.168.1.1", "<IP>"),
        ("2001:db8::1", "<IP>"),
        ("a@b.com", "<EMAIL>"),
    ],
)
def test_pii_at_the_start_of_the_text(text: str, expected: str) -> None:
    assert red(text) == expected
