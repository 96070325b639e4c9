"""Final answers: pulling them out of worked solutions and putting numbers in one form.

Shared by data prep (gold answers) and the rewards (model answers), so that both sides of a
comparison are normalised the same way.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

GSM8K_MARKER = "####"
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def split_gsm8k(text: str) -> tuple[str, str] | None:
    """'worked solution\\n#### 72' -> ('worked solution', '72'); None without a marker."""
    if GSM8K_MARKER not in text:
        return None
    solution, _, final = text.rpartition(GSM8K_MARKER)
    solution = _CALCULATOR.sub("", solution).strip()
    return solution, final.strip()


def normalize_number(text: str) -> str | None:
    """'1,080' -> '1080', '$18.50' -> '18.5', '7.0' -> '7'; None when it is not one number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
