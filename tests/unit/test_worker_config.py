"""The Celery app's configuration: the project's settings are defaults that the module named by
``BACKFILL_CELERY_CONFIG`` and the environment override; broker errors say what they are.

Each case imports ``workers.app`` in a fresh interpreter: the settings are read at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")

ROOT = Path(__file__).resolve().parents[2]

#: Every setting workers/app.py sets, with a value that differs from the project's.
OVERRIDES: dict[str, Any] = {
    "broker_url": "redis://broker.example:6380/3",
    "broker_connection_retry_on_startup": False,
    "broker_transport_options": {"visibility_timeout": 77},
    "broker_connection_timeout": 9,
    "task_publish_retry_policy": {"max_retries": 5},
    "task_acks_late": False,
    "task_reject_on_worker_lost": False,
    "worker_prefetch_multiplier": 4,
    "task_serializer": "pickle",
    "accept_content": ["json", "pickle"],
    "result_serializer": "pickle",
    "task_ignore_result": False,
    "task_default_queue": "other",
    "task_soft_time_limit": 100,
    "task_time_limit": 120,
    "worker_send_task_events": False,
    "task_send_sent_event": False,
}

_READ = """
import json
from workers.app import DEFAULTS, DISPATCH_STALE_S, LEASE_TTL_FLOOR_S, REAP_EVERY_S, SLICE_BUDGET_S, app
keys = sorted(set(DEFAULTS) | {"include"})
app.loader.import_default_modules()  # what a worker does at start
print(json.dumps({"conf": {k: getattr(app.conf, k) for k in keys}, "defaults": sorted(DEFAULTS),
                  "slice_budget": SLICE_BUDGET_S, "reap_every": REAP_EVERY_S,
                  "dispatch_stale": DISPATCH_STALE_S, "lease_ttl": LEASE_TTL_FLOOR_S,
                  "registered": sorted(app.tasks.keys())}, default=list))
"""


def _conf(tmp_path: Path, module: str | None = None, **env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BACKFILL_", "CELERY_"))}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    if module is not None:
        (tmp_path / "myceleryconf.py").write_text(module)
        clean["BACKFILL_CELERY_CONFIG"] = "myceleryconf"
    clean.update(env)
    res = subprocess.run([sys.executable, "-c", _READ], capture_output=True, text=True,
                         timeout=60, env=clean, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def test_the_project_settings_apply_without_a_config_module(tmp_path: Path) -> None:
    data = _conf(tmp_path)
    conf = data["conf"]
    assert conf["broker_url"] == "redis://127.0.0.1:6379/0"
    assert conf["broker_transport_options"] == {"visibility_timeout": 3600,
                                                "socket_connect_timeout": 5}
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_time_limit"] == 690
    assert conf["task_soft_time_limit"] == 630
    assert conf["task_default_queue"] == "backfill"
    assert "backfill.run_slice" in data["registered"]
    assert set(OVERRIDES) == set(data["defaults"]), "a new setting needs an override case here"


def test_every_setting_in_the_config_module_wins(tmp_path: Path) -> None:
    module = "".join(f"{k} = {v!r}\n" for k, v in OVERRIDES.items())
    # What a config module usually holds besides settings: imports and private helpers.
    module = "import os\n_private = 1\n" + module
    data = _conf(tmp_path, module, BACKFILL_BROKER_URL="redis://from-env:6379/0",
                 BACKFILL_SLICE_BUDGET_S="5")
    conf = data["conf"]
    for key, value in OVERRIDES.items():
        assert conf[key] == value, key
    assert conf["include"] == ["workers.tasks"]
    assert "backfill.run_slice" in data["registered"]


def test_a_config_module_that_sets_imports_keeps_the_project_tasks(tmp_path: Path) -> None:
    (tmp_path / "mytasks.py").write_text("")
    data = _conf(tmp_path, "imports = ('mytasks',)\n")
    assert "backfill.run_slice" in data["registered"]


def test_settings_the_module_leaves_out_keep_the_project_values(tmp_path: Path) -> None:
    data = _conf(tmp_path, "task_time_limit = 5\n", BACKFILL_BROKER_URL="redis://from-env:1/0")
    conf = data["conf"]
    assert conf["task_time_limit"] == 5
    assert conf["broker_url"] == "redis://from-env:1/0"
    assert conf["task_acks_late"] is True
    assert conf["broker_transport_options"]["visibility_timeout"] == 3600


def test_the_documented_environment_variables(tmp_path: Path) -> None:
    data = _conf(tmp_path, BACKFILL_BROKER_URL="redis://from-env:6379/2",
                 BACKFILL_SLICE_BUDGET_S="12", BACKFILL_REAP_EVERY_S="0",
                 BACKFILL_DISPATCH_STALE_S="45", BACKFILL_LEASE_TTL_S="90")
    conf = data["conf"]
    assert conf["broker_url"] == "redis://from-env:6379/2"
    assert data["slice_budget"] == 12
    assert conf["task_soft_time_limit"] == 612
    assert conf["task_time_limit"] == 672
    assert data["reap_every"] == 0
    assert data["dispatch_stale"] == 45
    assert data["lease_ttl"] == 90


def test_celery_broker_url_in_the_environment_wins(tmp_path: Path) -> None:
    data = _conf(tmp_path, "broker_url = 'redis://module:1/0'\n",
                 CELERY_BROKER_URL="redis://celery-env:6379/4")
    assert data["conf"]["broker_url"] == "redis://celery-env:6379/4"


# -- broker errors: only connection errors are "unreachable" -------------------------------------

#: Prepended to a script: imports of `packaging` fail, as in an install without it (what
#: kombu's Redis transport needs; only celery[redis] brings it).
NO_PACKAGING = """
import importlib.abc, sys

class NoPackaging(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "packaging" or name.startswith("packaging."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPackaging())
"""


def _dispatch(tmp_path: Path, broker: str, *, block_packaging: bool) -> subprocess.CompletedProcess[str]:
    code = (NO_PACKAGING if block_packaging else "") + (
        "import sys\nsys.argv = ['backfill', 'dispatch', '1']\n"
        "from backfill.cli.main import main\nmain()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "CELERY_"))}
    env.update(PYTHONPATH=str(ROOT), BACKFILL_BROKER_URL=broker,
               BACKFILL_DSN="postgresql://u:secret@127.0.0.1:1/db")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path, check=False)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_missing_transport_module_is_not_called_unreachable(tmp_path: Path) -> None:
    res = _dispatch(tmp_path, f"redis://127.0.0.1:{_closed_port()}/0", block_packaging=True)
    assert res.returncode == 1, res.stdout + res.stderr
    text = " ".join(res.stderr.split())
    assert "unreachable" not in text
    assert "No module named 'packaging" in text
    assert "cannot be loaded" in text
    assert "Traceback" not in text


def test_a_malformed_or_unknown_broker_url_is_not_called_unreachable(tmp_path: Path) -> None:
    for url in ("redis://127.0.0.1:notaport/0", "nosuchtransport://host/0"):
        res = _dispatch(tmp_path, url, block_packaging=False)
        assert res.returncode == 1, res.stdout + res.stderr
        text = " ".join(res.stderr.split())
        assert "unreachable" not in text, url
        assert "fix BACKFILL_BROKER_URL" in text, url


def test_a_refused_connection_is_unreachable(tmp_path: Path) -> None:
    res = _dispatch(tmp_path, f"redis://127.0.0.1:{_closed_port()}/0", block_packaging=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "is unreachable" in " ".join(res.stderr.split())
