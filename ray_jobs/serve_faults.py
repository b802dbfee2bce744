"""Test faults of a serving replica's decoder, set by $NANOCHAT_SERVE_FAULT where the app is built
(docs/serving.md). Light on imports: the decoding process imports this module to build its hook."""

from __future__ import annotations

from collections.abc import Callable

from nanochat.infer.batch import Request
from nanochat.infer.sampling import request_seed

FAULT_ENV = "NANOCHAT_SERVE_FAULT"
FAULTS = ("step_raises", "decoder_dies")


class DecoderKilled(BaseException):
    """Escapes the decoding step's own error handling, as a bug in the decoding loop would."""


def parse_faults(spec: str) -> dict[int, str]:
    """{decoding seed: fault} of a spec "KIND:SEED,KIND:SEED"; raises ValueError on anything else."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, seed = item.partition(":")
        if kind not in FAULTS or not seed.lstrip("-").isdigit():
            raise ValueError(f"${FAULT_ENV}={spec!r}: each fault is KIND:SEED with KIND one of {', '.join(FAULTS)}")
        faults[request_seed(int(seed))] = kind  # the seed as the API passes it on
    return faults


def fault_hook(spec: str) -> Callable[[list[Request]], None] | None:
    """The decoder's `before_step` for a test fault: "step_raises:SEED" makes every decode step holding
    a request of that seed raise, "decoder_dies:SEED" ends the decoding process at such a step. Tied to
    a request's seed, not to a step count, so that a replacement replica (started with the same spec)
    fails only when a test asks it to."""
    faults = parse_faults(spec)
    if not faults:
        return None

    def before_step(requests: list[Request]) -> None:
        for request in requests:
            if faults.get(request.seed) == "step_raises":
                raise RuntimeError(f"{FAULT_ENV}: a decode step fails (a request of seed {request.seed})")
            if faults.get(request.seed) == "decoder_dies":
                raise DecoderKilled(f"{FAULT_ENV}: the decoding process dies (a request of seed {request.seed})")

    return before_step
