"""`hpcdl data convert`: npy, npz and CSV round-trip; each bad input fails clearly and writes nothing."""

import h5py
import numpy as np
import pytest

from hpcdl.cli import main
from hpcdl.data import convert as convert_module

ROWS, FEATURES, CLASSES = 300, 6, 4


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((ROWS, FEATURES))
    y = rng.integers(0, CLASSES, ROWS)
    y[:CLASSES] = np.arange(CLASSES)  # every class present: classes are inferred as max + 1
    return x, y


def write_csv(path, x, y, header=True, label_at=2):
    lines = []
    if header:
        names = [f"f{i}" for i in range(x.shape[1])]
        names.insert(label_at, "label")
        lines.append(",".join(names))
    for row, label in zip(x, y):
        fields = [repr(float(v)) for v in row]
        fields.insert(label_at, str(int(label)))
        lines.append(",".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(capsys, *args):
    code = main(["data", "convert", "--no-progress", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path):
    with h5py.File(path) as f:
        return {k: f[k][:] for k in ("train/x", "train/y", "val/x", "val/y")}, dict(f.attrs)


def same_rows(x_parts, y_parts, x, y):
    """The union of the splits holds exactly the source rows (in some order)."""
    got = np.column_stack([np.concatenate(x_parts), np.concatenate(y_parts)])
    want = np.column_stack([x.astype(np.float32), y])
    return np.array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])


def test_npy_round_trip_with_seeded_split(tmp_path, capsys, arrays):
    x, y = arrays
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    outs = []
    for name in ("a.h5", "b.h5"):
        code, out, err = run(capsys, "--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy", "--out", tmp_path / name)
        assert code == 0, err
        assert "classes        4" in out
        outs.append(read(tmp_path / name)[0])
    data = outs[0]
    assert len(data["val/y"]) == 30 and len(data["train/y"]) == 270
    assert same_rows([data["train/x"], data["val/x"]], [data["train/y"], data["val/y"]], x, y)
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in data), "the split must be seeded"
    assert main(["data", "info", str(tmp_path / "a.h5"), "--scan"]) == 0


def test_npz_round_trip_with_named_arrays_and_validation_files(tmp_path, capsys, arrays):
    x, y = arrays
    np.savez_compressed(tmp_path / "train.npz", images=x, digits=y)
    np.savez(tmp_path / "val.npz", x=x[:50], y=y[:50])
    args = ["--x", f"{tmp_path}/train.npz:images", "--y", f"{tmp_path}/train.npz:digits"]
    args += ["--val-x", tmp_path / "val.npz", "--feature-shape", "2,3"]
    code, _, err = run(capsys, *args, "--out", tmp_path / "o.h5")
    assert code == 0, err
    data, attrs = read(tmp_path / "o.h5")
    assert np.array_equal(data["train/x"], x.astype(np.float32).reshape(-1, 2, 3))
    assert np.array_equal(data["train/y"], y) and np.array_equal(data["val/y"], y[:50])
    assert list(attrs["feature_shape"]) == [2, 3] and attrs["generator"] == "convert"


def test_csv_round_trip_in_small_blocks(tmp_path, capsys, arrays, monkeypatch):
    x, y = arrays
    # Tiny blocks, so the round trip crosses many block boundaries (the bounded-memory path).
    monkeypatch.setattr(convert_module, "BLOCK_BYTES", 8 * FEATURES * 7)
    write_csv(tmp_path / "d.csv", x, y)
    write_csv(tmp_path / "plain.csv", x, y, header=False, label_at=FEATURES)
    for source in ("d.csv", "plain.csv"):
        out = tmp_path / f"{source}.h5"
        code, _, err = run(capsys, "--x", tmp_path / source, "--out", out, "--val-fraction", "0.2", "--classes", 5)
        assert code == 0, err
        data, attrs = read(out)
        assert attrs["num_classes"] == 5 and len(data["val/y"]) == 60
        assert same_rows([data["train/x"], data["val/x"]], [data["train/y"], data["val/y"]], x, y)


def ragged(tmp_path, x, y):
    path = write_csv(tmp_path / "bad.csv", x, y)
    lines = path.read_text().splitlines()
    lines[8] += ",1.5"
    path.write_text("\n".join(lines) + "\n")
    return ["--x", path], "row 7 (line 9) has 8 columns, expected 7"


def label_out_of_range(tmp_path, x, y):
    y = y.copy()
    y[41] = 9
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy", "--classes", 4], "row 41: label 9 is outside 0..3"


def negative_label(tmp_path, x, y):
    y = y.copy()
    y[12] = -1
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return ["--x", tmp_path / "d.npz"], "d.npz:y: row 12: label -1 is negative"


def nan_feature(tmp_path, x, y):
    x = x.copy()
    x[77, 2] = np.nan
    path = write_csv(tmp_path / "nan.csv", x, y)
    return ["--x", path], "row 77 (line 79): features hold NaN"


def inf_after_cast(tmp_path, x, y):
    x = x.copy()
    x[5, 0] = 1e300  # finite in float64, Inf in float32
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy"], "row 5: features hold Inf"


def mismatched_lengths(tmp_path, x, y):
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:-3])
    return ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy"], "has 300 rows but"


def unreadable(tmp_path, x, y):
    (tmp_path / "x.npy").write_bytes(b"this is not numpy")
    np.save(tmp_path / "y.npy", y)
    return ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy"], "cannot read it as a NumPy"


def missing(tmp_path, x, y):
    return ["--x", tmp_path / "nope.npy", "--y", tmp_path / "nope.npy"], "nope.npy: file does not exist"


def ragged_npy(tmp_path, x, y):
    np.save(tmp_path / "x.npy", np.array([[1.0, 2.0], [3.0]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "y.npy", y[:2])
    return ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy"], "ragged or non-numeric"


def header_only_csv(tmp_path, x, y):
    path = write_csv(tmp_path / "empty.csv", x[:0], y[:0])
    return ["--x", path], "empty.csv: has a header line but no data rows; add the samples below it"


def empty_validation_npy(tmp_path, x, y):
    """Named before anything splits or writes it (a zero-row /val once ended in h5py's traceback)."""
    for name, array in (("x", x), ("y", y), ("vx", x[:0]), ("vy", y[:0])):
        np.save(tmp_path / f"{name}.npy", array)
    args = ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy"]
    args += ["--val-x", tmp_path / "vx.npy", "--val-y", tmp_path / "vy.npy"]
    return args, f"vx.npy: has no rows (shape (0, {FEATURES})); give one row per sample"


BAD = [ragged, label_out_of_range, negative_label, nan_feature, inf_after_cast, mismatched_lengths, unreadable]
BAD += [missing, ragged_npy, header_only_csv, empty_validation_npy]


@pytest.mark.parametrize("case", BAD, ids=lambda case: case.__name__)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, capsys, arrays, case):
    args, words = case(tmp_path, *arrays)
    out = tmp_path / "out" / "data.h5"
    code, _, err = run(capsys, *args, "--out", out)
    assert code != 0
    assert words in err, err
    assert err.count("\n") == 1 and err.startswith("hpcdl: error: "), err
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == [], f"a failed convert left {leftovers}"
