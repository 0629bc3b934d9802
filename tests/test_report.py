"""HTML reports without a browser: what each page says, that it is self-contained, where it is
written, and the errors. The pages in a real browser: tests/test_report_browser.py."""

import json
import re
import subprocess
import sys

import pytest

from tightfit.cli import main
from tightfit.errors import ConfigError
from tightfit.report import charts, detect_kind, render, write_report
from tightfit.units import format_bytes


def _value(html: str, key: str) -> str:
    """The shown value of the verdict tile ``data-key=key``."""
    match = re.search(rf'data-key="{key}"><div class="label">[^<]*</div><div class="value[^"]*">([^<]*)</div>', html)
    assert match, f"no tile {key!r}"
    return match.group(1)


@pytest.mark.parametrize("kind", ["run", "plan", "pipeline", "compression", "doctor", "study"])
def test_each_kind_is_detected_and_is_one_offline_file(report_sources, kind):
    detected, _ = detect_kind(report_sources[kind])
    assert detected == ("plan" if kind == "pipeline" else kind)
    _, html = render(report_sources[kind])
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # nothing fetched: no external URL but the SVG namespace, no link/src/import/url()
    assert re.findall(r"https?://[^\"' ]+", html) == ["http://www.w3.org/2000/svg"] * html.count("xmlns=")
    for fetch in ("<link", " src=", "@import", "url("):
        assert fetch not in html
    assert "prefers-color-scheme: dark" in html and "@media print" in html
    assert 'class="verdict ' in html


def test_run_page_shows_the_summary_numbers_and_the_curves(report_sources):
    run_dir = report_sources["run"]
    summary = json.loads((run_dir / "summary.json").read_text())
    _, html = render(run_dir)
    assert _value(html, "test_accuracy") == f"{summary['test_accuracy'] * 100:.1f} %"
    assert _value(html, "peak_bytes") == format_bytes(summary["peak_memory_bytes"]["process_rss"])
    assert f"Trained: {summary['test_accuracy'] * 100:.1f} % test accuracy" in html
    for chart in ("loss curves", "accuracy curves", "memory over the run", "learning rate", "samples/s"):
        assert f'aria-label="{chart}"' in html
    train_steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["stage"] == "train"
    ]
    # one dot per logged training step on the loss curve (the series is short enough for dots)
    loss_chart = html.split('aria-label="loss curves"')[1].split("</svg>")[0]
    assert loss_chart.count("<title>train loss at") == len(train_steps)
    assert 'id="checkpoints"' in html and '<tr class="best"><td>best</td>' in html


def test_training_writes_the_report_by_default_and_not_when_switched_off(report_sources, tmp_path):
    from tightfit.api import train

    assert (report_sources["run"] / "report.html").is_file()  # the fixture's run: written by HtmlReport
    settings = {
        "epochs": 1,
        "max_steps": 2,
        "data": {"limit": 200},
        "logging": {"console": False, "tensorboard": False},
    }
    summary = train({**settings, "run_dir": str(tmp_path / "on")})
    assert summary["report"] == str(tmp_path / "on" / "report.html") and (tmp_path / "on" / "report.html").is_file()
    settings["logging"]["report"] = False
    summary = train({**settings, "run_dir": str(tmp_path / "off")})
    assert "report" not in summary and not (tmp_path / "off" / "report.html").exists()


def test_an_unfinished_run_says_so(report_sources, tmp_path):
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (run_dir / name).write_text((report_sources["run"] / name).read_text())
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write('{"stage": "train", "step": 9')  # a line torn by a killed run
    _, html = render(run_dir)
    assert "Unfinished run" in html and 'data-verdict="warn"' in html


def test_a_run_whose_loss_did_not_move_is_a_warning_not_a_success(report_sources, tmp_path):
    run_dir = tmp_path / "flat"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((report_sources["run"] / "config.yaml").read_text())
    summary = json.loads((report_sources["run"] / "summary.json").read_text())
    lines = [json.dumps({"stage": "val", "step": step, "val_loss": 2.30 - step * 1e-4}) for step in (10, 20, 30)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    old_summary = {key: value for key, value in summary.items() if key != "diagnosis"}  # a run from before diagnosis
    (run_dir / "summary.json").write_text(json.dumps(old_summary))
    _, html = render(run_dir)
    assert 'data-verdict="warn"' in html and "the loss barely moved" in html
    flat = {
        "finding": "flat loss",
        "evidence": "the training loss did not move over steps 13-112",
        "advice": "the learning rate is likely too low",
    }
    (run_dir / "summary.json").write_text(json.dumps({**summary, "diagnosis": [flat]}))
    _, html = render(run_dir)  # the run's own diagnosis is what the page says
    assert 'data-verdict="warn"' in html and "flat loss: the training loss did not move over steps 13-112" in html
    assert summary["diagnosis"] == []
    _, html = render(report_sources["run"])  # the real run learnt
    assert 'data-verdict="good"' in html and "barely moved" not in html and "flat loss:" not in html
    assert "no flat loss, no overfitting and no underfitting" in html


def test_memory_chart_draws_the_device_memory_against_the_planned_peak_and_the_budget(report_sources, tmp_path):
    run_dir = tmp_path / "cuda"
    run_dir.mkdir()
    config = (report_sources["run"] / "config.yaml").read_text()
    assert "\nbudget: null\n" in config
    (run_dir / "config.yaml").write_text(config.replace("\nbudget: null\n", "\nbudget: 6GiB\n"))
    summary = json.loads((report_sources["run"] / "summary.json").read_text())
    summary.update(
        device="cuda:0",
        batch_search_peak_bytes=3 * 2**30,
        peak_memory_bytes={"process_rss": 2**30, "cuda_allocated": 3 * 2**30 + 5, "cuda_reserved": 4 * 2**30},
    )
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [
        {
            "stage": "train",
            "step": step,
            "train_loss": 2.0 / step,
            "memory/rss_bytes": 2**30,
            "memory/cuda_allocated_bytes": step * 2**28,
            "memory/cuda_reserved_bytes": 4 * 2**30,
        }
        for step in (1, 2, 3)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    _, html = render(run_dir)
    assert _value(html, "peak_bytes") == format_bytes(3 * 2**30 + 5)
    chart = html.split('aria-label="memory over the run"')[1].split("</figure>")[0]
    assert "<title>CUDA allocated</title>" in chart and "<title>CUDA reserved</title>" in chart
    assert "batch search: step peak 3.00 GiB" in chart and "budget 6.00 GiB" in chart
    assert "process RSS is what the monitor sees" not in chart  # that caveat is for CPU runs


def test_plan_page_breaks_the_peak_down_against_the_usable_memory(report_sources):
    plan = json.loads(report_sources["plan"].read_text())
    _, html = render(report_sources["plan"])
    assert _value(html, "peak_bytes") == format_bytes(plan["peak_bytes"])
    assert _value(html, "budget_bytes") == format_bytes(plan["budget_bytes"])
    assert html.count("<rect class=") >= sum(value > 0 for value in plan["breakdown"].values())
    assert "usable minus 10% margin" in html and 'data-verdict="good"' in html


def test_pipeline_page_has_one_row_per_stage(report_sources):
    pipeline = json.loads(report_sources["pipeline"].read_text())
    _, html = render(report_sources["pipeline"])
    table = html.split('id="stages"')[1].split("<tbody>")[1].split("</table>")[0]
    assert table.count("<tr") == len(pipeline["stages"])
    assert f"All {len(pipeline['stages'])} stages fit" in html


def test_compression_page_names_the_best_artifact_and_marks_flagged_steps(report_sources):
    report = json.loads((report_sources["compression"] / "report.json").read_text())
    _, html = render(report_sources["compression"])
    assert _value(html, "best_artifact") == report["best"]["fastest"]
    assert _value(html, "flagged") == "1"
    assert html.count('<tr class="flagged">') == 1 and html.count('<tr class="best">') == 1
    assert html.count('<circle class="best"') == 2  # ringed on both scatters
    assert html.count('<circle class="bad"') == 2  # the flagged step, red on both


def test_doctor_page_shows_the_verdict_and_every_check(report_sources):
    doctor = json.loads(report_sources["doctor"].read_text())
    _, html = render(report_sources["doctor"])
    assert doctor["verdict"]["summary"][1:] in html
    assert html.split('id="checks"')[1].split("<tbody>")[1].split("</table>")[0].count("<tr") == len(doctor["checks"])


def test_doctor_page_with_a_broken_dataset_is_red_and_names_the_file(tmp_path):
    from PIL import Image

    from tightfit.hardware.doctor import run_doctor
    from tightfit.report import render_data

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for index in range(2):
                Image.new("RGB", (8, 8), (index * 90, 40 if label == "cat" else 200, 0)).save(
                    tmp_path / split / label / f"{index}.png"
                )
    (tmp_path / "train" / "cat" / "broken.png").write_text("not an image")
    html = render_data("doctor", run_doctor(data_dir=tmp_path, run_dir=tmp_path, smoke_test=False))
    assert 'data-verdict="bad"' in html
    dataset = html.split('id="dataset"')[1].split("</section>")[0]
    assert "train/cat/broken.png" in dataset and '<span class="badge bad">error</span>' in dataset


def test_study_page_ranks_results_with_intervals_and_the_paired_tests(report_sources, tmp_path):
    study = json.loads((report_sources["study"] / "results.json").read_text())
    statistics = study["evaluations"]["statistics"]
    _, html = render(report_sources["study"])
    best = max(statistics["table"], key=lambda row: row["accuracy"])
    assert _value(html, "best_result") == f"{best['arm']} / {best['classifier']}"
    low, high = best["accuracy_ci"]
    assert f"{best['accuracy'] * 100:.1f} % [{low * 100:.1f}, {high * 100:.1f}]" in html
    assert html.split('id="results"')[1].split("<tbody>")[1].split("</table>")[0].count("<tr") == len(
        statistics["table"]
    )
    assert html.count('aria-label="confusion matrix of') == len(statistics["confusion"])
    assert html.count('aria-label="paired-test p-values') == len(statistics["comparisons"])
    assert 'data-verdict="good"' in html and "7 / 7" in html
    # a significant pair turns green in its matrix (twice: above and below the diagonal); a stage not run turns the
    # verdict amber
    statistics["comparisons"]["svm"]["pairs"][0]["corrected_t"]["p_value"] = 0.01
    study["stages"][-1]["status"] = "running"
    (tmp_path / "results.json").write_text(json.dumps(study))
    _, html = render(tmp_path / "results.json")
    svm = html.split('aria-label="paired-test p-values, svm"')[1].split("</svg>")[0]
    assert svm.count('<rect class="good"') == 2
    assert 'data-verdict="warn"' in html and "not complete: statistics" in html


def test_text_from_the_sources_is_escaped(tmp_path, report_sources):
    plan = json.loads(report_sources["plan"].read_text())
    plan["model"] = "<script>alert(1)</script>"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    _, html = render(tmp_path / "plan.json")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_report_command_writes_beside_the_source_or_where_told(report_sources, tmp_path, capsys):
    assert main(["report", str(report_sources["plan"])]) == 0
    assert f"plan report written to {report_sources['plan'].with_suffix('.html')}" in capsys.readouterr().out
    assert report_sources["plan"].with_suffix(".html").is_file()
    assert main(["report", str(report_sources["compression"]), "-o", str(tmp_path / "c.html"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "compression", "path": str(tmp_path / "c.html")}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: path.mkdir(), "not a training run, a compression run or a study"),
        (lambda path: path.write_text('{"hello": 1}'), "not a tightfit report source"),
        (lambda path: path.write_text("{not json"), "not valid JSON"),
        (lambda path: None, "no such file or folder"),
    ],
)
def test_bad_sources_are_one_line_errors_and_write_nothing(tmp_path, capsys, make, message):
    source = tmp_path / "source.json"
    make(source)
    before = sorted(tmp_path.rglob("*"))
    assert main(["report", str(source)]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(ConfigError):
        write_report(source)


def test_plan_html_and_doctor_html_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "plan.html"
    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:mlp",
                "--input",
                "64",
                "--batch-size",
                "8",
                "--precision",
                "fp32",
                "--device",
                "rtx3050-laptop-6gb",
                "--json",
                "--html",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    plan = json.loads(captured.out)  # --json output stays one document: the page's path went to stderr
    assert str(out) in captured.err
    assert f'<div class="value">{format_bytes(plan["peak_bytes"])}</div>' in out.read_text()
    assert main(["doctor", "--no-smoke-test", "--run-dir", str(tmp_path), "--html", str(tmp_path / "doctor.html")]) in (
        0,
        1,
    )
    assert "doctor report" in (tmp_path / "doctor.html").read_text()
    # a page that cannot be written is refused before the work
    assert (
        main(["plan", "--model", "builtin:mlp", "--input", "64", "--html", str(tmp_path / "missing" / "p.html")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_report_module_does_not_import_torch(report_sources):
    code = (
        f"import sys; from tightfit.report import render; render({str(report_sources['run'])!r}); "
        f"render({str(report_sources['compression'])!r}); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_nice_ticks_are_round_and_cover_the_range():
    assert charts.nice_ticks(0, 0.95) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(3, 97) == [0, 20, 40, 60, 80, 100]
    gib = charts.bytes_axis("", 5.3 * 2**30)
    assert gib.format(2 * 2**30) == "2 GiB"


def test_stacked_bar_segments_are_proportional_to_their_values():
    svg = charts.stacked_bars([("a", [("x", 100.0), ("y", 300.0)])], width=1000)
    widths = [float(width) for width in re.findall(r'<rect class="s\d" x="[\d.]+" y="\d+" width="([\d.]+)"', svg)]
    assert widths[1] == pytest.approx(3 * widths[0], rel=0.01)


def test_scatter_labels_of_points_at_the_same_height_do_not_overlap():
    points = [charts.Point(f"artifact {index}", 100, 98.9) for index in range(4)] + [charts.Point("far", 200, 98.9)]
    svg = charts.scatter(points, x_axis=charts.Axis("x"), y_axis=charts.Axis("y"))
    baselines = re.findall(r'<text class="label" x="[\d.]+" y="([\d.]+)" text-anchor="\w+">artifact', svg)
    assert len(baselines) == 4 and len(set(baselines)) == 4  # four points on one spot: four label rows


HOSTILE = "<img src=x onerror=alert(1)>"
# values a page looks up in its own tables (tones, orders): a hostile one is refused, not shown
ENUMERATED = {
    "verdict",
    "status",
    "severity",
    "kind",
    "mode",
    "tone",
    "layout",
    "precision",
    "optimizer",
    "strategy",
    "device_type",
    "task",
    "format",
    "type",
    "metric_name",
    "direction",
    "unit",
}


def _poison(value, key=""):
    if isinstance(value, dict):
        return {name: _poison(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_poison(item, key) for item in value]
    if isinstance(value, str) and key not in ENUMERATED:
        return HOSTILE
    if key in ("micro_batch_size", "accumulation_steps"):  # the plan page's batch cells (issue 19)
        return HOSTILE
    return value


@pytest.mark.parametrize("kind", ["plan", "pipeline", "study", "compression", "doctor"])
def test_a_hostile_value_in_every_text_field_is_escaped_on_every_page(tmp_path, report_sources, kind):
    source = report_sources[kind]
    path = source / ("results.json" if kind == "study" else "report.json") if source.is_dir() else source
    poisoned = tmp_path / kind / path.name
    poisoned.parent.mkdir()
    poisoned.write_text(json.dumps(_poison(json.loads(path.read_text()))))
    try:
        _, html = render(poisoned if kind not in ("study", "compression") else poisoned.parent)
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        pytest.fail(f"{kind}: a hostile value broke the page: {error!r}")
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
