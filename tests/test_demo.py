"""The demo runs on its embedded assets and prints one before/after table."""

import json

import pytest

from ccpurify.cli import main
from ccpurify.demo import ASSETS, DemoAssetError, verify_assets


def test_demo_assets_are_complete_small_and_verified():
    manifest = verify_assets()
    assert set(manifest["files"]) == {"model.safetensors", "attack.json", "attack.safetensors", "test-sample.zip"}
    assert (ASSETS / "test-sample.zip").stat().st_size <= 2_000_000 and manifest["test_images"] == 1000


def test_altered_assets_are_refused(tmp_path):
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(ASSETS, copy)
    (copy / "attack.json").write_text('{"name": "badnets"}')
    with pytest.raises(DemoAssetError, match="altered"):
        verify_assets(copy)


def test_demo_purifies_exports_benchmarks_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--method", "clp", "--set", "u=2.5", "--runs", "50"]) == 0
    out = capsys.readouterr().out
    assert "suspect (backdoored)" in out and "after / before" in out and "ms (b1, 1 thread)" in out
    assert "budget: no data; clp " in out
    report = json.loads((tmp_path / "report.json").read_text())
    suspect, purified = report["rows"]
    assert suspect["asr"] > 0.9 and purified["asr"] < suspect["asr"] and purified["macs"] <= suspect["macs"]
    assert {"suspect.onnx", "purified.onnx", "purified.safetensors", "manifest.json", "report.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(t["samples_ms"]) == t["runs"] for t in report["benchmark"]["timings"])  # the distribution drawn
    from exporters.metadata import read_metadata

    meta = read_metadata(tmp_path / "purified.onnx")
    assert meta["class_names"][0] == "airplane" and meta["input_mean"] == pytest.approx(
        [0.4914, 0.4822, 0.4465], abs=1e-3
    )
    assert meta["ccpurify.report"]["pipeline"] == "clp"
