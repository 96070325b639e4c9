"""The child process behind `math_equivalence`: math-verify, in the main thread of its own process.

math-verify bounds its work with signal.alarm, which only works in a main thread; called from
a worker thread (a Prefect task, a thread pool) it raises, and with its timeouts switched off
an answer like 2^{2^{40}} hangs the caller for good; and each of its checks ends with
signal.alarm(0), cancelling any alarm the trainer had set. Here its alarms work, harm nothing
else, and the parent can kill this process when even they do not fire (a long C computation).

Protocol, one JSON value per line: read [gold, answer]; write true, false, or null when the
gold answer is not something math-verify can read. The first line written is "ready".
Run as `python -P mathverify_server.py` (-P: this folder's regex.py must not shadow a module).
Imports only the standard library and math-verify, so that it starts fast.
"""

import json
import logging
import os
import sys
from functools import lru_cache

from math_verify import parse, verify

TIMEOUT_S = 1  # per parse and per comparison; signal.alarm takes whole seconds


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> list:
    # Each prompt is scored num_generations times against the same gold answer.
    return parse(gold, parsing_timeout=TIMEOUT_S)


def main() -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # a stray print in a library must not corrupt the protocol
    # math-verify logs each timeout with the whole answer in it; the parent reports instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    protocol.write('"ready"\n')
    for line in sys.stdin:
        gold, answer = json.loads(line)
        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            verdict = None
        else:
            verdict = verify(gold_parsed, parse(answer, parsing_timeout=TIMEOUT_S), timeout_seconds=TIMEOUT_S)
        protocol.write(json.dumps(verdict) + "\n")


if __name__ == "__main__":
    main()
