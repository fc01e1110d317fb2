"""What ``import dasktrain`` imports: little, so that a scheduler serving the
dashboard page or a worker unpickling a task imports only what it needs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any


def _run(code: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_dasktrain_leaves_the_training_code_and_zarr_unimported() -> None:
    result = _run(
        """
        import json, pickle, sys
        import dasktrain
        from dasktrain.monitor.dashboard import DashboardPagePlugin
        blob = pickle.dumps(DashboardPagePlugin())
        loaded = sorted(m for m in sys.modules if m.startswith("dasktrain"))
        heavy = [m for m in ("zarr", "dasktrain.trainer", "dasktrain.data.io")
                 if m in sys.modules]
        print(json.dumps({"loaded": loaded, "heavy": heavy}))
        """
    )
    assert result["heavy"] == []
    assert "dasktrain.monitor.dashboard" in result["loaded"]


def test_public_names_are_there_on_first_use() -> None:
    result = _run(
        """
        import json, sys
        import dasktrain as dt
        names = {n: type(getattr(dt, n)).__name__ for n in dt.__all__}
        print(json.dumps({"names": names, "dir": sorted(set(dt.__all__) - set(dir(dt))),
                          "trainer": "dasktrain.trainer" in sys.modules}))
        """
    )
    names = result["names"]
    assert isinstance(names, dict)
    assert names["Trainer"] == names["Dataset"] == "type"
    assert names["models"] == names["optim"] == "module"
    assert names["load_model"] == "function"
    assert result["dir"] == [] and result["trainer"] is True


def test_unknown_attributes_raise_attribute_error() -> None:
    import dasktrain

    try:
        dasktrain.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_configs_load_with_only_the_registry_module_imported() -> None:
    # A worker that unpickles a task may have imported only the base
    # modules; looking up a kind imports the package that registers it.
    result = _run(
        """
        import json
        from dasktrain.models.base import model_from_config
        from dasktrain.optim.base import optimizer_from_config
        m = model_from_config({"type": "LogisticRegression", "l2": 0.5})
        o = optimizer_from_config({"type": "Adam", "learning_rate": 0.01})
        print(json.dumps([type(m).__name__, m.l2, type(o).__name__]))
        """
    )
    assert result == ["LogisticRegression", 0.5, "Adam"]
