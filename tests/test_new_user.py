"""What a new user hits first: tm-export without the export extras, a checkpoint that is neither
cached nor downloadable, misspelled or unexported modalities. Each is one clear line."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tm_export import cli
from tm_export import weights as W


def test_tm_export_in_a_runtime_only_install(tmp_path):
    # torch is blocked the way a missing package fails: ModuleNotFoundError on import
    code = ("import sys; sys.modules['torch'] = None; from tm_export.cli import main; "
            f"sys.exit(main(['--model', 'tiny', '--modalities', 'DEM', '--random-init', '--out', {str(tmp_path / 'x')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "tm-export: error: the exporter needs the export extras (no module named 'torch'): "
        "pip install 'tm-deploy[export]'"]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No route to the hub, no HF_HUB_OFFLINE, an empty cache; records every hf_hub_download call."""
    import huggingface_hub
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(W.socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in W.PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    calls = []
    download = huggingface_hub.hf_hub_download

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return calls


def test_hub_miss_without_network_fails_at_once(no_network, capsys, tmp_path):
    with pytest.raises(W.WeightsError, match="no network connection to huggingface.co and the file is not in the "
                                             "cache .*pass --ckpt PATH"):
        W.hub_checkpoint("tiny")
    # only the cache was looked at: huggingface_hub never tried the network (and so never retried)
    assert no_network and all(call["local_files_only"] for call in no_network)
    assert cli.main(["--model", "tiny", "--modalities", "DEM", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tm-export: error: could not get TerraMind_v1_tiny.pt")
    assert not (tmp_path / "x").exists()


def test_hub_probe(monkeypatch):
    connected = []

    class Socket:
        def close(self):
            connected.append(True)

    monkeypatch.setattr(W.socket, "create_connection", lambda address, timeout: Socket())
    for var in W.PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert W.hub_reachable("https://huggingface.co") and connected
    monkeypatch.setattr(W.socket, "create_connection", lambda address, timeout: (_ for _ in ()).throw(OSError()))
    assert not W.hub_reachable("https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy: left to huggingface_hub
    assert W.hub_reachable("https://huggingface.co")


def test_cli_lists_every_known_modality(capsys, tmp_path):
    out = str(tmp_path / "x")
    assert cli.main(["--model", "tiny", "--modalities", "LIDAR", "--random-init", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "unknown modality 'LIDAR'; known input modalities: S2L2A" in err and "NDVI, coords" in err
    assert cli.main(["--model", "tiny", "--modalities", "DEM", "--output-modalities", "RGB", "--random-init",
                     "--out", out]) == 1
    err = capsys.readouterr().err
    assert "unknown output modality 'RGB'" in err and "LULC, coords" in err
