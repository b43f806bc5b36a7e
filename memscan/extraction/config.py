"""Configuration of the extraction attack (every default recorded in the run manifest)."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from memscan.errors import InputError

#: Default edge threshold α on tiled ℓ2 (4×4 grid). The paper does not publish its value; see
#: docs/choosing-alpha.md for the measurements behind it: independent generations of a prompt
#: lie at tiled ℓ2 ≳ 0.12 (5th percentile), copies of a memorized image at ≲ 0.05.
DEFAULT_ALPHA = 0.08


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class ExtractConfig:
    """Parameters of ``memscan extract`` (Carlini et al. 2023, §4.1 defaults where they exist).

    Parameters
    ----------
    samples_per_prompt : generations per prompt (paper: 500)
    grid : tiles per side for tiled ℓ2 (paper: 4)
    alpha : edge threshold of the generation graph (strict <)
    min_clique : clique size that flags a prompt (paper: k = 10)
    delta : (ℓ, δ)-extraction threshold on tiled ℓ2 to a training image (paper: 0.15)
    seed : run seed; sample i of prompt p uses derive_seed(seed, p, i)
    batch_size : generations per model call
    shard_size : prompts per shard (unit of resume and of distributed work)
    n_nearest : nearest training images listed per candidate
    max_expansions : clique search budget (beyond it the result is marked "bounded")
    device : "cpu" or "cuda"
    adaptive : adaptive generation budget (off by default: every prompt gets samples_per_prompt).
        When on, a prompt is sampled in rounds — ``first_round`` generations, then
        ``round_size`` more at a time, up to samples_per_prompt — and after each round the largest
        clique of its generations so far decides: fewer than ``continue_clique`` members (2: no
        pair within alpha) stops the prompt; with ``stop_when_detected`` a clique of min_clique
        members stops it too (it is flagged already). n_samples in the detections table records
        how many generations were made. See docs/benchmarks.md (Adaptive generation budget).
    first_round : generations before the first stopping decision (capped at samples_per_prompt)
    round_size : generations added per further round
    continue_clique : a prompt continues only while its largest clique has at least this many members
    stop_when_detected : stop a prompt as soon as its clique reaches min_clique
    """

    samples_per_prompt: int = 500
    grid: int = 4
    alpha: float = DEFAULT_ALPHA
    min_clique: int = 10
    delta: float = 0.15
    seed: int = 0
    batch_size: int = 64
    shard_size: int = 8
    n_nearest: int = 3
    max_expansions: int = 100_000
    device: str = "cpu"
    adaptive: bool = False
    first_round: int = 50
    round_size: int = 50
    continue_clique: int = 2
    stop_when_detected: bool = True

    def validate(self) -> ExtractConfig:
        def need(cond: bool, msg: str, hint: str) -> None:
            if not cond:
                raise InputError(msg, hint)

        need(self.samples_per_prompt >= 2, f"samples_per_prompt={self.samples_per_prompt}", "use at least 2")
        need(self.grid >= 1, f"grid={self.grid}", "use a positive tile grid (paper: 4)")
        need(0 < self.alpha <= 1, f"alpha={self.alpha} outside (0, 1]", "tiled ℓ2 lies in [0, 1]")
        need(0 <= self.delta <= 1, f"delta={self.delta} outside [0, 1]", "paper: 0.15")
        need(
            2 <= self.min_clique <= self.samples_per_prompt,
            f"min_clique={self.min_clique} must lie in 2..samples_per_prompt ({self.samples_per_prompt})",
            "paper: 10 of 500",
        )
        need(
            self.batch_size >= 1 and self.shard_size >= 1,
            f"batch_size={self.batch_size}, shard_size={self.shard_size}: both must be ≥ 1",
            "e.g. --batch-size 64 --shard-size 8",
        )
        need(self.n_nearest >= 1, f"n_nearest={self.n_nearest} must be ≥ 1", "e.g. --n-nearest 3")
        need(
            self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
            f"device={self.device!r}",
            "use cpu or cuda",
        )
        need(self.first_round >= 2, f"first_round={self.first_round}", "use at least 2 generations before stopping")
        need(self.round_size >= 1, f"round_size={self.round_size}", "use at least 1 generation per round")
        need(
            2 <= self.continue_clique <= self.min_clique,
            f"continue_clique={self.continue_clique} must lie in 2..min_clique ({self.min_clique})",
            "2 stops a prompt when no pair of its generations lies within alpha",
        )
        return self

    def rounds(self) -> list[int]:
        """Cumulative generation counts after which the adaptive rule decides (the last is
        samples_per_prompt); ``[samples_per_prompt]`` when ``adaptive`` is off.

        Examples
        --------
        >>> ExtractConfig(samples_per_prompt=200, adaptive=True, first_round=50, round_size=60).rounds()
        [50, 110, 170, 200]
        >>> ExtractConfig(samples_per_prompt=200).rounds()
        [200]
        """
        n = self.samples_per_prompt
        if not self.adaptive:
            return [n]
        out = [min(self.first_round, n)]
        while out[-1] < n:
            out.append(min(out[-1] + self.round_size, n))
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ExtractConfig:
        """The config recorded in a run's manifest (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **overrides) -> ExtractConfig:
        """Defaults < values from a TOML file (``[extract]`` table or top level) < explicit overrides."""
        values: dict = {}
        if config_file is not None:
            try:
                data = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InputError(f"cannot read config {config_file}: {exc}", "pass a valid TOML file") from None
            tables = [k for k, v in data.items() if isinstance(v, dict) and k != "extract"]
            data = data.get("extract", data)
            tables += [f"extract.{k}" for k, v in data.items() if isinstance(v, dict)]
            if tables:
                raise InputError(
                    f"config {config_file}: unknown table(s) {', '.join(f'[{t}]' for t in tables)}",
                    "the options go in an [extract] table or at the top level",
                )
            known = {f.name: f for f in fields(cls)}
            unknown = [k for k in data if k.replace("-", "_") not in known]
            if unknown:
                raise InputError(
                    f"config {config_file}: unknown option(s) {', '.join(unknown)}",
                    f"known: {', '.join(sorted(known))}",
                )
            for k, v in data.items():
                default = known[k.replace("-", "_")].default
                want = float if isinstance(default, float) else type(default)
                ok = isinstance(v, bool) if want is bool else isinstance(v, want) and not isinstance(v, bool)
                if want is float:
                    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if not ok:
                    raise InputError(
                        f"config {config_file}: {k} = {v!r} is not {_TYPE_NAMES[want]}",
                        f"e.g. {k} = {'true' if want is bool else repr(default)}",
                    )
                values[k.replace("-", "_")] = v
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()
