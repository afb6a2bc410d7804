"""A user training script without `if __name__ == "__main__":` under subproc agents:
every spawned worker re-runs it; the run fails fast saying to add the guard. With the
guard the same script trains."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]  # sample_agents lives there


def _script(model_dir, run_dir, guarded: bool) -> str:
    body = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from areal_lite.config_toml import loads_config
        from areal_lite.trainer import Trainer

        cfg = loads_config("", [
            "actor.path={model_dir}", "run_dir={run_dir}",
            "workflow=sample_agents.LengthRewardAgent", "rollout.agent.mode=subproc",
            "rollout.agent.subproc_max_workers=1", "rollout.batch_size=1",
            "rollout.group_size=2", "rollout.sampling.max_new_tokens=4",
            "data.train=arithmetic:8", "trainer.total_steps=1", "trainer.save_every=0",
            "trainer.eval_every=0", "metrics.progress=false", "metrics.plots=false"])
        """)
    run = "Trainer(cfg).train()\n"
    return body + ('if __name__ == "__main__":\n    ' + run if guarded else run)


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [False, True])
def test_guardless_script_fails_fast_naming_the_guard(tiny_model_dir, tmp_path, guarded):
    script = tmp_path / "train.py"
    script.write_text(_script(tiny_model_dir, tmp_path / "run", guarded))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    if guarded:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert list((tmp_path / "run").rglob("metrics.jsonl"))  # it trained its step
    else:
        assert proc.returncode != 0
        assert 'add `if __name__ == "__main__":`' in proc.stderr or (
            'no `if __name__ == "__main__":` guard' in proc.stderr), proc.stderr[-3000:]
        assert "a subproc agent worker started a training run" in proc.stderr


def test_pool_workers_ignore_ctrl_c():
    """SIGINT (the terminal's Ctrl-C reaches the whole process group) does not kill a
    subproc agent worker: the parent cancels the episodes, the pool stays whole."""
    import signal

    from areal_lite.rollout.agent import make_subproc_pool

    with make_subproc_pool(1) as pool:
        pid = pool.submit(os.getpid).result(timeout=60)
        os.kill(pid, signal.SIGINT)
        assert pool.submit(os.getpid).result(timeout=60) == pid
