"""The HTML report: rendered from real scans and from a synthetic 100-layer folder, re-rendered by the CLI,
served by `sensitivity view`, and importable without torch."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity import scan
from sensitivity.cli import main
from sensitivity.report import PLOTS, ReportDataError, load_report_data, render_report
from tests.models import PlantedOutlierNet, plant_exp_fault_

ROOT = Path(__file__).resolve().parents[2]
MAX_REPORT_BYTES = 5 * 1024 * 1024


class NaNChain(nn.Module):
    """`dim` sees one input channel at 1e5 (its weight compensates), so per-tensor W8A8 gives dim = bias
    and exp(20 * bias) overflows: `post` (a target layer) then outputs NaN in the cumulative pass, and the
    scan excludes `dim`, which keeps the policy finite."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dim = nn.Conv2d(8, 1, 1)
        self.post = nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(4, 3)
        self.register_buffer("gain", plant_exp_fault_(self.stem, self.dim, 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = torch.exp(self.dim(F.relu(self.stem(x)) * self.gain) * 20.0)
        return self.head(self.post(d - d).mean(dim=(2, 3)))  # inf - inf = NaN once exp overflows


def _batches(n: int = 4, shape: tuple[int, ...] = (4, 3, 12, 12), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real scan with one excluded layer (`mid`), saved and rendered."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("planted") / "planted"
    scan(PlantedOutlierNet(), _batches(), model_name="planted").save(str(out))
    render_report(out)
    return out


@pytest.fixture(scope="module")
def nan_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real scan whose all-naive model turns NaN at a target layer (`post`)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("nan") / "nan"
    batches = [torch.rand(2, 3, 8, 8) for _ in range(4)]
    scan(NaNChain(), batches, model_name="nanchain").save(str(out))
    render_report(out)
    return out


def _rows(page: str) -> dict[str, str]:
    """layer name -> the class attribute of its <tr> in the layer table."""
    return {html.unescape(m[1]): m[0] for m in re.findall(r'<tr class="([^"]*)" data-name="([^"]*)"', page)}


# ------------------------------------------------------------------------------------------- real scans
def test_report_sections_columns_and_highlights(planted: Path) -> None:
    page = (planted / "report.html").read_text()
    for section in ("summary", "layers", "plots", "files", "details"):
        assert f'<section id="{section}">' in page
    table = pd.read_csv(planted / "layers.csv")
    for col in table.columns:  # every CSV column is in the table, shown or behind the toggle
        assert f'data-key="{col}"' in page, col
    rows = _rows(page)
    assert list(rows) == list(table["name"])  # execution order
    assert "excluded" in rows["mid"].split()
    assert all("excluded" not in rows[n].split() for n in rows if n != "mid")
    assert "W8A8" in page and "calibrator max" in page and "4 batches" in page
    # comparison: FP, all naive, naive + exclusion, and the chosen policy marked
    configs = re.findall(r'data-config="([^"]+)"', page)
    assert configs[:3] == ["fp", "naive", "naive+exclusion"]
    assert page.count('<span class="badge">chosen</span>') == 1
    assert "No NaN/Inf anywhere" in page


def test_report_is_self_contained(planted: Path) -> None:
    page = (planted / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', page), "only data: URIs and in-page anchors"
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script src" not in page
    imgs = re.findall(r'<img src="data:image/png;base64,', page)
    written = sorted(p.stem for p in (planted / "plots").glob("*.png"))
    assert len(imgs) == len(written) >= 5
    assert {"layer_error", "sqnr", "cumulative", "channel_profiles", "histograms"} <= set(written)
    for name in ("exclude.yaml", "policy.yaml"):
        assert f'download="{name}"' in page
        pre = re.search(rf'<pre id="file-{name.replace(".", "-")}">(.*?)</pre>', page, re.S)
        assert pre and html.unescape(pre[1]) == (planted / name).read_text()


def test_nonfinite_rows_and_first_layer_named(nan_report: Path) -> None:
    page = (nan_report / "report.html").read_text()
    scan_json = json.loads((nan_report / "scan.json").read_text())
    rows = _rows(page)
    assert "nonfinite" in rows["post"].split()
    assert "excluded" in rows["dim"].split()
    first = scan_json["first_nonfinite"]
    assert first, "the all-naive model must turn non-finite"
    callout = re.search(r'<div class="callout bad" id="first-nonfinite">(.*?)</div>', page, re.S)
    assert callout and f"<code>{first}</code>" in callout[1]
    assert "stays finite" in callout[1]  # policy_first_nonfinite is None
    assert re.search(r'<tr class="[^"]*nonfinite[^"]*" data-config="naive">', page)


def test_rerender_is_reproducible(planted: Path) -> None:
    before = (planted / "report.html").read_bytes()
    plots = {p.name: p.read_bytes() for p in (planted / "plots").glob("*.png")}
    render_report(planted)
    assert (planted / "report.html").read_bytes() == before
    assert {p.name: p.read_bytes() for p in (planted / "plots").glob("*.png")} == plots
    assert not list(planted.glob(".*.tmp")) and not list((planted / "plots").glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_report_rerenders(planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("layers.csv", "scan.json", "stats.npz", "exclude.yaml", "policy.yaml"):
        (copy / name).write_bytes((planted / name).read_bytes())
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").read_bytes() == (planted / "report.html").read_bytes()
    assert "report written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("missing-folder", "does not exist"),
        ("no-layers", "layers.csv is missing"),
        ("bad-json", "scan.json is not valid JSON"),
        ("not-scan", "not a sensitivity scan.json"),
        ("bad-npz", "stats.npz is not a readable stats archive"),
        ("no-stats", "stats.npz is missing"),
        ("bad-csv", "no 'name' column"),
    ],
)
def test_cli_report_errors_are_one_line(
    planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, message: str
) -> None:
    folder = tmp_path / "r"
    if broken != "missing-folder":
        folder.mkdir()
        for name in ("layers.csv", "scan.json", "stats.npz"):
            (folder / name).write_bytes((planted / name).read_bytes())
    edits = {
        "no-layers": lambda: (folder / "layers.csv").unlink(),
        "bad-json": lambda: (folder / "scan.json").write_text("{"),
        "not-scan": lambda: (folder / "scan.json").write_text('{"format": "other"}'),
        "bad-npz": lambda: (folder / "stats.npz").write_bytes(b"PK\x03\x04 truncated"),
        "no-stats": lambda: (folder / "stats.npz").unlink(),
        "bad-csv": lambda: (folder / "layers.csv").write_text("a,b\n1,2\n"),
    }
    if broken in edits:
        edits[broken]()
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (folder / "report.html").exists()


def test_load_report_data_discovers_methods(planted: Path) -> None:
    data = load_report_data(planted)
    assert data.methods("iso")[0] == "naive" and "policy" in data.methods("cum")
    assert "unsigned" not in data.methods("iso")  # sign variants are not quantization methods
    assert data.excluded == ["mid"]
    with pytest.raises(ReportDataError):
        load_report_data(planted / "nope")


def test_view_serves_when_headless(
    planted: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sensitivity.report import serve

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    opened: list[str] = []
    monkeypatch.setattr(serve.webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    fetched: list[bytes] = []

    def serve_once(self: serve.ReportServer, poll_interval: float = 0.5) -> None:
        import threading

        thread = threading.Thread(target=self.handle_request)
        thread.start()
        with urllib.request.urlopen(self.url, timeout=10) as resp:  # loopback only
            fetched.append(resp.read())
        thread.join(10)
        raise KeyboardInterrupt  # what Ctrl-C does to serve_forever

    monkeypatch.setattr(serve.ReportServer, "serve_forever", serve_once)
    assert main(["view", str(planted)]) == 130  # Ctrl-C: "interrupted: stopped serving"
    assert opened == []  # no DISPLAY: no browser attempt
    assert fetched == [(planted / "report.html").read_bytes()]
    out = capsys.readouterr().out
    assert re.search(r"http://127\.0\.0\.1:\d+/report\.html", out)


def test_view_opens_a_browser_when_there_is_one(planted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sensitivity.report import serve

    monkeypatch.setenv("DISPLAY", ":0")
    opened: list[str] = []
    monkeypatch.setattr(serve.webbrowser, "get", lambda *a: object())
    monkeypatch.setattr(serve.webbrowser, "open", lambda url, *a, **k: opened.append(url) or True)
    monkeypatch.setattr(serve.ReportServer, "serve_forever", lambda self, *a: pytest.fail("must not serve"))
    assert main(["view", str(planted)]) == 0
    assert opened == [(planted / "report.html").resolve().as_uri()]


def test_view_no_browser_forces_serving(planted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sensitivity.report import serve

    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(serve.webbrowser, "open", lambda *a, **k: pytest.fail("must not open a browser"))
    served: list[str] = []

    def stop(self: serve.ReportServer, *a: object) -> None:
        served.append(self.url)
        raise KeyboardInterrupt

    monkeypatch.setattr(serve.ReportServer, "serve_forever", stop)
    assert main(["view", str(planted), "--no-browser"]) == 130
    assert served and served[0].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_view_stopped_by_a_signal_says_it_stopped_serving(planted: Path, sig: signal.Signals) -> None:
    """A served report stopped by SIGTERM (143) or Ctrl-C: the line says serving stopped, not that a
    report went unwritten (view writes nothing)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sensitivity", "view", str(planted), "--no-browser", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "serving" in first, first
        proc.send_signal(sig)
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), rest
    assert "stopped serving" in rest and "report was written" not in rest and "Traceback" not in rest


def test_view_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["view", str(tmp_path / "none"), "--no-browser"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- import hygiene
_CHECK = (
    "import sys; {setup}import sensitivity.report; bad = [m for m in sys.modules if m == 'torch' or "
    "m.startswith(('torch.', 'sensitivity.quant', 'sensitivity.capture'))]; print(bad); assert not bad, bad"
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_report_package_never_imports_torch_quant_or_capture() -> None:
    # the package itself, with sensitivity/__init__ bypassed (it re-exports QuantSpec, see below)
    setup = (
        "import types, pathlib; pkg = types.ModuleType('sensitivity'); "
        f"pkg.__path__ = [{str(ROOT / 'sensitivity')!r}]; sys.modules['sensitivity'] = pkg; "
    )
    proc = _run(_CHECK.format(setup=setup))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_sensitivity_report_does_not_load_torch() -> None:
    """Through the real package: `import sensitivity` is lazy (nothing but errors), so the report alone
    stays torch-free, and so does `import sensitivity` itself."""
    assert _run("import sys, sensitivity; print('torch' in sys.modules)").stdout.strip() == "False"
    proc = _run(_CHECK.format(setup=""))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- synthetic 100-layer folder
def write_synthetic_report(folder: Path, n_layers: int = 100, seed: int = 0) -> Path:
    """A ResNet-sized report folder with realistic stats arrays, future columns (SmoothQuant, a user
    metric, an unknown column), NaN and inf values: what a large real scan writes, without the scan."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    widths = [64, 128, 256, 512, 1024, 2048]
    rows, stats = [], {}
    names = [f"backbone.layer{1 + i // 25}.{i % 25 // 3}.conv{1 + i % 3}" for i in range(n_layers - 1)] + [
        "fc"
    ]
    stats["layers"] = np.array(names)
    excluded = set(rng.choice(n_layers, 5, replace=False).tolist())
    for i, name in enumerate(names):
        cin = widths[min(i * len(widths) // n_layers, len(widths) - 1)]
        cout = cin if i % 3 else cin * 2
        iso = float(rng.lognormal(-4.5, 1.0)) * (40 if i in excluded else 1)
        cum = iso * (1 + i / 10)
        row = {
            "name": name, "type": "Linear" if name == "fc" else "Conv2d", "order": i,
            "in_shape": f"32x{cin}x14x14", "out_shape": f"32x{cout}x14x14", "weight_shape": f"{cout}x{cin}x3x3",
            "macs": 14 * 14 * 9 * cin * cout, "calls": 4, "folded_bn": f"{name}.bn" if i % 2 else "",
            "input_min": 0.0 if i % 3 else -3.2, "input_absmax": float(rng.uniform(2, 400)),
            "act_unsigned": bool(i % 3), "outlier_ratio": float(rng.lognormal(1, 1.2)),
        }  # fmt: skip
        for mode, method, rel in (("iso", "naive", iso), ("cum", "naive", cum), ("iso", "sq", iso / 3),
                                  ("cum", "policy", cum / 5)):  # fmt: skip
            sqnr = -20 * np.log10(rel)
            row |= {f"{mode}_{method}_l1": rel * 0.7, f"{mode}_{method}_rel_l1": rel,
                    f"{mode}_{method}_mse": rel**2, f"{mode}_{method}_sqnr_db": sqnr,
                    f"{mode}_{method}_cosine": 1 - rel**2 / 2, f"{mode}_{method}_max_abs": rel * 30,
                    f"{mode}_{method}_nonfinite": 0}  # fmt: skip
        row |= {"iso_unsigned_rel_l1": iso * 0.8, "iso_unsigned_sqnr_db": -20 * np.log10(iso * 0.8),
                "unsigned_gain_db": 1.9, "sq_alpha": 0.5, "zz_future_column": f"note {i}",
                "decision": "fp" if i in excluded else ("smoothquant" if i % 7 == 0 else "naive"),
                "alpha": 0.5 if i % 7 == 0 and i not in excluded else np.nan,
                "reason": "isolated relative L1 0.4 > 0.15" if i in excluded else ""}  # fmt: skip
        out = iso**2 * float(rng.lognormal(0, 1.0))  # output-referred: related to the local error, not equal
        row |= {"out_naive_err": out, "out_sq_channel_0.5_err": out / 3, "out_naive_p99.99_err": out * 0.9,
                "out_err_source": "probe (4 x 16 samples)", "out_best": "sq_channel_0.5" if i % 7 == 0 else "naive",
                "out_exact_err": out * float(rng.uniform(0.7, 1.3)) if i % 9 == 0 else np.nan,
                "calibrator": "p99.99" if i % 5 == 0 else ""}  # fmt: skip
        rows.append(row)
        chan = rng.lognormal(0, 0.5, cin).astype(np.float32)
        chan[rng.choice(cin, 3)] *= 300
        stats[f"chan_absmax/{name}"] = chan
        stats[f"act_hist/{name}"] = np.histogram(rng.standard_normal(20000), 128)[0].astype(np.float64) * 1e3
        stats[f"act_range/{name}"] = np.array([-3.2, 400.0], dtype=np.float32)
        stats[f"weight_hist/{name}"] = np.histogram(rng.standard_normal(20000), 128)[0].astype(np.float64)
        stats[f"weight_range/{name}"] = np.array([-0.3, 0.3], dtype=np.float32)
        alphas = np.linspace(0, 1, 11)
        stats[f"alpha_sweep/{name}"] = np.stack(
            [
                alphas,
                iso * (1 + 4 * (alphas - 0.55) ** 2),
                -20 * np.log10(iso * (1 + 4 * (alphas - 0.55) ** 2)),
            ],
            1,
        )
    bad = n_layers * 2 // 5
    rows[bad]["cum_naive_nonfinite"] = 1024  # one NaN row
    rows[bad]["cum_naive_rel_l1"] = np.nan
    rows[bad + 1]["iso_naive_sqnr_db"] = np.inf
    pd.DataFrame(rows).to_csv(folder / "layers.csv", index=False, float_format="%.6g", lineterminator="\n")
    np.savez_compressed(folder / "stats.npz", **stats)
    comparison = [
        {"config": c, "quantized_layers": q, "fp_layers": n_layers - q, "out_rel_l1": e, "out_sqnr_db": s,
         "out_cosine": 0.99, "out_max_abs": 1.0, "out_nonfinite": nf, "smoothquant_layers": sq}
        for c, q, e, s, nf, sq in (("fp", 0, 0.0, "inf", 0, 0), ("naive", n_layers, None, None, 4096, 0),
                                   ("naive+exclusion", n_layers - 5, 0.03, 30.1, 0, 0),
                                   ("policy", n_layers - 5, 0.01, 39.9, 0, 14))
    ]  # fmt: skip
    scan_json = {
        "format": "sensitivity-scan", "version": 1, "model": "resnet-synthetic",
        "spec": {"spec": "W8A8", "w_bits": 8, "a_bits": 8, "act_sign": "signed", "calibrator": "percentile",
                 "percentile": 99.99},
        "options": {"thresholds": {"max_rel_l1": 0.15, "min_sqnr_db": 15.0, "nonfinite": True}, "only": []},
        "seed": 0, "calibration": {"batches": 64, "fit_batches": 48, "heldout_batches": 16},
        "layers": n_layers, "excluded": [names[i] for i in sorted(excluded)],
        "first_nonfinite": names[bad], "policy_first_nonfinite": None, "comparison": comparison,
        "timings": {"prepare_s": 1.2, "calibrate_s": 40.0, "scan_s": 300.5, "total_s": 342.0},
        "versions": {"sensitivity": "0.1.0", "torch": "2.13.0", "python": "3.11"},
        "eval": {"metric": "top1", "values": {"fp": 0.761, "naive": 0.012, "naive+exclusion": 0.74,
                                              "policy": 0.755}},
        "fp_curve": [{"fp_layers": k, "layer": names[i] if k else "", "predicted": 0.02 / (1 + k),
                      "measured": 0.025 if k == 0 else (0.006 if k == 5 else None)}
                     for k, i in enumerate([0, *sorted(excluded)])]
                    + [{"fp_layers": len(excluded), "layer": "", "predicted": 0.002, "measured": 0.003,
                        "policy": True}],
    }  # fmt: skip
    (folder / "scan.json").write_text(json.dumps(scan_json, indent=2))
    (folder / "exclude.yaml").write_text(
        "version: 1\nspec: W8A8\nexclude:\n"
        + "".join(
            f"  - layer: {names[i]}\n    reason: isolated relative L1 0.4 > 0.15\n" for i in sorted(excluded)
        )
    )
    (folder / "policy.yaml").write_text(
        "version: 1\nspec: W8A8\nrules:\n  - match: '**'\n    method: naive\n"
    )
    return folder


def test_synthetic_100_layer_report_is_small_and_complete(tmp_path: Path) -> None:
    folder = write_synthetic_report(tmp_path / "big")
    page_path = render_report(folder)
    size = page_path.stat().st_size
    assert size < MAX_REPORT_BYTES, f"report.html is {size / 1e6:.2f} MB"
    page = page_path.read_text()
    assert len(_rows(page)) == 100
    assert {p.key for p in PLOTS} == {p.stem for p in (folder / "plots").glob("*.png")}  # sweeps included
    assert "isolated · sq" in page  # a method discovered from the columns
    assert 'data-key="zz_future_column"' in page  # unknown columns are kept (detail toggle)
    assert "user metric" in page and "top1" in page and "0.755" in page  # scan.json `eval`
    assert "nonfinite" in _rows(page)["backbone.layer2.5.conv2"].split()
    assert page.count("decision-smoothquant") >= 10
    print(f"\n100-layer report.html: {size / 1e6:.2f} MB")


def test_alpha_sweep_plot_skipped_without_sweeps(tmp_path: Path) -> None:
    folder = write_synthetic_report(tmp_path / "r", n_layers=12)
    with np.load(folder / "stats.npz") as z:
        kept = {k: z[k] for k in z.files if not k.startswith("alpha_sweep/")}
    np.savez_compressed(folder / "stats.npz", **kept)
    table = pd.read_csv(folder / "layers.csv")
    sq_columns = [c for c in table.columns if c.startswith("iso_sq_")]
    table.drop(columns=sq_columns).to_csv(folder / "layers.csv", index=False)
    (folder / "plots").mkdir()
    (folder / "plots" / "alpha_sweep.png").write_bytes(b"stale")
    page = render_report(folder).read_text()
    assert 'id="plot-alpha_sweep"' not in page and not (folder / "plots" / "alpha_sweep.png").exists()
    assert "isolated · sq" not in page and 'id="plot-layer_error"' in page


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("evil.example:{port}", 421), ("127.0.0.1.nip.io", 421),
     ("", 421)],
)  # fmt: skip
def test_view_server_answers_only_loopback_host_names(planted: Path, host: str, status: int) -> None:
    """DNS rebinding: a page whose own name resolves to 127.0.0.1 sends that name in Host and gets nothing."""
    import http.client
    import threading

    from sensitivity.report.serve import make_server

    server = make_server(planted)
    port = server.server_address[1]
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", "/report.html", skip_host=True)
        if host:
            conn.putheader("Host", host.format(port=port))
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == status
        assert (b"sensitivity" in body) == (status == 200)  # the report, or an error page
    finally:
        thread.join(10)
        server.server_close()
