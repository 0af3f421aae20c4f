"""The command line: every option is explained; train/evaluate/purify/export/bench work on a ci run;
bad inputs end with one line that says what to do."""

import json
import subprocess
import sys

import pytest

from ccpurify.cli import main, parse_option

COMMANDS = ["train", "evaluate", "purify", "export", "bench"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccpurify.cli", *args], capture_output=True, text=True, timeout=600)


def test_every_option_of_every_command_says_what_it_does():
    """No option is left without a help text, and every command has a description."""
    import argparse

    from ccpurify.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(COMMANDS) <= set(sub.choices)
    for command, parser in sub.choices.items():
        assert parser.description, f"{command} has no description"
        silent = [a.option_strings or [a.dest] for a in parser._actions if not a.help or not a.help.strip()]
        assert not silent, f"{command}: options without help: {silent}"


def test_evaluate_a_run_directory(ci_run, tmp_path, capsys):
    assert main(["evaluate", str(ci_run.run_dir), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["ca"] == pytest.approx(ci_run.metrics["ca"]) and result["asr"] == pytest.approx(ci_run.metrics["asr"])
    assert "ASR %" in capsys.readouterr().out


def test_evaluate_plain_weights_with_an_attack(ci_run, tmp_path, capsys):
    import torch

    torch.save(ci_run.model.state_dict(), tmp_path / "w.pth")
    code = main(
        [
            "evaluate",
            str(tmp_path / "w.pth"),
            "--arch",
            "preact_resnet18",
            "--width",
            "0.125",
            "--attack",
            "badnets",
            "--test-subset",
            "300",
        ]
    )
    assert code == 0 and "badnets" in capsys.readouterr().out


def test_purify_a_run_directory_writes_model_onnx_report_and_table(ci_run, tmp_path, capsys):
    out = tmp_path / "clp"
    assert main(["purify", str(ci_run.run_dir), "--method", "clp", "--set", "u=2.5", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.onnx", "report.json", "manifest.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["options"] == {"u": 2.5} and "der" in report["evaluation"]
    assert report["onnx"]["parity_max_abs_diff"] <= 1e-4
    table = capsys.readouterr().out
    assert "before" in table and "after" in table and "DER %" in table
    assert (
        main(["evaluate", str(out / "model.safetensors"), "--attack-from", str(ci_run.run_dir), "--test-subset", "200"])
        == 0
    )


def test_purify_macs_and_the_run_directory_shorthand_take_the_grids_subset_whatever_the_method(
    ci_run, tmp_path, capsys, data_dir
):
    from ccpurify import defender

    out = tmp_path / "prune"
    args = [
        "purify",
        str(ci_run.run_dir),
        "--method",
        "prune",
        "--macs",
        "0.75",
        "--clean-data",
        str(ci_run.run_dir),
        "--out",
        str(out),
        "--no-export",
        "--data",
        str(data_dir),
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"]["passes"][0]["config"]["macs"] == 0.75
    grid_subset = defender.clean_data(ci_run.run_dir, "cifar10", rnp=True, data_dir=data_dir)
    assert f"data: {len(grid_subset)} labelled clean images" in capsys.readouterr().out
    result = run_cli("purify", str(ci_run.run_dir), "--macs", "1.5")
    assert result.returncode == 2 and "strictly between 0 and 1" in result.stderr


def test_export_and_bench_from_the_command_line(ci_run, tmp_path, capsys):
    onnx_path = tmp_path / "m.onnx"
    assert (
        main(
            [
                "export",
                str(ci_run.run_dir),
                "--out",
                str(onnx_path),
                "--int8",
                "--calibration-images",
                "32",
                "--eval-images",
                "64",
            ]
        )
        == 0
    )
    assert onnx_path.is_file() and (tmp_path / "m.int8.onnx").is_file()
    out = capsys.readouterr().out
    assert "| ONNX file | CA %" in out and "| int8 " in out  # the INT8 file's ASR is scored, not only its accuracy
    assert (
        main(
            [
                "bench",
                str(onnx_path),
                str(tmp_path / "m.int8.onnx"),
                "--runs",
                "50",
                "--rounds",
                "1",
                "--warmup",
                "2",
                "--out",
                str(tmp_path / "b.json"),
                "--markdown",
                str(tmp_path / "b.md"),
            ]
        )
        == 0
    )
    bench = json.loads((tmp_path / "b.json").read_text())
    assert len(bench["ratios"]) == 1 and "latency ratio" in (tmp_path / "b.md").read_text()


def test_options_parse_as_json_values():
    assert parse_option("u=2.5") == ("u", 2.5)
    assert parse_option("mode=faithful") == ("mode", "faithful")
    assert parse_option("reference-pairing=true") == ("reference_pairing", True)


def test_a_whole_number_in_exponent_form_reads_as_an_integer():
    """``--set budget=1e5`` gives the count option the integer it names; a decimal point or a
    fraction keeps the number a float, and a huge exponent stays a float the range check refuses."""
    assert parse_option("budget=1e5") == ("budget", 100000) and type(parse_option("budget=1e5")[1]) is int
    assert parse_option("lr=1e-2") == ("lr", 0.01)
    assert type(parse_option("u=2.0")[1]) is float and type(parse_option("u=2.5e1")[1]) is float
    assert parse_option("budget=1e400")[1] == float("inf")
    from ccpurify.passes import Recover

    assert Recover(budget=parse_option("budget=1e5")[1]).budget == 100000


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "nowhere.safetensors"], "nowhere.safetensors: no such file"),
        (["purify", "nowhere/", "--method", "clp"], "no such file"),
        (["train", "--data", "/nonexistent", "--epochs", "1"], "no cifar10 data found"),
    ],
)
def test_bad_inputs_end_with_one_clear_line(args, message, tmp_path):
    result = run_cli(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("ccpurify: error:") and message in lines[-1]
    assert "Traceback" not in result.stderr


def test_a_diverging_training_run_ends_with_one_line_and_no_run_directory(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    args = [
        "--epochs",
        "1",
        "--lr",
        "1e30",
        "--train-subset",
        "256",
        "--test-subset",
        "100",
        "--data",
        str(data_dir),
        "--out",
        str(out),
    ]
    assert main(["train", *args]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ccpurify: error: training diverged at epoch 1") and "lower --lr" in last
    assert not (out / "manifest.json").exists()


def test_unknown_arch_is_an_argument_error():
    result = run_cli("train", "--arch", "alexnet")
    assert result.returncode == 2 and "invalid choice: 'alexnet'" in result.stderr


def test_purify_without_the_data_a_defense_needs_says_which_flag(ci_run, tmp_path):
    result = run_cli(
        "purify",
        str(ci_run.run_dir / "model.safetensors"),
        "--method",
        "rnp",
        "--out",
        str(tmp_path / "x"),
        "--no-export",
    )
    assert result.returncode == 1 and "--clean-data" in result.stderr.strip().splitlines()[-1]


def test_evaluate_scores_the_exported_onnx_file_fp32_and_int8_like_the_model(ci_run, tmp_path, capsys):
    """The file that ships is re-checked for the backdoor: CA/ASR of the ONNX files against the model's."""
    run = str(ci_run.run_dir)
    assert main(["export", run, "--out", str(tmp_path / "n.onnx"), "--int8", "--eval-images", "0"]) == 0
    assert main(["evaluate", run, "--test-subset", "300", "--out", str(tmp_path / "torch.json")]) == 0
    scores = {}
    for name in ("n.onnx", "n.int8.onnx"):
        assert (
            main(
                [
                    "evaluate",
                    str(tmp_path / name),
                    "--attack-from",
                    run,
                    "--test-subset",
                    "300",
                    "--out",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == 0
        )
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    reference = json.loads((tmp_path / "torch.json").read_text())
    assert scores["n.onnx"]["ca"] == pytest.approx(reference["ca"], abs=0.005) and scores["n.onnx"][
        "asr"
    ] == pytest.approx(reference["asr"], abs=0.005)
    assert scores["n.onnx"]["macs"] == pytest.approx(reference["macs"], rel=0.02)
    assert abs(scores["n.int8.onnx"]["ca"] - reference["ca"]) < 0.1 and scores["n.int8.onnx"]["asr"] is not None
    assert main(["purify", str(tmp_path / "n.onnx"), "--method", "clp", "--out", str(tmp_path / "p")]) == 2
    assert "needs the PyTorch model" in capsys.readouterr().err


def test_a_defense_that_leaves_the_backdoor_or_costs_accuracy_is_flagged():
    from ccpurify.cli import _outcome_warnings
    from ccpurify.metrics import BackdoorMetrics

    before = BackdoorMetrics(0.80, 0.95, 0.04, 100, 90)
    kept = _outcome_warnings(before, BackdoorMetrics(0.79, 0.90, 0.05, 100, 90))
    costly = _outcome_warnings(before, BackdoorMetrics(0.60, 0.01, 0.55, 100, 90))
    assert len(kept) == 1 and "ASR is still 90.0%" in kept[0]
    assert len(costly) == 1 and "cost 20.0 points" in costly[0]
    assert _outcome_warnings(before, BackdoorMetrics(0.78, 0.02, 0.70, 100, 90)) == []


def test_purify_prints_what_a_pass_chose_from_the_model(ci_run, tmp_path, capsys):
    out = tmp_path / "otbr"
    options = ["--set", "steps=2", "--set", "ratio_search=[0.05,0.1]", "--set", "search_images=32"]
    assert main(["purify", str(ci_run.run_dir), "--method", "otbr", *options, "--no-export", "--out", str(out)]) == 0
    chosen = json.loads((out / "report.json").read_text())["pipeline"]["passes"][0]["details"]["ratio"]
    assert f"chosen: otbr: ratio {chosen:g} (keeps " in capsys.readouterr().out
