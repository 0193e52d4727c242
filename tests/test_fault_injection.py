"""A kill at any step of a checkpoint, or between a shard's arrival and its checkpoint, then a
resume: the float64 sums equal an undisturbed run's exactly (in-process, so the arithmetic is the
same; shards are added in order either way). Checkpoints are written by the reducer's writer
thread: a SIGKILL there stops it writing, a SIGINT lands in the main thread meanwhile."""

import threading

import numpy as np
import pytest
from helpers import build_config, run_tiny

from raygrad import constants as names
from raygrad import engine
from raygrad import store as store_module
from raygrad.reducer import Reducer
from raygrad.store import ResultStore


class Killed(BaseException):
    """SIGKILL, in process: raised at the step, and every later write to the store is refused."""


# step -> (object, attribute) whose call is the instant of the signal
STEPS = {
    "shard arrived, before its checkpoint": (Reducer, "checkpoint"),
    "before staging": (store_module, "_stage"),
    "after staging, before the commit rename": (store_module, "_commit"),
    "after the commit rename": (store_module, "_apply_pending"),
    "mid-apply (one array written)": (store_module, "_write_array"),
    "after apply, before the redo file is dropped": (store_module, "_drop_redo"),
}
KILL_AT_CALL = {"mid-apply (one array written)": 2}  # the second array of that checkpoint
CHECKPOINT_TO_HIT = 3  # shards 0 and 1 are checkpointed; the signal lands in shard 2's


@pytest.fixture(scope="module")
def undisturbed(in_process_totals):
    return in_process_totals(shard_size=1)


@pytest.mark.parametrize("signal", ["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("step", list(STEPS))
def test_kill_at_each_checkpoint_step_then_resume_is_exact(tiny_llama, texts_file, tmp_path, monkeypatch,
                                                           undisturbed, step, signal):
    owner, attribute = STEPS[step]
    real_step, real_checkpoint = getattr(owner, attribute), Reducer.checkpoint
    checkpoints, calls, fired, pending = [], [], [], []

    def land():
        fired.append(signal)
        if signal == "SIGINT" and threading.current_thread() is not threading.main_thread():
            # A signal lands in the main thread; the checkpoint writer goes on. The main thread takes
            # it at its next shard (below): _thread.interrupt_main() would let it land anywhere, a
            # finalizer included, where Python prints and drops it (it did in the full suite).
            pending.append(signal)
            return
        raise Killed if signal == "SIGKILL" else KeyboardInterrupt  # in the writer: it writes nothing more

    def counting_checkpoint(self):
        if fired == ["SIGKILL"]:
            raise Killed  # a killed process writes nothing more
        if pending:
            pending.clear()
            raise KeyboardInterrupt
        # One snapshot per shard, each written before the next is handed over (the writer would
        # otherwise fold a waiting snapshot into a newer one): the third is the same in every run.
        self.writer.wait()
        checkpoints.append(1)
        if owner is Reducer and len(checkpoints) == CHECKPOINT_TO_HIT:
            land()
        return real_checkpoint(self)

    def at_step(*args, **kwargs):
        if len(checkpoints) == CHECKPOINT_TO_HIT and not fired:
            calls.append(1)
            if len(calls) == KILL_AT_CALL.get(step, 1):
                land()
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Reducer, "checkpoint", counting_checkpoint)
    if owner is not Reducer:
        monkeypatch.setattr(owner, attribute, at_step)
    config = build_config(tiny_llama, texts_file, tmp_path, shard_size=1, checkpoint_seconds=0)
    with pytest.raises((Killed, KeyboardInterrupt)):
        engine.run(config, echo=lambda _: None, progress=False)
    assert fired == [signal], "the signal never landed"
    monkeypatch.undo()  # as a new process: nothing patched

    (run_dir,) = tmp_path.iterdir()
    _, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    # A signal reaches the main thread while the writer finishes its checkpoint: a shard or two
    # more may be added and kept by then.
    assert 2 <= done.sum() < len(done)
    engine.resume(run_dir, echo=lambda _: None, progress=False)
    resumed, done = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done.all()
    for name, expected in undisturbed.sums.items():
        np.testing.assert_array_equal(resumed.sums[name], expected, err_msg=name)
    np.testing.assert_array_equal(resumed.tokens, undisturbed.tokens)
    assert resumed.loss_sum == undisturbed.loss_sum and resumed.loss_tokens == undisturbed.loss_tokens


@pytest.fixture(scope="module")
def many_texts(tiny_llama, tmp_path_factory):
    """(dataset, run options, totals of an undisturbed in-process run): 48 texts, a shard each, so a
    run is still going when its third checkpoint is seen."""
    from tiny import SAMPLE_TEXTS

    texts = [f"{text} (copy {i})" for i in range(8) for text in SAMPLE_TEXTS if len(text.strip()) > 50]
    root = tmp_path_factory.mktemp("many")
    dataset = root / "many.txt"
    dataset.write_text("\n".join(texts) + "\n")
    options = dict(shard_size=1, num_samples=len(texts), checkpoint_seconds=0)
    # Checkpointed at the end only: the sums do not depend on when a run checkpoints.
    _, expected = run_tiny(tiny_llama, dataset, root / "undisturbed", **{**options, "checkpoint_seconds": 3600})
    return dataset, options, expected


@pytest.mark.parametrize("signal_name, workers", [("SIGKILL", 0), ("SIGTERM", 0), ("SIGTERM", 1)])
def test_a_real_signal_to_the_console_script_then_resume_gives_the_undisturbed_sums(signal_name, workers,
                                                                                    tiny_llama, tmp_path,
                                                                                    many_texts):
    """The real thing: `raygrad run` in its own process, signalled after some checkpoints; a resume
    here equals an undisturbed run here (another process: equal to float64 rounding). SIGTERM (a
    scheduler ending the job) stops like Ctrl-C: finished shards saved, the resume command said,
    exit 143, also with Ray (whose ray.init would put its own handler in, one that exits at once)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers import assert_same_totals

    dataset, options, expected = many_texts

    out_dir = tmp_path / "killed"
    script = str(Path(sys.executable).parent / "raygrad")
    args = [script, "run", "--model", str(tiny_llama), "--dataset", str(dataset), "--num-samples",
            str(options["num_samples"]), "--batch-size", "3", "--max-length", "24", "--workers", str(workers),
            "--dtype", "float64", "--shard-size", "1", "--checkpoint-seconds", "0", "--output-dir", str(out_dir),
            "--no-progress"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline, done = time.monotonic() + 120, 0
    try:
        while done < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
            stores = list(out_dir.glob(f"*/{names.STORE_NAME}"))
            if stores and (stores[0] / names.CHECKPOINT_STATE).exists():
                try:
                    done = int(ResultStore.open(stores[0]).totals()[1].sum())
                except Exception:  # read while the writer is mid-checkpoint: look again
                    continue
        process.send_signal(getattr(signal, signal_name))
    finally:
        out, err = process.communicate(timeout=120)
    (run_dir,) = out_dir.iterdir()
    if signal_name == "SIGKILL":
        assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    else:
        assert process.returncode == 128 + signal.SIGTERM, (process.returncode, err[-2000:])
        assert err.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in err, err[-2000:]
        assert f"(Terminated: SIGTERM); continue with: raygrad run --resume {run_dir}" in out, out
    _, done_flags = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert 3 <= done_flags.sum() < len(done_flags)
    # In-process, whatever the killed run used (a Ray run resumed on Ray is test_cluster's), and
    # checkpointed at the end only.
    engine.resume(run_dir, echo=lambda _: None, progress=False, execution={"workers": 0, "checkpoint_seconds": 3600})
    resumed, done_flags = ResultStore.open(run_dir / names.STORE_NAME).totals()
    assert done_flags.all()
    assert_same_totals(resumed, expected, rtol=1e-12)
