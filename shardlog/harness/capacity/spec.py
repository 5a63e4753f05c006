"""What one capacity run asks for: the load at each point, and which parameter is swept."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

WORKLOADS = ("seq-write", "random-write", "read-heavy", "resync-storm", "churn")

#: Parameters that can be swept, by their command-line name → LoadSpec field.
SWEEPABLE = {
    "mirrors": "mirrors",
    "regions": "regions",
    "region-size": "region_size",
    "workers": "workers",
    "in-flight": "in_flight",
    "rate": "rate",
}


class SpecError(ValueError):
    """A load that cannot be run as described."""


@dataclass(frozen=True)
class LoadSpec:
    """The load at one point of a sweep."""

    mirrors: int = 100
    regions: int = 1024  # per mirror (per log)
    region_size: int = 1024  # sectors (512 KiB)
    workload: str = "random-write"
    integrated_flush: bool = False
    workers: int = 2
    in_flight: int = 64  # mirrors with a request outstanding at most (capped at mirrors)
    rate: float | None = None  # requests/s offered; None: as fast as the server answers
    duration: float = 5.0  # seconds of load
    reply_timeout: float = 10.0  # a request unanswered this long: the load failed

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise SpecError(f"workload {self.workload!r} is not one of {', '.join(WORKLOADS)}")
        for name in ("mirrors", "regions", "region_size", "workers", "in_flight"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name.replace('_', ' ')} must be at least 1")
        if self.region_size & (self.region_size - 1) or self.region_size < 8:
            raise SpecError("region size must be a power of two of at least 8 sectors")
        if self.rate is not None and self.rate <= 0:
            raise SpecError("rate must be positive")
        if self.duration <= 0 or self.reply_timeout <= 0:
            raise SpecError("duration and reply timeout must be positive")

    @property
    def effective_in_flight(self) -> int:
        return min(self.in_flight, self.mirrors)

    def with_value(self, parameter: str, value: float) -> LoadSpec:
        field_name = SWEEPABLE[parameter]
        return replace(self, **{field_name: value if field_name == "rate" else int(value)})

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``mirrors=1,10,100`` → ``("mirrors", [1, 10, 100])``."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in SWEEPABLE:
        raise SpecError(f"--sweep wants NAME=V1,V2,... with NAME one of "
                        f"{', '.join(SWEEPABLE)}; got {text!r}")
    try:
        numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"--sweep {text!r}: the values must be numbers") from None
    if not numbers:
        raise SpecError(f"--sweep {text!r} names no value")
    if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
        raise SpecError(f"--sweep {text!r}: give increasing values (the knee is the "
                        "largest one that holds)")
    return name, numbers
