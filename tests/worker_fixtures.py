"""Tokenizers that fail only inside row-building worker processes (for tests/test_workers.py).

They behave as `data_fixtures.WhitespaceTokenizer` in the process that built them (so the
pipeline's build-time probe passes) and fail on a trigger word in any other process.
"""
import os

import data_fixtures as fx


class FailInWorkerTokenizer(fx.WhitespaceTokenizer):
  """`how` = "exit": the worker process exits with code 7; "raise": ValueError."""

  def __init__(self, trigger: str, how: str):
    super().__init__(list(fx.WORDS) + [trigger])
    self.trigger, self.how, self.owner = trigger, how, os.getpid()

  def encode(self, text):
    if os.getpid() != self.owner and self.trigger in text.split():
      if self.how == "exit":
        os._exit(7)  # pylint: disable=protected-access
      raise ValueError(f"cannot tokenise {self.trigger!r}")
    return super().encode(text)
