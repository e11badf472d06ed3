"""The one training loop: resume, checkpoint cadence, EMA, logging, progress and kill-safety.

The dVAE, the prior and the contrastive model share it; each supplies only a `step(i)` (one
update at step index i) and, after the loop, its evaluation. The loop owns the rest:

* resume: a training-state checkpoint (weights, optimiser, strategy state - the EMA, PowerSGD
  error buffers -, RNG, the trainer's own `extra` state such as the data position) written every
  `checkpoint_every` steps through a `StateStore`, atomically, with the previous one kept as a
  fallback (dalle.io); a killed run resumes at the step it last saved, exactly;
* EMA: `strategy.ema_update(ema_decay)` after every update that was taken (paper §2.1/§2.2
  "Adam with exponentially weighted iterate averaging"; decay 0: none);
* logging: every `log_every` steps and at the last, the trainer's row goes to the tracker (MLflow
  and the DVC curves file) and to the progress bar, which only rank 0 draws.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from tqdm import tqdm

from dalle.errors import CheckpointError, DalleError
from dalle.io import load_checkpoint, remove_checkpoint, save_checkpoint
from dalle.train.common import rng_state, set_rng_state

log = logging.getLogger(__name__)


class Diverged(DalleError):
    """Training produced non-finite losses or weights; nothing is saved or exported."""


@dataclass(frozen=True)
class Cadence:
    """How long a trainer runs and how often the loop logs, saves and averages."""

    steps: int
    log_every: int
    checkpoint_every: int
    ema_decay: float


@dataclass
class StepOut:
    """What one update reports: whether it was taken (a skipped non-finite step is not), its
    statistics, and how many items (images, tokens) it consumed, for the rate."""

    ok: bool
    stats: dict[str, Any]
    items: int


class StateStore(Protocol):
    def load(self, loop: "Loop") -> int: ...  # resumes `loop` in place; returns the step (0: none)

    def save(self, loop: "Loop") -> None: ...

    def remove(self) -> None: ...


@dataclass
class LocalStore:
    """One safetensors training-state file (single process); `config` must match on resume."""

    path: Path
    config: dict[str, Any]

    def load(self, loop: "Loop") -> int:
        if not self.path.exists() and not Path(f"{self.path}.prev").exists():
            return 0
        try:
            weights, _, state = load_checkpoint(self.path, self.config, with_state=True)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc.one_line()} (delete it to start over)") from None
        try:  # a state that parses but does not fit this model/optimiser (tampered, other code)
            loop.model.load_state_dict(weights)
            loop.optimizer.load_state_dict(state["optimizer"])
            loop.strategy.load_state_dict(state["strategy"])
            set_rng_state(state["rng"])
            loop.load_extra(state["extra"])
            return int(state["step"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
            raise CheckpointError(f"{self.path}: the training state cannot be restored ({detail}); "
                                  "delete it to start over") from None

    def save(self, loop: "Loop") -> None:
        state = {"step": loop.step, "optimizer": loop.optimizer.state_dict(),
                 "strategy": loop.strategy.state_dict(), "rng": rng_state(),
                 "extra": loop.extra_state()}
        weights = loop.strategy.full_state_dict(loop.model)
        save_checkpoint(self.path, weights, self.config, state)

    def remove(self) -> None:
        remove_checkpoint(self.path)  # and its .prev: a rerun with new params starts afresh


@dataclass
class Loop:
    """Runs `step` from the resumed step to `cadence.steps` (see the module docstring)."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    strategy: Any  # LocalStrategy or dalle.distributed.strategy.ShardedStrategy
    cadence: Cadence
    store: StateStore
    tracker: Any
    step_fn: Callable[[int], StepOut]
    log_row: Callable[[StepOut, float], dict[str, float]]  # (last step, items/s) -> logged row
    postfix: Callable[[dict[str, float]], dict[str, str]] = lambda row: {}
    extra_state: Callable[[], dict[str, Any]] = dict
    load_extra: Callable[[dict[str, Any]], None] = lambda state: None
    hooks: list[tuple[int, Callable[[int], None]]] = field(default_factory=list)  # (every, fn)
    step: int = 0
    bad_rows: int = 0  # logged rows in a row whose loss was NaN or infinite

    def run(self) -> tuple[float, float]:
        """Train to the end; returns (seconds, items per second) of this process's own steps."""
        self.step = self.store.load(self)
        if self.step:
            log.info("%s: resuming at step %d of %d", self.name, self.step, self.cadence.steps)
        c = self.cadence
        bar = tqdm(total=c.steps, initial=self.step, desc=self.name, unit="step",
                   disable=not self.strategy.is_chief)
        t0, items = time.perf_counter(), 0
        while self.step < c.steps:
            out = self.step_fn(self.step)
            if out.ok and c.ema_decay > 0:
                self.strategy.ema_update(c.ema_decay)
            self.step += 1
            items += out.items
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == c.steps:
                row = self.log_row(out, items / max(time.perf_counter() - t0, 1e-9))
                self.tracker.log_metrics(row, step=self.step)
                bar.set_postfix(self.postfix(row))
                self._check_loss(row)
            for every, hook in self.hooks:
                if self.step % every == 0:
                    hook(self.step)
            if self.step % c.checkpoint_every == 0 and self.step < c.steps:
                self._check_weights()  # a diverged state is never saved (nor exported)
                self.store.save(self)
        bar.close()
        self._check_weights()
        seconds = time.perf_counter() - t0
        return seconds, items / max(seconds, 1e-9)

    def _check_loss(self, row: dict[str, float], patience: int = 3) -> None:
        """Stop with one line after `patience` logged rows in a row with a NaN/inf loss, or at
        once when it is the last row (what would be exported)."""
        loss = row.get("loss")
        if loss is None or math.isfinite(loss):
            self.bad_rows = 0
            return
        self.bad_rows += 1
        if self.bad_rows >= patience or self.step >= self.cadence.steps:  # never export it
            raise Diverged(f"{self.name}: the loss was {loss} for {self.bad_rows} logged rows in a "
                           f"row (step {self.step}); nothing further is saved - lower the learning "
                           "rate or check the data, then rerun (it resumes from the last checkpoint)")

    def _check_weights(self) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise Diverged(f"{self.name}: the weights hold NaN/inf at step {self.step}; nothing "
                           "further is saved - lower the learning rate or check the data")
