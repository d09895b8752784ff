"""The attack plugin interface (docs/tasks.md#attack-plugins).

A plugin declares what it is in class attributes and its parameters as a dataclass; the base
class validates both once, so every plugin gets the same precise errors::

    class MyAttack(Attack):
        name = "my-attack"
        version = "1.0"
        tasks = ("reid",)
        knowledge = ("architecture", "plaintext-pool")
        description = "One line shown by `ncbench attack list`."

        @dataclass
        class Params:
            iterations: int = param(3, "what it sets, in a few words", min=1, max=100)

        def run(self, release: Release) -> Submission: ...

Plugins receive the public release only: never a key.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
import typing
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from ncbench.attacks.submission import KNOWLEDGE, Submission
from ncbench.challenge.files import TASKS, Release
from ncbench.errors import NcbenchError
from ncbench.hardware import pick_device
from ncbench.progress import progress


def param(default, help: str, *, min=None, max=None, choices=None) -> dataclasses.Field:
    """A field of an attack's ``Params`` dataclass: its default, one line of help for `attack
    list -v`, and the range or choices the base class checks every value against."""
    checks = {"min": min, "max": max, "choices": choices}
    return dataclasses.field(
        default=default, metadata={"help": help, **{k: v for k, v in checks.items() if v is not None}}
    )


def chunk_param(default: int = 32) -> dataclasses.Field:
    """The ``chunk`` parameter of attacks that stream a release: images per block."""
    return param(default, "images per streamed block", min=1, max=4096)


@dataclasses.dataclass
class NoParams:
    """An attack without parameters."""


class Attack(abc.ABC):
    """Base class of every attack. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str]
    version: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    knowledge: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    Params: ClassVar[type] = NoParams

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for attr, kind in (
            ("name", str),
            ("version", str),
            ("tasks", tuple),
            ("knowledge", tuple),
            ("description", str),
        ):
            if not isinstance(getattr(cls, attr, None), kind):
                raise TypeError(f"attack {cls.__name__} must set class attribute {attr!r} ({kind.__name__})")
        if bad := set(cls.tasks) - set(TASKS):
            raise TypeError(f"attack {cls.name}: unknown task(s) {sorted(bad)}; tasks are {TASKS}")
        if bad := set(cls.knowledge) - set(KNOWLEDGE):
            raise TypeError(f"attack {cls.name}: unknown knowledge {sorted(bad)}; choose from {sorted(KNOWLEDGE)}")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"attack {cls.name}: Params must be a dataclass")

    def __init__(self, params=None, *, device: str = "auto", seed: int = 0):
        self.params = self.Params() if params is None else params
        self.device = pick_device(device)  # "auto": CUDA when present
        self.seed = seed
        self.stage_times: dict[str, float] = {}

    # -- parameters ------------------------------------------------------------------------------

    @classmethod
    def parse_params(cls, raw: dict[str, str]) -> object:
        """Build a validated ``Params`` from ``k=v`` strings (CLI ``--param``)."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        hints = typing.get_type_hints(cls.Params)
        values = {}
        for name, text in raw.items():
            if name not in fields:
                known = ", ".join(fields) or "none"
                raise NcbenchError(f"attack {cls.name} has no parameter {name!r} (parameters: {known})")
            values[name] = _convert(cls.name, name, text, hints[name])
        return cls.validate_params(cls.Params(**values))

    @classmethod
    def validate_params(cls, params) -> object:
        for f in dataclasses.fields(params):
            value, meta = getattr(params, f.name), f.metadata
            if "min" in meta and value < meta["min"] or "max" in meta and value > meta["max"]:
                raise NcbenchError(
                    f"attack {cls.name}: {f.name}={value} is out of range [{meta.get('min', '-inf')}, {meta.get('max', 'inf')}]"
                )
            if "choices" in meta and value not in meta["choices"]:
                raise NcbenchError(f"attack {cls.name}: {f.name}={value!r} is not one of {list(meta['choices'])}")
        return params

    @classmethod
    def declaration(cls) -> dict:
        """What ``attack list --json`` shows: the declarations and each parameter's type,
        default, range or choices and help."""
        hints = typing.get_type_hints(cls.Params)
        params = [
            {"name": f.name, "type": _type_name(hints[f.name]), "default": f.default}
            | {key: list(value) if key == "choices" else value for key, value in f.metadata.items()}
            for f in dataclasses.fields(cls.Params)
        ]
        return {
            "name": cls.name,
            "version": cls.version,
            "description": cls.description,
            "tasks": list(cls.tasks),
            "knowledge": list(cls.knowledge),
            "params": params,
        }

    @classmethod
    def param_help(cls) -> list[str]:
        lines = []
        for each in cls.declaration()["params"]:
            rng = f" in [{each['min']}, {each['max']}]" if "min" in each else ""
            choices = f" one of {each['choices']}" if "choices" in each else ""
            lines.append(
                f"{each['name']} ({each['type']}, default {each['default']!r}{rng}{choices}): {each.get('help', '')}"
            )
        return lines

    # -- running ---------------------------------------------------------------------------------

    def check_release(self, release: Release) -> None:
        """Refuse a release whose task this attack does not solve, before any work."""
        if release.task not in self.tasks:
            raise NcbenchError(
                f"attack {self.name} solves {', '.join(self.tasks)}; this release is a {release.task} challenge"
            )

    @abc.abstractmethod
    def run(self, release: Release) -> Submission:
        """Attack the public ``release`` and return the answer; the key is never reachable."""

    def __call__(self, release: Release) -> Submission:
        """Check, run, and stamp the submission with name, version, parameters and runtime."""
        self.check_release(release)
        started = time.perf_counter()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            submission = self.run(release)
        finally:
            torch.random.set_rng_state(generator_state)
        submission.challenge_id = release.challenge_id
        submission.attack, submission.attack_version = self.name, self.version
        submission.params = {**dataclasses.asdict(self.params), "seed": self.seed, "device": self.device}
        submission.knowledge = tuple(self.knowledge)
        submission.runtime_s = time.perf_counter() - started
        submission.diagnostics = {**submission.diagnostics, "stage_seconds": self.stage_times}
        return submission

    def stage(self, label: str, total: int = 1) -> _Stage:
        """Context manager for one named stage: a progress bar and its wall time in the submission."""
        return _Stage(self, label, total)

    def rng(self, purpose: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, *purpose.encode()])

    def answer(self, release: Release, **parts) -> Submission:
        """This attack's submission for ``release``, holding ``parts`` (``mapping``, ``scores``,
        ``reconstructions``, ...); the base class adds parameters, knowledge and timings."""
        parts.setdefault("encoded_ids", release.encoded_ids)
        return Submission(release.challenge_id, self.name, self.version, **parts)


class _Stage:
    def __init__(self, attack: Attack, label: str, total: int):
        self.attack, self.label, self.total = attack, label, total

    def __enter__(self) -> Callable[[int], None]:
        self.started = time.perf_counter()
        self._progress = progress(f"{self.attack.name}: {self.label}", self.total)
        return self._progress.__enter__()

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)
        # A stage run once per site adds up: the submission records each stage's total.
        elapsed = time.perf_counter() - self.started
        self.attack.stage_times[self.label] = round(self.attack.stage_times.get(self.label, 0.0) + elapsed, 3)


def _convert(attack: str, name: str, text: str, kind) -> object:
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every range check
            raise ValueError(text)
        return value
    except (TypeError, ValueError):
        raise NcbenchError(f"attack {attack}: {name}={text!r} is not a valid {_type_name(kind)}") from None


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))
