"""Trial-run bookkeeping that needs no MLflow server."""

from ifsearch.tracking import error_reason

RAY_ERROR = """Failure # 1 (occurred at 2026-11-21_02-30-00)
ray::_Inner.train() (pid=1, ip=127.0.0.1)
  File "trainable.py", line 331, in train
    raise skipped from exception_cause(skipped)
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0]
Traceback (most recent call last):
  File "ifsearch/train.py", line 256, in train_loop
    raise _divergence(parts, epoch, step, scheduler.get_last_lr()[0])
ifsearch.errors.DivergenceError: training diverged: the loss is not finite at epoch 3, step 2
"""


def test_error_reason_prefers_the_ifsearch_error(tmp_path):
    path = tmp_path / "error.txt"
    path.write_text(RAY_ERROR)
    assert error_reason(str(path)) == ("ifsearch.errors.DivergenceError: training diverged: the "
                                       "loss is not finite at epoch 3, step 2")
    path.write_text(RAY_ERROR.split("[Rank 0]")[0])
    assert error_reason(str(path)).startswith("ray.train.WorkerGroupError: Training failed")
    assert error_reason(str(tmp_path / "missing.txt")) == "unknown (no error file)"
