"""`segment` and `classify` over a list (`--list FILE.csv --output-dir DIR`, Med3DFMLib/batch.py) on real
scans: the bundled demo model on the three held-out hippocampus crops plus a truncated copy of one,
the summary, resuming (skips, retries, a tampered output redone), two gloo processes under torchrun,
a classification adapter trained on AdrenalMNIST3D masks, and one-line errors for bad lists."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from Med3DFMLib.cli import main

ROOT = Path(__file__).resolve().parents[2]
HIPPOCAMPUS = ROOT / "Testing" / "Data" / "hippocampus" / "images"
ADRENAL = ROOT / "Testing" / "Data" / "adrenal" / "adrenalmnist3d_64_trainval_subset.npz"
CASES = ["hippocampus_014", "hippocampus_024", "hippocampus_035"]


def summary(folder: Path, name: str = "summary.tsv") -> List[Dict[str, str]]:
    lines = [line for line in (folder / name).read_text().splitlines() if not line.startswith("#")]
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def scan_list(folder: Path) -> Path:
    """scans.csv: a copy of 014 by a relative path, 024 and 035 by absolute paths, and a truncated
    copy of 024 (the gzip stream stops short) between them."""
    shutil.copyfile(HIPPOCAMPUS / "hippocampus_014.nii.gz", folder / "hippocampus_014.nii.gz")
    whole = (HIPPOCAMPUS / "hippocampus_024.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(whole[: len(whole) // 3])
    rows = ["id,input", "a,hippocampus_014.nii.gz", f"b,{HIPPOCAMPUS / 'hippocampus_024.nii.gz'}", "c,broken.nii.gz", f"d,{HIPPOCAMPUS / 'hippocampus_035.nii.gz'}"]
    (folder / "scans.csv").write_text("\n".join(rows) + "\n")
    return folder / "scans.csv"


def run_segment_batch(listing: Path, out: Path, *extra: str) -> int:
    return main(["segment", "--list", str(listing), "--output-dir", str(out), "--device", "cpu", "--progress", "none", *extra])


def test_segment_list_summary_one_model_load_and_a_corrupt_scan(tmp_path, monkeypatch, capsys):
    import Med3DFMLib.segment as segment

    loads = []
    original = segment.load_resolved
    monkeypatch.setattr(segment, "load_resolved", lambda *a, **k: loads.append(1) or original(*a, **k))
    out = tmp_path / "out"
    assert run_segment_batch(scan_list(tmp_path), out, "--labelmaps") == 3  # a scan failed
    captured = capsys.readouterr()
    assert "4 scans: 3 done, 0 skipped, 1 failed" in captured.out
    assert captured.err.count("\n") == 1 and "1 of 4 scans failed" in captured.err
    assert len(loads) == 1  # one model for the whole list

    rows = summary(out)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and [r["row"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    assert [r["output"] for r in rows] == ["hippocampus_014.seg.nrrd", "hippocampus_024.seg.nrrd", "broken.seg.nrrd", "hippocampus_035.seg.nrrd"]
    assert rows[0]["input"] == "hippocampus_014.nii.gz"  # as the list gives it
    failed = rows[2]
    assert "broken.nii.gz is truncated or corrupt" in failed["error"] and not failed["sha256"] and not failed["segments"]
    assert not (out / "broken.seg.nrrd").exists() and not (out / "broken.seg.nrrd.done.json").exists()
    for row in (rows[0], rows[1], rows[3]):
        from Med3DFMLib.weights import sha256_of

        assert row["error"] == "" and row["model"] == "hippocampus-mr-demo@0.1.0" and float(row["seconds"]) >= 0
        assert row["sha256"] == sha256_of(out / row["output"])
        assert [part.split("=")[0] for part in row["segments"].split(";")] == ["anterior hippocampus", "posterior hippocampus"]
        assert (out / row["output"].replace(".seg.nrrd", ".nii.gz")).is_file()  # --labelmaps
        done = json.loads((out / (row["output"] + ".done.json")).read_text())
        assert set(done["outputs"]) == {"segmentation", "record", "labelmap"}

    # The volumes are those of the one-scan command on the same scan.
    single = tmp_path / "single.seg.nrrd"
    assert main(["segment", str(HIPPOCAMPUS / "hippocampus_024.nii.gz"), "-o", str(single), "--device", "cpu", "--progress", "none"]) == 0
    record = json.loads((tmp_path / "single.json").read_text())
    assert rows[1]["segments"] == ";".join(f"{s['name']}={s['volume_ml']}" for s in record["segments"])
    assert all(s["volume_ml"] > 1.0 for s in record["segments"])  # a real hippocampus, not an empty mask
    batch_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "hippocampus_024.nii.gz")))
    from Med3DFMLib.io.segmentations import read_labels

    assert np.array_equal(batch_labels, sitk.GetArrayFromImage(read_labels(single).image))
    assert summary(out, ".summary.rank0.tsv") == rows  # the running record holds the same rows


def test_rerun_skips_done_scans_retries_failed_and_redoes_a_tampered_output(tmp_path, capsys):
    listing = scan_list(tmp_path)
    out = tmp_path / "out"
    assert run_segment_batch(listing, out) == 3
    first = {r["id"]: r for r in summary(out)}

    assert run_segment_batch(listing, out) == 3
    again = {r["id"]: r for r in summary(out)}
    assert {k: r["status"] for k, r in again.items()} == {"a": "skipped", "b": "skipped", "c": "failed", "d": "skipped"}
    for key in "abd":
        assert again[key]["segments"] == first[key]["segments"] and again[key]["sha256"] == first[key]["sha256"]

    # Tamper with one output (same size, other bytes), lose another's completion record, mend the
    # corrupt scan: those three are done again, the fourth is still skipped.
    target = out / "hippocampus_024.seg.nrrd"
    data = bytearray(target.read_bytes())
    data[-20:] = b"\x00" * 20
    target.write_bytes(bytes(data))
    (out / "hippocampus_035.seg.nrrd.done.json").unlink()
    shutil.copyfile(HIPPOCAMPUS / "hippocampus_024.nii.gz", tmp_path / "broken.nii.gz")
    capsys.readouterr()
    assert run_segment_batch(listing, out) == 0
    assert "4 scans: 3 done, 1 skipped, 0 failed" in capsys.readouterr().out
    final = {r["id"]: r for r in summary(out)}
    assert {k: r["status"] for k, r in final.items()} == {"a": "skipped", "b": "done", "c": "done", "d": "done"}
    assert "changed since it was written" in final["b"]["note"]
    assert final["b"]["segments"] == first["b"]["segments"] == final["c"]["segments"]  # c is now a copy of b
    from Med3DFMLib.io.segmentations import read_labels

    read_labels(target)  # whole again

    # An input that changes after its output was made is redone too.
    os.utime(tmp_path / "hippocampus_014.nii.gz", ns=(1_000_000_000, 1_000_000_000))
    assert run_segment_batch(listing, out) == 0
    assert {r["id"]: r["status"] for r in summary(out)}["a"] == "done"

    # Other settings make other outputs: every scan is redone.
    assert run_segment_batch(listing, out, "--overlap", "0.5") == 0
    assert {(r["status"], r["note"]) for r in summary(out)} == {("done", "the model or settings changed")}


def test_a_run_cancelled_mid_scan_keeps_its_record_and_resumes(tmp_path, monkeypatch, capsys):
    """Cancelled after the second scan's outputs were written but before its completion record:
    the running record has the first row, and the next run skips the first and redoes the second."""
    import Med3DFMLib.batch as batch

    (tmp_path / "scans.csv").write_text("input\n" + "\n".join(str(HIPPOCAMPUS / f"{c}.nii.gz") for c in CASES[:2]) + "\n")
    out = tmp_path / "out"
    original = batch._write_done
    calls = []

    def cancel_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(batch, "_write_done", cancel_second)
    assert run_segment_batch(tmp_path / "scans.csv", out) == 130
    assert "cancelled" in capsys.readouterr().err
    assert [r["status"] for r in summary(out, ".summary.rank0.tsv")] == ["done"] and not (out / "summary.tsv").exists()
    assert (out / f"{CASES[1]}.seg.nrrd").is_file() and not (out / f"{CASES[1]}.seg.nrrd.done.json").exists()
    monkeypatch.setattr(batch, "_write_done", original)
    assert run_segment_batch(tmp_path / "scans.csv", out) == 0
    assert [r["status"] for r in summary(out)] == ["skipped", "done"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_share_the_list_and_merge_the_summary(tmp_path):
    listing = scan_list(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               "-m", "Med3DFMLib.cli", "segment", "--list", str(listing), "--output-dir", str(out), "--device", "cpu", "--progress", "none"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0, done.stdout + done.stderr  # a scan failed: each rank exits 3, torchrun reports it
    assert "failed (exitcode: 3)" in done.stderr or "exitcode  : 3" in done.stderr, done.stderr
    assert "4 scans by 2 processes: 3 done, 0 skipped, 1 failed" in done.stdout, done.stdout
    rows = summary(out)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["rank"] for r in rows] == ["0", "1", "0", "1"]  # rank r takes rows r, r + 2, ...
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    for rank, ids in ((0, ["a", "c"]), (1, ["b", "d"])):
        mine = summary(out, f".summary.rank{rank}.tsv")
        assert [r["id"] for r in mine] == ids and {r["rank"] for r in mine} == {str(rank)}
    assert "[rank 1/2] b: done" in done.stdout and "[rank 0/2] c: failed" in done.stdout


@pytest.fixture(scope="module")
def adrenal_adapter(tmp_path_factory):
    """A classification adapter from 2 normal + 2 mass AdrenalMNIST3D masks (a short schedule: the test
    is about the batch, not accuracy), and two held-out masks to classify."""
    from Med3DFMLib.classify.data import ListRow
    from Med3DFMLib.classify.job import run_adapt_classify

    folder = tmp_path_factory.mktemp("adrenal_batch")
    archive = np.load(ADRENAL)

    def write(array: np.ndarray, name: str) -> Path:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(folder / name), True)
        return folder / name

    x, y = archive["train_images"], archive["train_labels"].ravel()
    rows = [ListRow(f"train {i}", write(x[i], f"train_{i}.nii.gz"), class_name=name) for cls, name in ((0, "normal"), (1, "mass")) for i in np.nonzero(y == cls)[0][:2]]
    model = folder / "adrenal.safetensors"
    run_adapt_classify(rows, "adrenal batch", model, max_steps=10)
    vx, vy = archive["val_images"], archive["val_labels"].ravel()
    scans = [write(vx[i], f"val_{i}.nii.gz") for i in (int(np.nonzero(vy == 0)[0][0]), int(np.nonzero(vy == 1)[0][0]))]
    return model, scans


def test_classify_list_with_a_corrupt_scan(adrenal_adapter, tmp_path, capsys):
    model, scans = adrenal_adapter
    whole = scans[0].read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    # the existing classify list header (image) works; an output column names one table
    (tmp_path / "scans.csv").write_text(f"image,output\n{scans[0]},first.tsv\ncut.nii.gz,\n{scans[1]},\n")
    out = tmp_path / "out"
    argv = ["classify", "--list", str(tmp_path / "scans.csv"), "--output-dir", str(out), "--model", str(model), "--device", "cpu", "--progress", "none"]
    assert main(argv) == 3
    rows = summary(out)
    assert [r["id"] for r in rows] == ["first", "cut", scans[1].name[: -len(".nii.gz")]]
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert "cut.nii.gz is truncated or corrupt" in rows[1]["error"]
    single = tmp_path / "single.tsv"
    assert main(["classify", str(scans[0]), "--model", str(model), "-o", str(single), "--device", "cpu", "--progress", "none"]) == 0
    assert (out / "first.tsv").read_text().splitlines()[2:] == single.read_text().splitlines()[2:]  # the same table row
    for row in (rows[0], rows[2]):
        probabilities = dict(part.split("=") for part in row["probabilities"].split(";"))
        assert list(probabilities) == ["normal", "mass"] and abs(sum(map(float, probabilities.values())) - 1) < 1e-4
        assert row["prediction"] == max(probabilities, key=lambda k: float(probabilities[k]))
        assert (out / row["output"].replace(".tsv", ".json")).is_file()  # the record beside each table, as one scan gets
    capsys.readouterr()
    assert main(argv) == 3
    assert [r["status"] for r in summary(out)] == ["skipped", "failed", "skipped"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("input,id\n", "has a header but no rows"),
        ("path,id\nx.nii.gz,1\n", "needs an input column"),
        ("input,output\na.nii.gz,same.seg.nrrd\nb.nii.gz,same.seg.nrrd\n", "is also the output of scans.csv line 2"),
        ("input\nx/a.nii.gz\ny/a.nii.gz\n", "is also the output of"),  # the same default name
        ("input,output\na.nii.gz,../escape.seg.nrrd\n", "leaves the output folder"),
        ("input,output\na.nii.gz,/tmp/abs.seg.nrrd\n", "not an absolute path"),
        ("input,output\na.nii.gz,a.nii.gz\n", "must end in .seg.nrrd"),
        ("input,output\na.nii.gz,\n,b.seg.nrrd\n", "line 3: the input column is empty"),
    ],
)
def test_bad_lists_fail_with_one_line_before_any_work(tmp_path, capsys, text, message):
    (tmp_path / "scans.csv").write_text(text)
    out = tmp_path / "out"
    assert run_segment_batch(tmp_path / "scans.csv", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("med3dfm: error:") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_list_cannot_name_the_summary(tmp_path):
    from Med3DFMLib.batch import read_batch_list
    from Med3DFMLib.errors import Med3DFMError

    (tmp_path / "scans.csv").write_text("input,output\na.nii.gz,summary.tsv\n")
    with pytest.raises(Med3DFMError, match="the batch summary's own name"):
        read_batch_list(tmp_path / "scans.csv", tmp_path / "out", ".tsv")


def test_rows_may_not_write_each_others_files(tmp_path):
    """`x.tsv` keeps its completion record in `x.tsv.done.json`, which is also the job record of `x.tsv.done.tsv`."""
    from Med3DFMLib.batch import ClassifyTask, check_collisions, read_batch_list
    from Med3DFMLib.errors import Med3DFMError

    (tmp_path / "scans.csv").write_text("input,output\na.nii.gz,x.tsv\nb.nii.gz,x.tsv.done.tsv\n")
    rows = read_batch_list(tmp_path / "scans.csv", tmp_path / "out", ".tsv")
    with pytest.raises(Med3DFMError, match="line 3: its output x.tsv.done.tsv would write x.tsv.done.json, which scans.csv line 2 writes too"):
        check_collisions(ClassifyTask("unused"), rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "--list", "scans.csv"], "--list needs --output-dir"),
        (["segment", "x.nii.gz", "--list", "scans.csv", "--output-dir", "out"], "either one scan or --list"),
        (["segment", "x.nii.gz", "--output-dir", "out"], "--output-dir goes with --list"),
        (["segment", "--list", "scans.csv", "--output-dir", "out", "-o", "x.seg.nrrd"], "--output is for one scan"),
        (["segment", "--list", "scans.csv", "--output-dir", "out", "--table", "t.tsv"], "--table is for one scan"),
        (["segment", "x.nii.gz"], "-o OUTPUT.seg.nrrd"),
        (["segment", "x.nii.gz", "-o", "x.seg.nrrd", "--labelmaps"], "--labelmaps goes with --list"),
        (["classify", "--list", "scans.csv", "--output-dir", "out", "--model", "m.safetensors", "--heatmap", "h.nrrd"], "--heatmap is for one scan"),
        (["classify", "x.nii.gz", "--model", "m.safetensors"], "give -o TABLE.tsv"),
    ],
)
def test_mixed_arguments_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--progress", "none"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_batch_writes_confidence_and_colour_tables_beside_each_output(tmp_path, capsys):
    """`--confidence` and `--color-table` without a file in a batch: NAME_confidence.nii.gz and NAME.csv
    beside each NAME.seg.nrrd, recorded and verified like the other outputs; a re-run skips them."""
    listing = tmp_path / "scans.csv"
    listing.write_text(f"input\n{HIPPOCAMPUS / 'hippocampus_014.nii.gz'}\n")
    out = tmp_path / "out"
    assert run_segment_batch(listing, out, "--confidence", "--color-table", "--flag-below", "0.7") == 0
    confidence = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "hippocampus_014_confidence.nii.gz")))
    assert confidence.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "hippocampus_014.nii.gz"))).shape
    assert 0.0 <= confidence.min() and confidence.max() <= 1.0
    assert (out / "hippocampus_014.csv").read_text() == (ROOT / "Resources" / "models" / "hippocampus-mr-demo.csv").read_text()
    done = json.loads((out / "hippocampus_014.seg.nrrd.done.json").read_text())
    assert set(done["outputs"]) == {"segmentation", "record", "confidence", "color_table"}
    record = json.loads((out / "hippocampus_014.json").read_text())
    assert record["confidence"]["flag_below"] == 0.7
    capsys.readouterr()
    assert run_segment_batch(listing, out, "--confidence", "--color-table", "--flag-below", "0.7") == 0
    assert [r["status"] for r in summary(out)] == ["skipped"]
    assert run_segment_batch(listing, out, "--confidence", "--color-table", "--flag-below", "0.5") == 0  # other settings: redone
    assert [r["status"] for r in summary(out)] == ["done"]
    # a file name is for one scan; one scan needs a file
    assert run_segment_batch(listing, out, "--confidence", str(tmp_path / "c.nii.gz")) == 1
    assert "give --confidence without a file" in capsys.readouterr().err
    assert main(["segment", str(HIPPOCAMPUS / "hippocampus_014.nii.gz"), "-o", str(tmp_path / "x.seg.nrrd"), "--color-table", "--progress", "none"]) == 1
    assert "--color-table needs a file for one scan" in capsys.readouterr().err
