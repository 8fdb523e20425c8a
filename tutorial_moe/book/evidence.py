"""The book's one evidence protocol (BOOK_STANDARD section 3).

Every comparison in the book goes through :func:`compare`: two conditions measured on the same
seeds (paired), the mean paired difference, its 95 % Student-t interval, and a verdict computed
from them. A claim that is a mechanism or an identity rather than a comparison goes through
:func:`shown`. The verdict words are the constants below; chapters never type them.

Rules for ``compare(a, b, predicted)`` with d = a - b per seed:

* **holds**: the interval excludes 0 in the predicted direction (``">"``: low > 0).
* **fails**: the interval excludes 0 in the opposite direction; or a practical ``margin`` m was
  given and the whole interval lies inside (-m, m): whatever the sign, the effect is too small
  to matter (this takes precedence over "holds": with a margin, an effect below it is not the
  effect the claim is about).
* **inconclusive**: neither; ``detectable`` is the smallest |effect| this run could have told
  from 0 (the interval's half-width).
* **not reproduced at this scale**: set by passing ``scale_note`` (what differs from the seed's
  setting); the statistics are still computed and shown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "HOLDS",
    "FAILS",
    "INCONCLUSIVE",
    "NOT_REPRODUCED",
    "SHOWN",
    "VERDICTS",
    "Evidence",
    "compare",
    "shown",
    "t_quantile",
]

HOLDS = "holds"
FAILS = "fails"
INCONCLUSIVE = "inconclusive"
NOT_REPRODUCED = "not reproduced at this scale"
SHOWN = "shown"
#: Every verdict the protocol can give, in the order tables list them.
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_REPRODUCED, SHOWN)

_PREDICTIONS = (">", "<")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p!r} must lie strictly between 0 and 1")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: df={df!r} must be an int >= 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Evidence:
    """What the protocol concluded about one claim.

    ``diff`` is the mean of a - b over seeds, ``ci`` its 95 % interval, ``n`` the number of pairs,
    ``detectable`` the interval's half-width. For :func:`shown`, ``value`` is the measured quantity
    and the statistics are None.
    """

    verdict: str
    diff: float | None = None
    ci: tuple[float, float] | None = None
    n: int = 0
    predicted: str | None = None
    margin: float | None = None
    detectable: float | None = None
    value: float | None = None
    what: str = ""
    note: str = ""

    def summary(self, digits: int = 3) -> str:
        """The measured part of :meth:`__str__` without the verdict."""
        if self.diff is None:
            quantity = f"{self.value:.{digits}g}" if isinstance(self.value, float) else f"{self.value}"
            return f"{self.what + ': ' if self.what else ''}{quantity}"
        lo, hi = self.ci
        text = (f"{self.what + ': ' if self.what else ''}mean paired difference "
                f"{self.diff:+.{digits}f} (95 % CI {lo:+.{digits}f} to {hi:+.{digits}f}, n = {self.n})")
        if self.margin is not None:
            text += f", practical margin {self.margin:.{digits}g}"
        if self.verdict == INCONCLUSIVE:
            text += f"; smallest detectable effect about {self.detectable:.{digits}f}"
        return text

    def __str__(self) -> str:
        text = f"{self.summary()} -> {self.verdict}"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict:
        """JSON-ready fields (for ``save_results``)."""
        return {"verdict": self.verdict, "diff": self.diff, "ci": None if self.ci is None else list(self.ci),
                "n": self.n, "predicted": self.predicted, "margin": self.margin,
                "detectable": self.detectable, "value": self.value, "what": self.what,
                "note": self.note, "text": str(self)}


def _as_values(name: str, values) -> list[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"compare: {name} must be a sequence of numbers (one per seed), got {values!r:.80}") from err
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"compare: {name} has non-finite values {bad}; every seed's value must be finite")
    return out


def compare(a, b, predicted: str, *, margin: float | None = None, what: str = "",
            scale_note: str | None = None, level: float = 0.95) -> Evidence:
    """Paired comparison of condition ``a`` with condition ``b`` (one value per seed each).

    ``predicted`` is ``">"`` when the claim says a > b, ``"<"`` when it says a < b. ``margin`` is
    an optional practical margin (> 0, in the values' units). ``scale_note`` marks the claim as not
    reproduced at this scale and says why. Raises ``ValueError`` on fewer than 2 pairs, unequal
    lengths, non-finite values, an unknown ``predicted`` or a bad margin.
    """
    if predicted not in _PREDICTIONS:
        raise ValueError(f"compare: predicted={predicted!r} is unknown; use '>' (a > b) or '<' (a < b)")
    xs, ys = _as_values("a", a), _as_values("b", b)
    if len(xs) != len(ys):
        raise ValueError(f"compare: a has {len(xs)} values and b has {len(ys)}; they must be paired by seed")
    if len(xs) < 2:
        raise ValueError(f"compare: got {len(xs)} pair(s); an interval needs at least 2 paired seeds")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin) or margin <= 0):
        raise ValueError(f"compare: margin={margin!r} must be a finite number > 0, or None")
    if scale_note is not None and (not isinstance(scale_note, str) or not scale_note.strip()):
        raise ValueError("compare: scale_note must say what differs from the seed's setting (a non-empty str)")
    if not 0.5 < level < 1.0:
        raise ValueError(f"compare: level={level!r} must lie between 0.5 and 1")
    d = [x - y for x, y in zip(xs, ys)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    toward = lo > 0 if predicted == ">" else hi < 0
    against = hi < 0 if predicted == ">" else lo > 0
    if scale_note is not None:
        verdict = NOT_REPRODUCED
    elif margin is not None and -margin < lo and hi < margin:
        verdict = FAILS
    elif toward:
        verdict = HOLDS
    elif against:
        verdict = FAILS
    else:
        verdict = INCONCLUSIVE
    return Evidence(verdict, mean, (lo, hi), n, predicted, None if margin is None else float(margin), half,
                    what=what, note=scale_note or "")


def shown(value, what: str = "") -> Evidence:
    """A mechanism or identity, demonstrated by the measured ``value`` (no interval needed)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"shown: value={value!r} must be finite")
    return Evidence(SHOWN, value=value, what=what)
