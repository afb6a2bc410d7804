"""Online mode: outside agents open sessions through the admin routes, their episodes
are grouped under the staleness bound, abandoned sessions are freed, and `areal-lite
serve` trains on the episodes of a runner in another process."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from openai import AsyncOpenAI

from areal_lite.config_toml import loads_config
from areal_lite.rollout.online import OnlineProducer
from areal_lite.rollout.stack import open_rollout

ROOT = Path(__file__).resolve().parents[2]


def _cfg(model_dir, tmp_path, *extra):
    return loads_config("", [f"actor.path={model_dir}", "actor.device=cpu", f"run_dir={tmp_path}",
                             "rollout.agent.mode=online", "rollout.sampling.max_new_tokens=4",
                             "rollout.batch_size=1", "rollout.group_size=2", *extra])


class _Version:
    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


async def test_admin_routes_groups_keys_and_refusals(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    version = _Version()
    async with open_rollout(cfg) as stack:
        producer = OnlineProducer(stack.proxy, cfg.rollout, run_dir=tmp_path, version=version)
        info = json.loads((tmp_path / "online.json").read_text())
        key_file = Path(info["admin_key_file"])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key == stack.proxy.sessions.admin_key and info["base_url"] == stack.proxy.base_url
        async with httpx2.AsyncClient(base_url=info["admin_url"], timeout=60) as http:
            assert (await http.post("/admin/online/sessions")).status_code == 401  # no key
            wrong = {"Authorization": "Bearer sk-admin-wrong"}
            assert (await http.post("/admin/online/sessions", headers=wrong)).status_code == 401
            admin = {"Authorization": f"Bearer {key}"}
            starts = [(await http.post("/admin/online/sessions", headers=admin,
                                       json={"group_id": "g1", "data": {"q": 1}})).json()
                      for _ in range(2)]
            full = await http.post("/admin/online/sessions", headers=admin, json={"group_id": "g1"})
            assert full.status_code == 409 and "rollout.group_size" in full.text
            as_session = {"Authorization": f"Bearer {starts[0]['api_key']}"}
            assert (await http.post("/admin/online/sessions", headers=as_session)).status_code == 401  # the same for every wrong key
            for k, s in enumerate(starts):
                client = AsyncOpenAI(base_url=s["base_url"], api_key=s["api_key"], max_retries=0)
                resp = await client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
                await client.close()
                r = await http.post(f"/admin/online/sessions/{s['session_id']}/reward",
                                    headers=admin, json={"reward": k, "completion_id": resp.id})
                assert r.status_code == 200
                end = await http.post(f"/admin/online/sessions/{s['session_id']}/end", headers=admin)
                assert end.json() == {"num_samples": 1, "num_completions": 1}
            gone = await http.post(f"/admin/online/sessions/{starts[0]['session_id']}/end",
                                   headers=admin)
            assert gone.status_code == 404
        (group,), versions = await producer.next_batch()
        assert versions == [0] and group.data == {"q": 1}
        assert sorted(s.raw_reward for s in group.samples) == [0.0, 1.0]
        assert len(stack.proxy.sessions) == 0


async def test_staleness_bound_holds_new_groups_until_the_version_moves(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "rollout.group_size=1")
    version = _Version()
    async with open_rollout(cfg) as stack:
        producer = OnlineProducer(stack.proxy, cfg.rollout, run_dir=tmp_path, version=version)
        first = await producer.admit(None)
        waiting = asyncio.ensure_future(producer.admit(None))
        await asyncio.sleep(0)
        assert not waiting.done() and producer.capacity() == 0  # batch_size 1, eta 0
        producer.finish(first, data={}, session_id="s", samples=[], reward=None,
                        num_completions=0, error="timeout")  # a failed group frees its slot
        assert producer.num_rejected == 1
        second = await asyncio.wait_for(waiting, 10)
        third = asyncio.ensure_future(producer.admit(None))
        await asyncio.sleep(0)
        assert not third.done()
        version.value = 1
        await producer.notify()
        assert {second, await asyncio.wait_for(third, 10)} and len(producer._open) == 2


async def test_an_abandoned_session_is_freed_after_its_timeout(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, "rollout.group_size=1",
               "rollout.agent.online_session_timeout_s=0.2")
    async with open_rollout(cfg) as stack:
        producer = OnlineProducer(stack.proxy, cfg.rollout, run_dir=tmp_path, version=lambda: 0)
        key = {"Authorization": f"Bearer {stack.proxy.sessions.admin_key}"}
        async with httpx2.AsyncClient(base_url=stack.proxy.base_url.removesuffix("/v1"),
                                      timeout=60) as http:
            s = (await http.post("/admin/online/sessions", headers=key)).json()
            assert len(stack.proxy.sessions) == 1
            await asyncio.wait_for(producer._wait_for(lambda: producer.num_rejected == 1), 30)
            assert len(stack.proxy.sessions) == 0 and producer.routes.num_timed_out == 1
            client = AsyncOpenAI(base_url=s["base_url"], api_key=s["api_key"], max_retries=0)
            with pytest.raises(Exception, match="401"):
                await client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            await client.close()
            late = await http.post(f"/admin/online/sessions/{s['session_id']}/end", headers=key)
            assert late.status_code == 404


@pytest.mark.slow
def test_serve_trains_two_steps_on_an_outside_runner(tiny_model_dir, tmp_path):
    """`areal-lite serve` in one process, examples/online/runner.py in another."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    serve = subprocess.Popen(
        [sys.executable, "-m", "areal_lite.cli", "serve", "--config",
         str(ROOT / "examples/online/config.toml"), f"actor.path={tiny_model_dir}",
         f"run_dir={tmp_path}", "trainer.total_steps=2", "trainer.save_every=0",
         "rollout.batch_size=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=6",
         "metrics.progress=false", "metrics.plots=false"],
        stderr=subprocess.PIPE, text=True, env=env)
    ready, lines = threading.Event(), []

    def drain() -> None:
        for line in serve.stderr:
            lines.append(line)
            if "serving online agents" in line:
                ready.set()
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert ready.wait(300), "".join(lines)
        online_json = tmp_path / "online" / "trial0" / "online.json"
        runner = subprocess.run([sys.executable, str(ROOT / "examples/online/runner.py"),
                                 str(online_json)], capture_output=True, text=True, env=env,
                                timeout=300)
        assert serve.wait(300) == 0, "".join(lines)
    finally:
        serve.kill()
        serve.wait()
        reader.join()
        serve.stderr.close()
    assert runner.returncode == 0, runner.stderr
    assert json.loads(runner.stdout.splitlines()[-1])["groups"] >= 4
    rows = [json.loads(x) for x in (tmp_path / "online/trial0/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["train/num_tokens"] > 0 for r in steps)
