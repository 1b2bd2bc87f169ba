"""What this machine can hold: checked before an allocation that could get the process killed.

An allocation past the machine's memory does not raise: the kernel kills the process. So the
big ones (a new model's weights, a conversion of the decode step) compare their estimate with
MemAvailable first, and a too-large one is a UserError (or a fallback) instead.
"""


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def size(n: float) -> str:
    """A byte count for people: 12.3 MiB, 1.5 GiB (gib() is for the sizes of whole models)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"
