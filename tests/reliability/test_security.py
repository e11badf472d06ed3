"""Security checks: weights only through safetensors (or `torch.load(weights_only=True)`), the one
unpickling path is the opt-in released-dVAE import and says so; servers bind 127.0.0.1; URIs with
credentials are masked in logs, errors and logged params."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dalle.tracking import MlflowTracker, mask_uri
from tests.reliability.conftest import REPO
from tests.helpers import stage_main

CODE_DIRS = ("src", "flows", "stages", "scripts", "benchmarks")
UNPICKLE_OK = {"src/dalle/commands/dvae_cmd.py"}  # `dalle dvae import-openai`, opt-in


def _code() -> dict[str, str]:
    files = {}
    for d in CODE_DIRS:
        for path in (REPO / d).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            if ".venv" not in rel and "site-packages" not in rel:
                files[rel] = path.read_text(encoding="utf-8")
    return files


def test_no_unsafe_deserialisation_outside_the_opt_in_import() -> None:
    found = []
    for rel, text in _code().items():
        for m in re.finditer(r"torch\.load\((.*)", text):  # the call's line (they are one-liners)
            if "weights_only=True" not in m.group(1) and rel not in UNPICKLE_OK:
                found.append(f"{rel}: {m.group(0)}")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bjoblib\.load\(",
                        r"\bdill\.loads?\(", r"\bcloudpickle\.loads?\("):
            found += [f"{rel}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert found == []
    importer = (REPO / "src/dalle/commands/dvae_cmd.py").read_text()
    assert "weights_only=False" in importer and "only do it for files you trust" in importer


def test_servers_bind_loopback_by_default() -> None:
    ui = (REPO / "scripts/ui.sh").read_text()
    assert ui.count("--host 127.0.0.1") == 2  # prefect server + mlflow ui
    assert re.search(r"^ui:.*\n\t@?bash scripts/ui\.sh", (REPO / "Makefile").read_text(), re.M)  # make ui
    for rel, text in {**_code(), "scripts/ui.sh": ui, "Makefile": (REPO / "Makefile").read_text()}.items():
        assert "0.0.0.0" not in text, rel
        for m in re.finditer(r"--host[ =](\S+)", text):
            assert m.group(1).strip("'\"") in ("127.0.0.1", "localhost", '"$HOST"'), f"{rel}: {m.group(0)}"


@pytest.mark.parametrize("uri,shown", [
    ("http://alice:s3cret@mlflow.example.com:5000", "http://***@mlflow.example.com:5000"),
    ("https://token@example.com/api", "https://***@example.com/api"),
    ("postgresql://u:p@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_mask_uri(uri: str, shown: str) -> None:
    assert mask_uri(uri) == shown


def test_logged_params_have_no_credentials() -> None:
    logged = []

    class Client:
        def log_batch(self, run_id: str, params: list) -> None:  # noqa: ANN001
            logged.extend(params)

    tracker = MlflowTracker.__new__(MlflowTracker)
    tracker.client, tracker.run_id = Client(), "r"
    tracker.log_params({"tracking": {"uri": "http://alice:s3cret@host:5000"}, "n": 3})
    assert {p.key: p.value for p in logged} == {"tracking.uri": "http://***@host:5000", "n": "3"}


def test_unreachable_prefect_url_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.tasks import PrefectUnreachable, check_prefect_api

    monkeypatch.setenv("PREFECT_API_URL", "http://alice:s3cret@127.0.0.1:9/api")
    with pytest.raises(PrefectUnreachable) as err:
        check_prefect_api(timeout=1.0)
    assert "s3cret" not in err.value.one_line() and "***@127.0.0.1:9" in err.value.one_line()


def test_unreachable_mlflow_url_is_masked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    main = stage_main("tokenizer")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9")
    with pytest.raises(SystemExit) as exc:
        main(["--params", str(REPO / "params.yaml"), "-S", f"paths.metrics={tmp_path}",
              "-S", f"paths.clean={tmp_path}", "-S", f"paths.models={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "s3cret" not in err and "***@127.0.0.1:9" in err, err[-2000:]
