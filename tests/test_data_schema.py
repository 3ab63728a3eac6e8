"""The HDF5 schema: builders write valid, deterministic, learnable files; bad files fail with clear words."""

from __future__ import annotations

import argparse
import io
import itertools

import h5py
import numpy as np
import pytest

from hpcdl.data import make, schema
from hpcdl.data.commands import count, register
from hpcdl.data.schema import describe, validate
from hpcdl.errors import DataError
from hpcdl.progress import Progress


def write_h5(path, n_train=200, n_val=40, features=8, classes=3, x_dtype="float32", y_dtype="int64", edit=None):
    """A small valid file (chunked like the builders' files), optionally broken by `edit(file)`."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update(num_classes=classes, feature_shape=np.array([features]), generator="test", seed=0)
        for split, n in (("train", n_train), ("val", n_val)):
            rows = 16 if n >= 16 else None  # HDF5 chunks may not exceed a fixed-size dataset
            x = rng.random((n, features)).astype(x_dtype)
            f.create_dataset(f"{split}/x", data=x, chunks=rows and (rows, features))
            f.create_dataset(f"{split}/y", data=rng.integers(0, classes, n).astype(y_dtype), chunks=rows and (rows,))
        if edit:
            edit(f)
    return str(path)


def arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in ("train/x", "train/y", "val/x", "val/y")}


# ---- builders ----------------------------------------------------------------------------------------


def test_digits(tmp_path):
    info = make.make_digits(tmp_path / "digits.h5")
    assert info.path == str(tmp_path / "digits.h5")
    assert info.sizes == {"train": 1497, "val": 300}
    assert info.feature_shape == (64,) and info.num_classes == 10
    assert info.attrs["generator"] == "digits" and info.attrs["seed"] == 0
    data = arrays(info.path)
    assert data["train/x"].min() == 0.0 and data["train/x"].max() == 1.0
    assert set(np.unique(data["train/y"])) == set(range(10))
    assert validate(info.path, scan=True) == info
    # The split is a fixed seeded permutation: another seed gives another split.
    other = make.make_digits(tmp_path / "other.h5", seed=1)
    assert not np.array_equal(arrays(other.path)["val/y"], data["val/y"])


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda out: make.make_synthetic(out, n=500, features=20, classes=4, progress=False), (20,)),
        (
            lambda out: make.make_images(out, n=200, channels=2, height=8, width=6, classes=3, progress=False),
            (2, 8, 6),
        ),
        (
            lambda out: make.make_sequences(out, n=200, length=6, features=3, classes=3, progress=False),
            (6, 3),
        ),
    ],
    ids=["synthetic", "images", "sequences"],
)
def test_builders_write_valid_files(tmp_path, build, shape):
    info = build(tmp_path / "data.h5")
    assert info.feature_shape == shape and sum(info.sizes.values()) in (500, 200)
    assert validate(info.path, scan=True) == info
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"], "no temporary file may be left beside the output"
    with h5py.File(info.path, "r") as f:
        assert f["train/x"].chunks is not None and f["train/x"].dtype == np.float32


def test_synthetic_is_deterministic_and_independent_of_storage(tmp_path):
    options = dict(n=3000, features=12, classes=5, progress=False)
    base = arrays(make.make_synthetic(tmp_path / "a.h5", **options).path)
    again = arrays(make.make_synthetic(tmp_path / "b.h5", **options, chunk_rows=7, compression="gzip").path)
    other = arrays(make.make_synthetic(tmp_path / "c.h5", **options, seed=1).path)
    for name in base:
        np.testing.assert_array_equal(base[name], again[name])
    assert not np.array_equal(base["train/x"], other["train/x"])
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["train/x"].chunks == (7, 12) and f["train/x"].compression == "gzip"


def test_writer_routes_blocks_across_the_split_boundary(tmp_path):
    """Blocks of any size, one straddling the train/val boundary, land row for row in the right split."""
    rng = np.random.default_rng(0)
    x, y = rng.random((100, 3)).astype(np.float32), rng.integers(0, 4, 100)
    cuts = [0, 37, 85, 91, 100]  # the block 85:91 straddles row 90, the first of /val
    blocks = ((x[a:b], y[a:b]) for a, b in itertools.pairwise(cuts))
    attrs = {"generator": "test", "seed": 0}
    sizes = {"train": 90, "val": 10}
    info = make._write(
        tmp_path / "w.h5", blocks, sizes=sizes, feature_shape=(3,), num_classes=4, attrs=attrs, progress=False
    )
    data = arrays(info.path)
    np.testing.assert_array_equal(data["train/x"], x[:90])
    np.testing.assert_array_equal(data["val/x"], x[90:])
    np.testing.assert_array_equal(np.concatenate([data["train/y"], data["val/y"]]), y)


@pytest.mark.parametrize("kind", ["synthetic", "images", "sequences"])
def test_generated_data_is_learnable(tmp_path, kind):
    from sklearn.linear_model import LogisticRegression

    out = tmp_path / f"{kind}.h5"
    if kind == "synthetic":
        info = make.make_synthetic(out, n=2000, features=20, classes=4, progress=False)
    elif kind == "images":
        info = make.make_images(out, n=2000, height=12, width=12, classes=4, progress=False)
    else:
        info = make.make_sequences(out, n=2000, length=12, features=3, classes=4, progress=False)
    data = arrays(info.path)
    x_train, x_val = (data[name].reshape(len(data[name]), -1) for name in ("train/x", "val/x"))
    shares = np.bincount(data["train/y"], minlength=4) / len(data["train/y"])
    assert shares.min() > 0.15, f"classes should be roughly balanced, got {shares}"
    accuracy = LogisticRegression(max_iter=300).fit(x_train, data["train/y"]).score(x_val, data["val/y"])
    assert accuracy > 0.5, f"{kind}: a linear model should beat chance (0.25) clearly, got {accuracy:.2f}"


def test_failed_build_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "data.h5"
    out.write_text("the previous file")

    def broken(*args, **kwargs):
        raise DataError("validation failed")

    monkeypatch.setattr(make, "validate", broken)
    with pytest.raises(DataError, match="validation failed"):
        make.make_synthetic(out, n=100, features=4, progress=False)
    assert out.read_text() == "the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"]


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(n=1), "empty split"),
        (dict(n=100, val_fraction=0.0), "val_fraction"),
        (dict(n=100, classes=1), "classes must be at least 2"),
        (dict(n=100, features=0), "features must be a positive integer"),
        (dict(n=100, seed=-1), "seed must be a non-negative integer"),
        (dict(n=100, compression="zstd"), "compression must be one of"),
        (dict(n=100, chunk_rows=0), "chunk_rows must be a positive integer"),
    ],
)
def test_bad_builder_arguments(tmp_path, options, words):
    with pytest.raises(DataError, match=words):
        make.make_synthetic(tmp_path / "x.h5", **{"progress": False, **options})
    assert not list(tmp_path.iterdir())


# ---- validation ----------------------------------------------------------------------------------------


def test_valid_file(tmp_path):
    info = validate(write_h5(tmp_path / "ok.h5"), scan=True)
    assert info.sizes == {"train": 200, "val": 40} and info.feature_shape == (8,) and info.num_classes == 3
    assert info.attrs == {"num_classes": 3, "feature_shape": [8], "generator": "test", "seed": 0}
    assert validate(str(tmp_path / "ok.h5"), splits=("val",)).sizes == {"val": 40}


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.h5: file does not exist; build one"):
        validate(str(tmp_path / "nope.h5"))


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("these are not the samples you are looking for\n")
    with pytest.raises(DataError, match=r"notes\.h5: not an HDF5 file; convert .* datasets/README\.md"):
        validate(str(path))


def edit_delete(name):
    def edit(f):
        del f[name]

    return edit


def edit_replace(name, data):
    def edit(f):
        del f[name]
        f[name] = data

    return edit


def edit_set(name, index, value):
    def edit(f):
        f[name][index] = value

    return edit


def edit_attr(**attrs):
    def edit(f):
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value

    return edit


BAD_FILES = {
    "missing dataset": (
        dict(edit=edit_delete("val/y")),
        "missing dataset '/val/y' (expected /train/x, /train/y, /val/x, /val/y; see datasets/README.md)",
    ),
    "missing group": (dict(edit=edit_delete("train")), "missing dataset '/train/x'"),
    "missing attribute": (dict(edit=edit_attr(seed=None)), "missing file attribute 'seed'"),
    "bad num_classes": (dict(edit=edit_attr(num_classes=1)), "num_classes must be an integer >= 2, found 1"),
    "bad feature_shape": (dict(edit=edit_attr(feature_shape=np.array([8, 0]))), "positive integers"),
    "length mismatch": (
        dict(edit=edit_replace("train/y", np.zeros(150, dtype=np.int64))),
        "'/train/x' has 200 samples but '/train/y' has 150",
    ),
    "float64 x": (dict(x_dtype="float64"), "'/train/x' has dtype float64; x must be float32"),
    "int32 y": (dict(y_dtype="int32"), "'/train/y' has dtype int32; y must be int64"),
    "2-D y": (dict(edit=edit_replace("val/y", np.zeros((40, 1), dtype=np.int64))), "y must be one label per"),
    "wrong sample shape": (
        dict(edit=edit_attr(feature_shape=np.array([2, 4]))),
        "'/train/x' has per-sample shape (8,) but the file attribute feature_shape is (2, 4)",
    ),
    "empty split": (
        dict(n_val=0),
        "split '/val' is empty (0 samples)",
    ),
    "label too large": (
        dict(edit=edit_set("train/y", 5, 9)),
        "'/train/y' has labels outside 0..2 (min 0, max 9; first at index 5: 9)",
    ),
    "negative label": (dict(edit=edit_set("val/y", 33, -1)), "(min -1, max 2; first at index 33: -1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file(tmp_path, case):
    options, words = BAD_FILES[case]
    path = write_h5(tmp_path / "bad.h5", **options)
    with pytest.raises(DataError) as caught:
        validate(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert words in message


def test_nan_only_with_scan(tmp_path, monkeypatch):
    path = write_h5(tmp_path / "nan.h5", edit=edit_set("train/x", (117, 3), np.nan))
    assert validate(path).sizes["train"] == 200  # without the scan /train's features are not read
    monkeypatch.setattr(schema, "SCAN_READ_BYTES", 16 * 8 * 4)  # 16-row reads: the NaN is in a later one
    with pytest.raises(DataError, match=r"'/train/x' has NaN/Inf values: first NaN in sample 117 of split '/train'"):
        validate(path, scan=True)


def test_inf_with_scan(tmp_path):
    path = write_h5(tmp_path / "inf.h5", edit=edit_set("val/x", (3, 0), -np.inf))
    with pytest.raises(DataError, match=r"first Inf in sample 3 of split '/val'"):
        validate(path, scan=True)


def test_labels_read_in_bounded_blocks(tmp_path, monkeypatch):
    """The first bad label is found in a later block, and min/max cover every block."""

    def two_bad_labels(f):
        f["train/y"][150], f["train/y"][190] = 7, -2

    path = write_h5(tmp_path / "labels.h5", edit=two_bad_labels)
    reads = []
    original = schema._read

    def spy(path, dataset, start, stop):
        reads.append(stop - start)
        return original(path, dataset, start, stop)

    monkeypatch.setattr(schema, "LABEL_READ_BYTES", 40 * 8)  # 40 labels -> whole 16-row chunks: 32 rows
    monkeypatch.setattr(schema, "_read", spy)
    with pytest.raises(DataError, match=r"\(min -2, max 7; first at index 150: 7\)"):
        validate(path)
    assert max(reads) == 32


# ---- warnings, external files, /val scanned at every start ----------------------------------------------


def test_labels_using_far_fewer_classes_than_declared_say_how_to_fix_it(tmp_path):
    path = write_h5(tmp_path / "few.h5", classes=3, edit=edit_attr(num_classes=1000))
    assert validate(path).warnings == (
        f"{path}: labels of /train use 3 of num_classes = 1000 (0, 1, 2); the model gets 1000 outputs and 997 of them "
        "(more than half, more than 4) are for classes no sample has; if that is not meant, rebuild the file with "
        "`hpcdl data convert ... --classes 3` (or set its num_classes attribute to 3)",
    )
    assert validate(write_h5(tmp_path / "all.h5", classes=3)).warnings == ()


def test_labels_missing_a_few_of_many_classes_name_those(tmp_path):
    path = write_h5(tmp_path / "many.h5", n_train=400, classes=12, edit=edit_attr(num_classes=14))
    (warning,) = validate(path).warnings
    assert (
        warning
        == f"{path}: labels of /train use 12 of num_classes = 14 (none of 12, 13); the model will have 14 outputs"
    )


@pytest.mark.parametrize("used, declared, contradicts", [(3, 7, False), (3, 8, True), (6, 12, False), (6, 13, True)])
def test_the_class_count_contradicts_the_labels_when_more_than_half_and_more_than_four_are_unused(
    tmp_path, used, declared, contradicts
):
    (warning,) = validate(write_h5(tmp_path / "c.h5", classes=used, edit=edit_attr(num_classes=declared))).warnings
    assert ("if that is not meant" in warning) == contradicts, warning


def test_sparse_labels_are_told_to_renumber(tmp_path):
    """Labels 0, 1, 2 and 19 of 20 classes: fewer classes cannot hold label 19, so the advice is to renumber."""

    def sparse(f):
        f.attrs["num_classes"] = 20
        f["train/y"][0] = 19

    path = write_h5(tmp_path / "sparse.h5", classes=3, edit=sparse)
    (warning,) = validate(path).warnings
    assert "use 4 of num_classes = 20 (0, 1, 2, 19)" in warning and warning.endswith("with its labels renumbered 0..3")


def test_huge_features_warn_with_their_range(tmp_path):
    """NaN is the scan's to report: the range covers the finite values."""

    def huge(f):
        f["train/x"][5, 2], f["train/x"][7, 1], f["train/x"][9, 0] = 1e30, -3e29, np.nan

    path = write_h5(tmp_path / "huge.h5", edit=huge)
    assert validate(path).warnings == (
        f"{path}: features of '/train/x' reach 1e+30 (range [-3e+29, 1e+30] in its first 200 rows; more than 1e+06 "
        "warns): a float32 model's first loss may overflow or mean nothing; scale them (e.g. standardize each "
        "feature) and rebuild the file",
    )
    assert validate(write_h5(tmp_path / "edge.h5", edit=edit_set("train/x", (5, 2), -1e6))).warnings == ()


def test_the_feature_range_reads_only_the_first_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "RANGE_SAMPLE_BYTES", 16 * 8 * 4)  # 16 rows of 8 float32 features
    late = write_h5(tmp_path / "late.h5", edit=edit_set("train/x", (100, 0), 1e30))
    assert validate(late).warnings == ()
    early = write_h5(tmp_path / "early.h5", edit=edit_set("train/x", (15, 0), 1e30))
    (warning,) = validate(early).warnings
    assert "in its first 16 rows" in warning


def test_a_run_says_the_data_warnings_first_and_trains_on(tmp_path, capsys):
    """One rank, in this process: both warnings lead the run's output, and the run still takes its steps."""
    from hpcdl import comm, config
    from hpcdl.train import train

    path = write_h5(tmp_path / "odd.h5", classes=3, edit=edit_attr(num_classes=1000))
    with h5py.File(path, "a") as f:
        f["train/x"][...] = f["train/x"][...] * 1e30
    sets = [f"data.path='{path}'", f"run.dir='{tmp_path / 'run'}'", "train.max_steps=2", "run.progress=false"]
    train(config.load("digits-mlp", sets), comm.init(threads=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"hpcdl: {path}: labels of /train use 3 of num_classes = 1000"), lines
    assert lines[1].startswith(f"hpcdl: {path}: features of '/train/x' reach "), lines
    assert "ranks on 1 node(s)" in lines[2] and lines[-1].startswith("done: 2 steps"), lines


def link_to(filename: str, name: str, target: str):
    def edit(f):
        del f[name]
        f[name] = h5py.ExternalLink(filename, target)

    return edit


@pytest.mark.parametrize("name, target", [("train/x", "/x"), ("val", "/val")])
def test_external_link_to_a_missing_file(tmp_path, name, target):
    path = write_h5(tmp_path / "links.h5", edit=link_to("gone.h5", name, target))
    with pytest.raises(DataError, match=rf"'/{name}' is an external link to missing file gone\.h5"):
        validate(path)


def test_external_link_to_a_missing_object(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["y"] = np.zeros(3)
    path = write_h5(tmp_path / "links.h5", edit=link_to("other.h5", "train/x", "/x"))
    with pytest.raises(DataError, match=r"'/train/x' is an external link to '/x' in other\.h5, which cannot be"):
        validate(path)


def test_external_storage_in_a_missing_file(tmp_path, monkeypatch):
    def external(f):
        del f["val/x"]
        f.create_dataset("val/x", shape=(40, 8), dtype="float32", external=[("raw.bin", 0, 40 * 8 * 4)])

    path = write_h5(tmp_path / "external.h5", edit=external)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw.bin").write_bytes(np.ones((40, 8), dtype=np.float32).tobytes())
    assert validate(path).sizes == {"train": 200, "val": 40}
    (tmp_path / "raw.bin").unlink()
    with pytest.raises(DataError, match=r"'/val/x' keeps its data in external file raw\.bin, which is missing"):
        validate(path)


def test_nan_in_val_is_an_error_without_scan(tmp_path):
    path = write_h5(tmp_path / "val.h5", edit=edit_set("val/x", (21, 5), np.nan))
    with pytest.raises(DataError) as caught:
        validate(path)
    assert str(caught.value) == (
        f"{path}: '/val/x' has NaN/Inf values: first NaN in sample 21 of split '/val' (x[21, 5] = nan); "
        f"fix or drop those samples (`hpcdl data info {path} --scan` checks every split)"
    )


def test_a_large_val_is_not_scanned_and_says_so(tmp_path, monkeypatch):
    path = write_h5(tmp_path / "val.h5", edit=edit_set("val/x", (21, 5), np.inf))
    monkeypatch.setattr(schema, "VAL_SCAN_BYTES", 40 * 8 * 4 - 1)
    (note,) = validate(path).warnings
    assert note.startswith("/val/x (0 MiB) was not scanned for NaN/Inf") and f"data info {path} --scan" in note
    with pytest.raises(DataError, match=r"first Inf in sample 21 of split '/val' \(x\[21, 5\] = inf\)"):
        validate(path, scan=True)


def test_describe(tmp_path):
    info = make.make_synthetic(
        tmp_path / "d.h5", n=300, features=5, classes=3, compression="lzf", checksum=True, progress=False
    )
    text = describe(info)
    for words in (
        str(tmp_path / "d.h5"),
        "classes        3",
        "(5,)",
        "/train  270 samples",
        "/val  30 samples",
    ):
        assert words in text
    assert "compression lzf" in text and "fletcher32 yes" in text and "generator      'synthetic'" in text


# ---- command line and progress -----------------------------------------------------------------------------


def run_data_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcdl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_commands(tmp_path, capsys):
    out = tmp_path / "s.h5"
    argv = ["data", "make", "sequences", "--out", str(out), "--n", "1k", "--length", "5", "--features", "2"]
    assert run_data_command([*argv, "--classes", "3", "--no-progress", "--chunk-rows", "64"]) == 0
    assert "/train  900 samples" in capsys.readouterr().out
    assert run_data_command(["data", "info", str(out), "--scan"]) == 0
    assert "feature shape  (5, 2)" in capsys.readouterr().out
    with pytest.raises(DataError, match="not an HDF5 file"):
        run_data_command(["data", "info", __file__])


def test_count():
    assert [count(text) for text in ("60000", "60_000", "64k", "10M", "1e6")] == [60000] * 2 + [
        64000,
        10**7,
        10**6,
    ]
    for text in ("0", "-5", "1.5", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            count(text)


def test_progress_without_tty():
    stream = io.StringIO()
    with Progress(1000, desc="rows", unit="rows", stream=stream) as bar:
        for _ in range(10):
            bar.update(100)
        bar.postfix = "loss=0.5"
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "100.0%" in lines[0] and "1,000/1,000" in lines[0] and "loss=0.5" in lines[0]
    silent = io.StringIO()
    with Progress(10, stream=silent, enabled=False) as bar:
        bar.update(10)
    assert silent.getvalue() == ""
