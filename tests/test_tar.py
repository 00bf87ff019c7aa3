"""The fast shard reader (ldm.data.tar) gives exactly webdataset's samples, in every tar flavour
the tools write, and survives damaged shards through the error handler."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from ldm.data.tar import DamagedShard, TarFormatError, tar_members, tar_samples


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


# A sample of _write is 4096 bytes: .txt (header + 9 bytes padded to 512), .json (header + 1200
# bytes in 3 blocks), .cls (header + 1 block). Cuts inside the second sample: in the padding of its
# .txt (its first member) and in the data of its .json.
@pytest.mark.parametrize("member,end", [("txt", 4096 + 512 + 100), ("json", 4096 + 1024 + 512 + 700)])
def test_damaged_shard_goes_to_the_handler_and_the_next_shard_is_read(tmp_path, member, end):
    good, cut, garbage = tmp_path / "good.tar", tmp_path / "cut.tar", tmp_path / "garbage.tar"
    _write(good, tarfile.GNU_FORMAT, "w", name_len=5)
    cut.write_bytes(good.read_bytes()[:end])
    garbage.write_bytes(b"this is not a tar file" * 100)
    with open(garbage, "rb") as fh, pytest.raises(TarFormatError, match="tar header"):
        list(tar_members(fh))
    errors: list[Exception] = []
    samples = list(tar_samples([{"url": str(p)} for p in (cut, garbage, good)],
                               lambda exn: errors.append(exn) is None))
    # the cut shard's complete first sample (the one it cut is dropped, not yielded captionless),
    # then the good shard: 1 + 3
    assert [(s["__url__"], s["__key__"]) for s in samples] == [(str(cut), "part/kkkkk000")] + [
        (str(good), f"part/kkkkk{i:03d}") for i in range(3)]
    assert sorted(k for k in samples[0] if not k.startswith("__")) == ["cls", "json", "txt"]
    assert len(errors) == 2 and all(isinstance(e, DamagedShard) for e in errors)
    assert (errors[0].url, errors[0].samples, errors[0].key) == (str(cut), 1, "part/kkkkk001")
    assert (errors[1].url, errors[1].samples, errors[1].key) == (str(garbage), 0, None)
    assert str(cut) in str(errors[0]) and str(garbage) in str(errors[1])
    assert f"ends inside member part/kkkkk001.{member}" in str(errors[0])
    with pytest.raises(DamagedShard, match="while reading sample part/kkkkk001"):  # a raising handler
        list(tar_samples([{"url": str(cut)}], wds.reraise_exception))


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
