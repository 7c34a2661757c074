import importlib
import importlib.metadata as md
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from imagesmith.cli import main
from imagesmith.server import api_url, is_healthy
from prep.imaging import imaging_backend

REPO = Path(__file__).resolve().parents[1]


def test_doctor_reports_the_active_imaging_backend(capsys):
    assert main(["doctor", "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out.strip().splitlines()[-1])
    assert f"imaging backend : {info['backend']}" in out
    assert "torch           : 2.14.1" in out and "prefect         : 3.8.8" in out


def test_bootstrapped_venv_runs_pillow_simd_and_pip_sees_pillow_satisfied():
    record = Path(sys.prefix) / "imagesmith-imaging.json"
    if not record.is_file():
        pytest.skip("not running in a venv made by scripts/bootstrap.sh")
    built = json.loads(record.read_text())
    info = imaging_backend()
    assert info["backend"] == built["backend"]
    if built["backend"] == "pillow-simd":
        assert info["pil_version"] == md.version("pillow-simd")
        # the shim: torchvision's "pillow" requirement is met without real Pillow's files
        assert md.version("pillow").endswith("+simd")
        assert md.distribution("pillow").files in ([], None) or all(
            str(f).startswith("pillow-") for f in md.distribution("pillow").files
        )
        assert info["built_with_avx2"] == info["cpu_avx2"]


def test_sample_command_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["sample", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"


def test_prefect_yaml_deploys_every_flow_with_valid_parameters_and_portable_paths():
    from prefect import Flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"]
    # the worker runs from its own directory: no deployer's absolute path
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]
    deployed = set()
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        deployed.add(flow.name)
        # every parameter the deployment sets is one the flow accepts, of the right type and range
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties)
        flow.validate_parameters(deployment.get("parameters", {}))
        env = deployment["work_pool"]["job_variables"]["env"]
        assert not Path(env["IMAGESMITH_FAST_DIR"]).is_absolute() and not Path(env["IMAGESMITH_BULK_DIR"]).is_absolute()
        for schedule in deployment.get("schedules", []):
            assert len(schedule["cron"].split()) == 5
            if "source" in deployment.get("parameters", {}):  # a path to set first: inactive until then
                assert schedule.get("active") is False
    flows = {obj.name for module in ("flows.pipeline", "flows.superres", "flows.devise", "flows.gan", "flows.style",
                                     "flows.demo")
             for obj in vars(importlib.import_module(module)).values() if isinstance(obj, Flow)}
    assert flows == deployed  # one deployment (at least) per flow
    nightly = next(d for d in spec["deployments"] if d["name"] == "demo-nightly")
    assert nightly["parameters"] == {"refresh": True, "scratch": True}
    assert "scratch" in Path(nightly["work_pool"]["job_variables"]["env"]["IMAGESMITH_FAST_DIR"]).parts


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_command_starts_a_local_server_and_stops_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    port = _free_port()
    try:
        assert main(["server", "start", "--port", str(port)]) == 0
        assert is_healthy(api_url(port=port))
        assert "server started" in capsys.readouterr().out
        assert main(["server", "start", "--port", str(port)]) == 0  # a second start reuses it
        assert "already running" in capsys.readouterr().out
        assert (tmp_path / "home" / "server.log").exists()
    finally:
        main(["server", "stop"])
    for _ in range(50):
        if not is_healthy(api_url(port=port)):
            break
        import time
        time.sleep(0.2)
    assert not is_healthy(api_url(port=port))
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "home")


def test_words_command_prints_nearest_classes(word_table, capsys):
    assert main(["words", "golden retriever", "-k", "3", "--table", str(word_table.path)]) == 0
    out = capsys.readouterr().out
    assert "n02099601" in out and "golden retriever" in out
    assert main(["words", "qzxv wqpl", "--table", str(word_table.path)]) == 2
    assert "no word of 'qzxv wqpl'" in capsys.readouterr().err
