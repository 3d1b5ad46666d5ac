"""`neurocat predict` end to end: accuracy, agreement with a plain torch loop, bad inputs, CLI."""

import contextlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision import transforms as T

from badfiles import HOSTILE_NAMES, make_bad_folder
from conftest import cli_env, neurocat_cmd
from flows.common import RunOptions
from flows.predict import predict_flow
from storage.store import Store


def plain_torch_top1(model, paths):
    prep = model.preprocessing
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    preds = []
    with torch.no_grad():
        for i in range(0, len(paths), 32):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
            preds += model.module(x).argmax(1).tolist()
    return preds


def test_predict_matches_plain_torch_loop(prefect_api, shared_images, tmp_path, model):
    result = predict_flow(RunOptions(data=str(shared_images), store=str(tmp_path / "p.zarr"),
                                     report=str(tmp_path / "report")))
    table = pd.read_csv(result["predictions"])
    assert list(table.columns) == ["path", "label", "pred_index", "pred_wnid", "pred_name", "prob"]
    assert len(table) == 250
    assert result["top1"] >= 0.85
    assert (table["label"] == table["pred_wnid"]).mean() == result["top1"]
    expected = plain_torch_top1(model, [shared_images / p for p in table["path"]])
    assert table["pred_index"].tolist() == expected
    assert (tmp_path / "report" / "index.html").exists()


def test_bad_inputs_are_skipped_and_reported(prefect_api, shared_images, tmp_path):
    data = tmp_path / "data"
    expected = make_bad_folder(data, shared_images / "n01440764/n01440764_tench.JPEG")
    out = subprocess.run(neurocat_cmd() + ["predict", "--data", str(data), "--store", str(tmp_path / "s.zarr"),
                                           "--json"], capture_output=True, text=True, env=cli_env(prefect_api),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    table = pd.read_csv(result["predictions"])
    good = {p for p, s in expected.items() if s == "ok"}
    assert set(table["path"]) == good
    tench = table[table["path"].str.endswith(tuple(HOSTILE_NAMES) + ("good.jpg",))]
    assert (tench["pred_wnid"] == "n01440764").all()  # the same picture under every hostile name
    html = (tmp_path / "s-report" / "index.html").read_text()
    for path, status in expected.items():
        if status == "skipped":
            assert path in html
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in (tmp_path / "s-report" / "predict.html").read_text()


def test_a_store_and_report_inside_the_data_folder_are_no_images(prefect_api, shared_images, tmp_path):
    """`neurocat predict --data .` puts runs/ in the data: a rerun must not list the store's
    files and the report's thumbnails as images (17 skipped and 3 more 'images' before)."""
    import shutil

    data = tmp_path / "data"
    for folder in ("n01440764", "n01601694"):
        (data / folder).mkdir(parents=True)
        shutil.copy(next((shared_images / folder).iterdir()), data / folder / "a.jpg")
    opts = RunOptions(data=str(data), store=str(data / "runs" / "r.zarr"))
    predict_flow(opts)
    predict_flow(opts)
    manifest = Store(opts.store).read_manifest()
    assert sorted(manifest["path"]) == ["n01440764/a.jpg", "n01601694/a.jpg"] and (manifest["status"] == "ok").all()
    assert (data / "runs" / "r-report" / "index.html").exists()


def test_a_folder_that_cannot_be_listed_is_reported_skipped(prefect_api, shared_images, tmp_path, unlistable):
    """A class folder without permission (chmod 000; faked for root by the `unlistable`
    fixture, since root reads it anyway) was missing from the manifest and the report, its
    files neither predicted nor mentioned: now a skipped row, path = the folder, shown with
    its reason among the report's skipped inputs; the readable folders are predicted as before."""
    import shutil

    data = tmp_path / "data"
    for folder in ("n01440764", "n01494475", "n01514859"):
        (data / folder).mkdir(parents=True)
        shutil.copy(next((shared_images / folder).iterdir()), data / folder / "a.jpg")
    unlistable(data / "n01494475")
    result = predict_flow(RunOptions(data=str(data), store=str(tmp_path / "s.zarr")))
    manifest = Store(result["store"]).read_manifest().set_index("path")
    assert manifest.loc["n01494475", ["label", "status", "reason"]].tolist() == [
        "n01494475", "skipped", "unreadable folder: Permission denied"]
    assert pd.read_csv(result["predictions"])["path"].tolist() == ["n01440764/a.jpg", "n01514859/a.jpg"]
    html = (tmp_path / "s-report" / "index.html").read_text()
    assert '<td class="path">n01494475</td><td>unreadable folder: Permission denied</td>' in html


def test_cli_errors_are_one_line_exit_2(tmp_path, shared_images):
    cases = [
        ["predict", "--data", str(tmp_path / "missing")],
        ["predict", "--data", str(shared_images), "--model", "alexnet", "--weights", str(tmp_path / "none.pth")],
        ["predict", "--data", str(shared_images), "--runner", "carrier-pigeon", "--limit", "1"],
        ["predict", "--data", str(shared_images), "--batch-size", "0"],
        ["predict", "--data", str(shared_images), "--batch-size", "many"],  # argparse's own checks: one line too
        ["predict", "--data", str(shared_images), "--colour", "blue"],
        ["predict"],
        ["predict", "--data", str(shared_images), "--store", str(tmp_path / "a_file")],  # a file, not a folder
        ["predict", "--data", str(shared_images), "--report", str(tmp_path / "a_file")],
        ["predict", "--data", str(shared_images), "--runner", "tcp://127.0.0.1:1", "--limit", "1"],  # no scheduler
        ["report", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "a_file")],
        # a report replaces what its folder holds: not a folder of other files, nor the store's folder
        ["report", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "photos")],
        ["predict", "--data", str(shared_images), "--report", str(tmp_path / "photos"), "--limit", "1"],
        ["predict", "--data", str(shared_images), "--store", str(tmp_path / "r" / "s.zarr"), "--report",
         str(tmp_path / "r"), "--limit", "1"],
    ]
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    Store(str(tmp_path / "s.zarr"))
    for args in cases:
        out = subprocess.run(neurocat_cmd() + args, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, args
        assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("neurocat"), out.stderr
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]


def processes_with_home(home) -> list[int]:
    """Pids of the running processes whose environment has PREFECT_HOME=home."""
    wanted, pids = f"PREFECT_HOME={home}".encode(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and wanted in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_cli_without_an_api_runs_on_its_own_server_and_leaves_none(tmp_path, demo_data):
    """No API configured: the CLI starts Prefect's temporary server early (while it imports), a
    job runs on it, in the database of the Prefect home; a command that fails after the start
    kills it quietly. Either way no server outlives the command."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    ok = subprocess.run(neurocat_cmd() + ["predict", "--data", str(demo_data), "--limit", "4", "--store",
                                          str(tmp_path / "p.zarr"), "--json"], env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["images"] == 4
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:  # the run is on record there
        runs = db.execute("SELECT flow.name, flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_id").fetchall()
    assert runs == [("predict", "COMPLETED")]
    assert processes_with_home(home) == []
    bad = subprocess.run(neurocat_cmd() + ["catalog", "--data", str(demo_data), "--layers", "nope"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no layer 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert processes_with_home(home) == []


def test_a_killed_command_takes_its_temporary_server_with_it(tmp_path, demo_data):
    """kill -9 runs no atexit: the server must still go (it kept 220 MB and a port for good),
    and it runs in its own session, out of reach of the terminal's Ctrl-C."""
    import signal
    import time

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    job = subprocess.Popen(neurocat_cmd() + ["predict", "--data", str(demo_data), "--store", str(tmp_path / "p.zarr")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    def started():  # the server once it runs uvicorn: a fork not yet past its setsid has the command's session
        return [pid for pid in processes_with_home(home) if pid != job.pid and b"uvicorn" in command_line(pid)]
    while not started() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    servers = started()
    assert servers, "no temporary server started"
    assert all(os.getsid(pid) != os.getsid(job.pid) for pid in servers)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 30
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_home(home) == []


def test_cli_on_dask_prints_the_result_and_nothing_else(prefect_api, demo_data, tmp_path):
    """distributed's scheduler and workers log at INFO unless told otherwise (24 lines a run)."""
    out = subprocess.run(neurocat_cmd() + ["predict", "--data", str(demo_data), "--limit", "8", "--runner", "dask",
                                           "--store", str(tmp_path / "d.zarr"), "--json"],
                         env=cli_env(prefect_api), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["images"] == 8
    assert out.stderr.strip() == "", out.stderr[-2000:]


def test_json_names_only_the_files_that_were_written(prefect_api, tmp_path):
    """No usable image: no predictions.csv is written, and the result does not name one."""
    (tmp_path / "data" / "n01440764").mkdir(parents=True)
    (tmp_path / "data" / "n01440764" / "empty.jpg").write_bytes(b"")
    out = subprocess.run(neurocat_cmd() + ["predict", "--data", str(tmp_path / "data"), "--store",
                                           str(tmp_path / "s.zarr"), "--json"],
                         capture_output=True, text=True, env=cli_env(prefect_api), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert "predictions" not in result and not (tmp_path / "s-report" / "predictions.csv").exists()
    assert Path(result["report"]).is_file() and result["images"] == 0


def test_empty_folder_gives_empty_report(prefect_api, tmp_path):
    (tmp_path / "empty").mkdir()
    result = predict_flow(RunOptions(data=str(tmp_path / "empty"), store=str(tmp_path / "e.zarr")))
    assert result["images"] == 0
    assert "no usable image" in (tmp_path / "e-report" / "index.html").read_text()


def test_text_result_ends_with_the_store_and_report_paths(capsys):
    """`make demo` (and every command without --json) ends with the report's path, the line to open."""
    from neurocat.cli import _print_result

    _print_result({"store": "s.zarr", "report": "r/index.html", "images": 3, "faithfulness": {"a": 1}}, False)
    assert capsys.readouterr().out.splitlines() == ["images: 3", 'faithfulness: {"a": 1}', "store: s.zarr",
                                                    "report: r/index.html"]
