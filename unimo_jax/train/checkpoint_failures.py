"""What happens when orbax fails: one-line errors, quiet tracebacks, released threads.

A failed asynchronous write surfaces in orbax as an exception in a background thread (logged
with a traceback) plus signalling threads left waiting for signals that will never come; those
threads are not daemons, so they hold up interpreter exit for orbax's coordination timeout
(300 s each). ``checkpoint.Checkpointer`` turns the failure into one ``CheckpointError`` line
and calls ``release_orbax_threads`` on its way out.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import warnings


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or restored; the message is one line."""


def reason(e: BaseException, limit: int = 300) -> str:
  """``Type: first line of the message`` of an exception (orbax and tensorstore write pages)."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _NoOrbaxTracebacks(logging.Filter):
  """Keeps orbax's error records to their message line: a failed write is reported once, as a
  ``CheckpointError``, not as pages of tracebacks from background threads."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and _from_orbax(record.exc_info[2]):
      record.exc_info, record.exc_text = None, None
    return True


def _from_orbax(tb) -> bool:
  """Whether a traceback passes through orbax (absl's records name absl as their source)."""
  while tb is not None:
    if "/orbax/" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


_FILTER = _NoOrbaxTracebacks()


def _drop_closed_loop_callbacks(unraisable) -> None:
  """After a failed read, tensorstore completes its pending futures into the asyncio loop
  orbax has already closed; each prints an "Event loop is closed" traceback. Drop those."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return
  _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def quiet_orbax_tracebacks() -> None:
  """Orbax's error records without tracebacks; no closed-loop noise after a failed read."""
  global _previous_unraisablehook  # pylint: disable=global-statement
  absl_logger = logging.getLogger("absl")  # orbax logs through absl's logger
  if _FILTER not in absl_logger.filters:
    absl_logger.addFilter(_FILTER)
  if sys.unraisablehook is not _drop_closed_loop_callbacks:
    _previous_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _drop_closed_loop_callbacks


def release_orbax_threads(timeout: float = 10.0) -> list[str]:
  """Stops orbax's signalling threads that wait for signals a failed save will never send.

  Each such thread (``_SignalingThread``, one per commit future) blocks up to orbax's
  coordination timeout (300 s) in ``blocking_key_value_get``; they are not daemons, so the
  interpreter's exit (``threading._shutdown``) waits for them. Cancelling a thread and setting
  the signals it waits for lets it return at once without running its commit.

  Returns:
    The names of threads still alive after ``timeout`` seconds (normally none).
  """
  from orbax.checkpoint._src.futures import future as ocp_future  # pylint: disable=import-outside-toplevel
  # A cancelled thread never awaits its commit coroutine; Python would warn about each one.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
  waiting = [t for t in threading.enumerate()
             if isinstance(t, ocp_future._SignalingThread) and t.is_alive()]  # pylint: disable=protected-access
  for t in waiting:
    t.cancel()
  for t in waiting:
    try:
      ocp_future.set_signals(getattr(t, "_receive_signals", ()),
                             operation_id=getattr(t, "_operation_id", None))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint: could not release orbax thread %s (%s)", t.name, reason(e))
  deadline = time.time() + timeout
  for t in waiting:
    threading.Thread.join(t, max(0.0, deadline - time.time()))  # the plain join: no re-raise
  alive = [t.name for t in waiting if t.is_alive()]
  if alive:
    logging.warning("checkpoint: orbax threads still running after %.0fs: %s", timeout, alive)
  return alive
