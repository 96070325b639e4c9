"""Final answers: pulling them out of worked solutions and putting numbers in one form.

Shared by data prep (gold answers) and the rewards (model answers), so that both sides of a
comparison are normalised the same way.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

GSM8K_MARKER = "####"
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24
# One number as people write it: a minus sign and a dollar sign in either order ('-$5', '$-5', '$ 18'),
# digits with commas only between groups of three ('1,080', '12,345,678'), a decimal part, and a full
# stop that ends a sentence ('18.'). Nothing else is taken out: '2, 3', '1,00', '1 000' and '12,34' are
# not one number (each could be two, or a decimal comma), so they are not read as 23, 100, 1000 or 1234.
_NUMBER = re.compile(r"(-?)(?:\$\s*)?(-?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\.?")


def split_gsm8k(text: str) -> tuple[str, str] | None:
    """'worked solution\\n#### 72' -> ('worked solution', '72'); None without a marker."""
    if GSM8K_MARKER not in text:
        return None
    solution, _, final = text.rpartition(GSM8K_MARKER)
    solution = _CALCULATOR.sub("", solution).strip()
    return solution, final.strip()


def normalize_number(text: str) -> str | None:
    """'1,080' -> '1080', '$18.50' -> '18.5', '7.0' -> '7', '-$5' -> '-5'; None when it is not one
    number written as above ('2, 3', '1,00', 'NaN', 'Infinity', '1e5', '')."""
    m = _NUMBER.fullmatch(text.strip())
    if m is None:
        return None
    minus_before, minus_after, whole, decimals = m.groups()  # '-$5' or '$-5'
    if minus_before and minus_after:
        return None
    try:
        value = Decimal(minus_before + minus_after + whole.replace(",", "") + (decimals or ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
