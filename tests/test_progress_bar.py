"""The console progress bar (tqdm): position, ETA, steps/s and the metrics line on a terminal;
nothing at all when the stream is not one (logs, CI, a sweep's trial output)."""
import io
import re
import time

from unimo_jax.train import metrics as metrics_lib


class Tty(io.StringIO):
  def isatty(self):
    return True


def last_frame(text):
  return [f for f in text.split("\r") if f.strip()][-1].rstrip("\n")


def test_terminal_bar_shows_position_eta_rate_and_losses():
  stream = Tty()
  bar = metrics_lib.ProgressBar(total=100, initial=20, stream=stream, min_interval=0.0)
  t0 = time.time()
  time.sleep(0.4)
  bar.update(30, "loss=2.5 pair_cmcl/loss_i2t=1.25", force=True)
  elapsed = time.time() - t0
  frame = last_frame(stream.getvalue())
  assert frame.startswith(" 30%|") and "30/100" in frame
  assert "loss=2.5 pair_cmcl/loss_i2t=1.25" in frame
  # the rate counts this run's 10 steps (not the 20 before a resume); ETA = 70 steps / rate
  rate = float(re.search(r"([0-9.]+) steps/s", frame).group(1))
  assert 10 / (elapsed + 0.3) < rate <= 10 / 0.4 + 1e-6, (rate, elapsed)
  m, s = re.search(r"ETA (\d+):(\d+)", frame).groups()
  assert abs(60 * int(m) + int(s) - 70 / rate) <= 1.0
  bar.update(31)  # a step between log points keeps the last metrics line
  bar.update(100, force=True)
  bar.close()
  frame = last_frame(stream.getvalue())
  assert frame.startswith("100%|") and "loss=2.5" in frame and stream.getvalue().endswith("\n")


def test_no_terminal_no_output_and_forcing_either_way():
  plain = io.StringIO()
  bar = metrics_lib.ProgressBar(total=10, stream=plain)
  assert not bar.enabled
  bar.update(5, "loss=1", force=True)
  bar.close()
  assert plain.getvalue() == ""
  tty = Tty()
  bar = metrics_lib.ProgressBar(total=10, stream=tty, force=False)  # train.progress_bar=off
  bar.update(5, force=True)
  bar.close()
  assert tty.getvalue() == ""
  forced = io.StringIO()
  bar = metrics_lib.ProgressBar(total=10, stream=forced, force=True)  # train.progress_bar=on
  bar.update(5, "loss=" + "9" * 400, force=True)
  bar.close()
  frames = [f for f in forced.getvalue().split("\r") if f.strip()]
  assert "5/10" in frames[-1] and all(len(f.rstrip("\n")) <= 120 for f in frames)  # cut, not wrapped
  # the metrics line is cut at a metric boundary so that the bar itself stays visible
  assert len(frames[-1].split("|")[1]) >= 15 and frames[-1].rstrip("\n").endswith("]")


def test_log_lines_go_above_the_bar(capsys):
  import logging  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  logger = logging.getLogger()
  handler = logging.StreamHandler(sys.stderr)
  saved = logger.handlers[:]
  logger.handlers = [handler]  # only this test's console handler (earlier tests leave theirs)
  try:
    bar = metrics_lib.ProgressBar(total=10, stream=sys.stderr, force=True)
    bar.update(3, "loss=1", force=True)
    logger.warning("checkpoint saved at step 3")
    bar.update(10, force=True)
    bar.close()
  finally:
    logger.handlers = saved
  err = capsys.readouterr().err
  # the log line is a line of its own (the bar is redrawn after it), not glued into a frame
  assert "\ncheckpoint saved at step 3\n" in err.replace("\r", "\n")
  assert [line for line in err.splitlines() if "checkpoint saved" in line] == [
      "checkpoint saved at step 3"]
