"""The fast shard reader (ldm.data.tar) gives exactly webdataset's samples, in every tar flavour
the tools write, and survives damaged shards through the error handler."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from ldm.data.tar import TarFormatError, tar_members, tar_samples


def _write(path: Path, fmt: int, mode: str, name_len: int, n: int = 3) -> None:
    with tarfile.open(path, mode, format=fmt) as tar:
        for i in range(n):
            for ext, data in (("txt", b"caption %d" % i), ("json", b"[1]" * 400), ("cls", b"%d" % i)):
                info = tarfile.TarInfo(f"part/{'k' * name_len}{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        dir_info = tarfile.TarInfo("part/subdir")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_samples_equal_webdatasets(tmp_path, fmt, mode):
    # ustar keeps long names in its prefix field; GNU and pax write extra headers for them
    path = tmp_path / ("shard.tar" + (".gz" if mode == "w:gz" else ""))
    _write(path, fmt, mode, name_len=20 if fmt == tarfile.USTAR_FORMAT else 150)
    ours = list(tar_samples([{"url": str(path)}], wds.reraise_exception))
    theirs = list(wds.tarfile_to_samples()([{"url": str(path)}]))
    assert len(ours) == 3 and ours == theirs


def test_pipe_urls_and_member_order(tmp_path):
    path = tmp_path / "a.tar"
    _write(path, tarfile.GNU_FORMAT, "w", name_len=5)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with open(path, "rb") as fh:
        assert list(tar_members(fh)) == expected
    piped = list(tar_samples([{"url": f"pipe:cat {path}"}], wds.reraise_exception))
    assert [s["__key__"] for s in piped] == [f"part/kkkkk{i:03d}" for i in range(3)]


def test_damaged_shard_goes_to_the_handler_and_the_next_shard_is_read(tmp_path):
    good, cut, garbage = tmp_path / "good.tar", tmp_path / "cut.tar", tmp_path / "garbage.tar"
    _write(good, tarfile.GNU_FORMAT, "w", name_len=5)
    cut.write_bytes(good.read_bytes()[:1500])  # ends inside a member's data
    garbage.write_bytes(b"this is not a tar file" * 100)
    with open(garbage, "rb") as fh, pytest.raises(TarFormatError, match="tar header"):
        list(tar_members(fh))
    errors: list[Exception] = []
    samples = list(tar_samples([{"url": str(p)} for p in (cut, garbage, good)],
                               lambda exn: errors.append(exn) is None))
    # the cut shard's complete first sample, then the good shard: 1 + 3
    assert [s["__url__"] for s in samples] == [str(cut)] + [str(good)] * 3
    assert len(errors) == 2 and all(isinstance(e, TarFormatError) for e in errors)
    assert str(cut) in errors[0].args and str(garbage) in errors[1].args


def test_grouping_follows_webdatasets_naming_rules(tmp_path):
    """Keys end at the first dot of the file name, extensions are lowercased, names without an
    extension and dot-files are skipped, and a repeated extension in one sample goes to the
    handler, as webdataset's own reader does; members named __*, which webdataset's reader keeps as
    a sample, are skipped (webdataset's meta files)."""
    path = tmp_path / "names.tar"
    names = ["dir.v1/a.seg.PNG", "dir.v1/a.txt", "dir.v1/noext", "dir.v1/.hidden", "__meta__.json",
             "b.txt", "b.TXT", "b.cls", "c.txt"]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"%02d" % i))
    errors: list[Exception] = []
    ours = list(tar_samples([{"url": str(path)}], lambda exn: errors.append(exn) is None))
    theirs = list(wds.tarfile_to_samples(handler=wds.ignore_and_continue)([{"url": str(path)}]))
    assert ours == [s for s in theirs if s["__key__"] != "__meta__"]
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in ours] == [
        ("dir.v1/a", ["seg.png", "txt"]), ("b", ["cls", "txt"]), ("c", ["txt"])]
    assert ours[1]["txt"] == b"05" and len(errors) == 1 and "duplicate" in str(errors[0])
